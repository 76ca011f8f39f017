"""Shared pytest fixtures. Model files are made by the tests themselves, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- the tiny Magistral and its GGUFs (built once per session) ------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mistral-native tiny Magistral checkpoint (params.json, BF16 consolidated.safetensors, tekken.json)."""
    from edge_magistral.build.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


def _convert_tiny(checkpoint: Path, out_dir: Path, out_type: str) -> Path:
    from edge_magistral.build.checkpoint import open_checkpoint
    from edge_magistral.build.convert import convert

    return convert(open_checkpoint(checkpoint), out_dir / f"tiny-{out_type}.gguf", out_type)


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tiny-gguf-f32"), "F32")


@pytest.fixture(scope="session")
def tiny_gguf_f16(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tiny-gguf-f16"), "F16")


@pytest.fixture(scope="session")
def tiny_gguf_quants(tiny_gguf_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny F16 GGUF quantized by llama.cpp to Q8_0, Q6_K, Q5_K_M and Q4_K_M: {quant: path}."""
    from edge_magistral.build.quantize import quantize

    d = tmp_path_factory.mktemp("tiny-gguf-quants")
    return {q: quantize(tiny_gguf_f16, d / f"tiny-{q}.gguf", q, nthread=2)
            for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")}


@pytest.fixture(scope="session")
def tiny_gguf_bf16(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert_tiny(tiny_checkpoint, tmp_path_factory.mktemp("tiny-gguf-bf16"), "BF16")


# --- a real small model (not Magistral), fetched by scripts/fetch_test_models.py -------------------

SMOLLM2_GGUF = Path(__file__).resolve().parent.parent / ".cache" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, real weights, its own chat template); skips when not fetched."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: run `python scripts/fetch_test_models.py`")
    return SMOLLM2_GGUF


# --- a running `edge-magistral serve` on the tiny model (tests/serve_harness.py) -------------------

@pytest.fixture(scope="session")
def tiny_server(tiny_gguf_f32: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the service tests: API key, queue of 8, 10 s stall timeout, a 4096-token context
    (a prompt long enough to be cancelled mid-evaluation), 3 s client timeouts, an audit log, and
    the most verbose logging (which must still never show a prompt)."""
    import serve_harness

    d = tmp_path_factory.mktemp("serve")
    server = serve_harness.start(tiny_gguf_f32, d, "--queue-size", "8", "--stall-timeout", "10", "--ctx", "4096",
                                 "--max-tokens", "4000", "--client-timeout", "3",
                                 "--audit-log", str(d / "audit.jsonl"), verbose=2)
    yield server
    assert server.stop() == 0, server.log_text()
