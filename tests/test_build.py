"""The build pipeline: tiny checkpoint layout, streaming conversion, quantization, manifest,
resume, and bad input (one clear error, non-zero exit, nothing half-written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_magistral.build import manifest as mf
from edge_magistral.build.checkpoint import open_checkpoint
from edge_magistral.build.convert import convert
from edge_magistral.build.pipeline import BuildRequest, build
from edge_magistral.build.safetensors_io import read_header, read_tensor, write_safetensors
from edge_magistral.cli import cli
from edge_magistral.errors import BadInputError, CorruptModelError
from edge_magistral.gguf_info import read_info
from edge_magistral.tekken import END_THINK, GGUF_PATTERN_KEY, TEKKEN_PATTERN, THINK


def run_cli(*args: str):
    from edge_magistral.cli import build_cmds, model_cmds  # noqa: F401  (register commands)

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes, located through the project's header parser (GGUFReader is slow
    on a 131k-token vocabulary)."""
    from edge_magistral.gguf_info import read_header

    with open(path, "rb") as f:
        out = {}
        for t in read_header(path).tensors:
            f.seek(t.offset)
            out[t.name] = f.read(t.n_bytes)
        return out


def finished_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------------ the tiny checkpoint

def test_tiny_checkpoint_is_laid_out_like_the_real_repository(tiny_checkpoint: Path) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    assert {p.name for p in tiny_checkpoint.iterdir()} >= {"params.json", "consolidated.safetensors", "tekken.json"}
    params = json.loads((tiny_checkpoint / "params.json").read_text())
    assert params["rope_theta"] == 1e9 and params["vocab_size"] == 131072
    assert params["n_kv_heads"] < params["n_heads"]  # GQA, as Magistral
    refs = {r.name: r for r in read_header(tiny_checkpoint / "consolidated.safetensors")}
    assert {r.dtype for r in refs.values()} == {"BF16"}
    assert refs["tok_embeddings.weight"].shape == (131072, params["dim"])
    tok = MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json")).instruct_tokenizer.tokenizer
    assert tok.n_words == 131072
    assert tok.get_special_token("[THINK]") == THINK == 34
    assert tok.get_special_token("[/THINK]") == END_THINK == 35


def test_tiny_checkpoint_is_seeded(tmp_path: Path) -> None:
    from dataclasses import replace

    from edge_magistral.build.tiny import TINY, make_tiny_checkpoint

    small = replace(TINY, n_layers=1)
    a = make_tiny_checkpoint(tmp_path / "a", small, seed=3) / "consolidated.safetensors"
    b = make_tiny_checkpoint(tmp_path / "b", small, seed=3) / "consolidated.safetensors"
    c = make_tiny_checkpoint(tmp_path / "c", small, seed=4) / "consolidated.safetensors"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


# ------------------------------------------------------------------------------- conversion

def test_converted_gguf_metadata_is_complete(tiny_gguf_bf16: Path, tiny_checkpoint: Path) -> None:
    from edge_magistral.gguf_info import read_header

    info = read_info(tiny_gguf_bf16)
    params = json.loads((tiny_checkpoint / "params.json").read_text())
    assert info.architecture == "llama" and info.file_type_name == "BF16"
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.head_dim, info.n_ff) == (
        params["n_layers"], params["dim"], params["n_heads"], params["n_kv_heads"], params["head_dim"],
        params["hidden_dim"])
    assert info.rope_theta == 1e9 and info.context_length == params["max_seq_len"]
    assert info.n_vocab == 131072 and info.tokenizer_pre == "tekken"
    assert info.special_tokens["bos"] == 1 and info.special_tokens["eos"] == 2
    assert info.special_tokens["think"] == 34 and info.special_tokens["end_think"] == 35
    assert info.has_chat_template
    h = read_header(tiny_gguf_bf16)
    assert h.metadata[GGUF_PATTERN_KEY] == TEKKEN_PATTERN
    # matrices in BF16, norms kept in F32 (as llama.cpp's own converter does)
    types = {t.name: t.type_name for t in h.tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"


def test_bf16_conversion_is_bit_exact(tiny_gguf_bf16: Path, tiny_checkpoint: Path) -> None:
    src = {r.name: r for r in read_header(tiny_checkpoint / "consolidated.safetensors")}
    out = tensor_bytes(tiny_gguf_bf16)
    for s, g in [("layers.1.attention.wk.weight", "blk.1.attn_k.weight"),
                 ("tok_embeddings.weight", "token_embd.weight"), ("output.weight", "output.weight")]:
        want = read_tensor(src[s])
        got = np.frombuffer(out[g], dtype=np.uint16).reshape(want.shape)
        assert np.array_equal(got, want), g


def test_chat_template_renders_magistral_format(tiny_gguf_bf16: Path) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edge_magistral.gguf_info import read_header

    tmpl = read_header(tiny_gguf_bf16).metadata["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "[THINK]add them[/THINK]4"},
            {"role": "user", "content": "and 3+3?"}]
    text = env.from_string(tmpl).render(messages=msgs, bos_token="<s>", eos_token="</s>")
    assert text.startswith("<s>[SYSTEM_PROMPT]First draft your thinking process")
    assert "template below:[THINK]Your thoughts" in text  # the default prompt carries the think markers
    assert text.endswith("[/SYSTEM_PROMPT][INST]2+2?[/INST]4</s>[INST]and 3+3?[/INST]")  # old thinking dropped
    own = env.from_string(tmpl).render(messages=[{"role": "system", "content": "Be brief."}] + msgs[:1],
                                       bos_token="<s>", eos_token="</s>")
    assert own == "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]2+2?[/INST]"


def _hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What HF's conversion script does to Mistral's Q/K rows (rotate-half ordering)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _make_hf_checkpoint(native: Path, out: Path) -> Path:
    """Rewrite the tiny native checkpoint as an HF-format one, in two shards."""
    p = json.loads((native / "params.json").read_text())
    out.mkdir()
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": p["dim"],
        "num_hidden_layers": p["n_layers"], "head_dim": p["head_dim"], "intermediate_size": p["hidden_dim"],
        "num_attention_heads": p["n_heads"], "num_key_value_heads": p["n_kv_heads"],
        "rope_theta": p["rope_theta"], "rms_norm_eps": p["norm_eps"], "vocab_size": p["vocab_size"],
        "max_position_embeddings": p["max_seq_len"], "tie_word_embeddings": False}))
    shutil.copy(native / "tekken.json", out / "tekken.json")
    names = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj"}
    items = []
    for ref in read_header(native / "consolidated.safetensors"):
        stem = ref.name.removesuffix(".weight")
        if stem.startswith("layers."):
            _, i, rest = stem.split(".", 2)
            hf = f"model.layers.{i}.{names[rest]}.weight"
        else:
            hf = names[stem] + ".weight"
        heads = p["n_heads"] if "q_proj" in hf else p["n_kv_heads"] if "k_proj" in hf else 0
        items.append((hf, ref, heads))
    half = len(items) // 2
    for k, part in enumerate((items[:half], items[half:])):
        write_safetensors(out / f"model-0000{k + 1}-of-00002.safetensors",
                          [(hf, "BF16", ref.shape,
                            (lambda ref=ref, h=heads: _hf_permute(read_tensor(ref), h) if h else read_tensor(ref)))
                           for hf, ref, heads in part])
    return out


def test_hf_format_converts_to_the_same_gguf_tensors(tiny_checkpoint: Path, tiny_gguf_bf16: Path,
                                                     tmp_path: Path) -> None:
    hf = _make_hf_checkpoint(tiny_checkpoint, tmp_path / "hf")
    ckpt = open_checkpoint(hf)
    assert ckpt.kind == "hf" and len(ckpt.tensors) == len(open_checkpoint(tiny_checkpoint).tensors)
    out = convert(ckpt, tmp_path / "hf.gguf", "BF16")
    a, b = tensor_bytes(out), tensor_bytes(tiny_gguf_bf16)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


# ------------------------------------------------------------------- the pipeline and manifest

def test_build_writes_quants_manifest_and_resumes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("build", tiny_checkpoint, "--out", out, "--quants", "q8_0,Q4_K_M", "--name", "tiny")
    assert r.exit_code == 0, r.output
    assert finished_files(out) == ["manifest.json", "tiny-BF16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    m = mf.load(out)
    assert {e.quant for e in m.files} == {"BF16", "Q8_0", "Q4_K_M"}
    assert m.versions["llama-cpp-python"] == "0.3.36" and len(m.source["sha256"]) == 64
    for e in m.files:
        assert e.sha256 == mf.sha256_file(out / e.file) and e.size == (out / e.file).stat().st_size
        assert read_info(out / e.file).file_type_name == e.quant
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}

    # A rerun with one more quant builds only that one.
    res = build(BuildRequest(tiny_checkpoint, out, ["Q8_0", "Q4_K_M", "Q6_K"], name="tiny"))
    assert res.built == ["Q6_K"] and set(res.skipped) == {"Q8_0", "Q4_K_M"}
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.glob("*.gguf") if p.name in mtimes)

    # A damaged output is detected by verify and rebuilt by the next run.
    with open(out / "tiny-Q8_0.gguf", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    v = run_cli("verify", out)
    assert v.exit_code == 4 and "tiny-Q8_0.gguf" in v.output
    res = build(BuildRequest(tiny_checkpoint, out, ["Q8_0"], name="tiny"))
    assert res.built == ["Q8_0"]
    assert run_cli("verify", out).exit_code == 0


def test_build_from_a_bf16_gguf_skips_conversion(tiny_gguf_bf16: Path, tmp_path: Path) -> None:
    res = build(BuildRequest(tiny_gguf_bf16, tmp_path, ["Q8_0"]))
    assert res.built == ["Q8_0"]
    assert finished_files(tmp_path) == ["manifest.json", "tiny-BF16-Q8_0.gguf"]
    assert res.manifest.source["kind"] == "gguf"


def test_a_quantized_gguf_is_refused_as_source(tiny_gguf_bf16: Path, tmp_path: Path) -> None:
    build(BuildRequest(tiny_gguf_bf16, tmp_path / "a", ["Q8_0"], name="t"))
    with pytest.raises(BadInputError, match="quantize from a BF16/F16/F32"):
        build(BuildRequest(tmp_path / "a" / "t-Q8_0.gguf", tmp_path / "b", ["Q4_K_M"]))


def test_interrupted_build_leaves_nothing_that_looks_finished(tiny_checkpoint: Path, tmp_path: Path) -> None:
    class Interrupt:
        """Progress that interrupts (as Ctrl-C would) halfway through the conversion."""

        def task(self, description: str, total: int):
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                if description.startswith("converting") and done[0] > total // 2:
                    raise KeyboardInterrupt

            return advance

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build(BuildRequest(tiny_checkpoint, out, ["Q8_0"], name="tiny"), Interrupt())
    assert not list(out.glob("*.gguf")) and not list(out.glob("*.partial"))
    assert mf.load(out).files == []


def test_imatrix_changes_the_quantization(tiny_gguf_f16: Path, tmp_path: Path) -> None:
    import gguf

    from edge_magistral.build.quantize import quantize

    info = read_info(tiny_gguf_f16)
    w = gguf.GGUFWriter(tmp_path / "imatrix.gguf", arch="imatrix")
    w.add_string("imatrix.datasets", "test")
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(0)
    for t in info.tensors:
        if len(t.shape) == 2 and t.name.startswith("blk."):
            w.add_tensor(t.name + ".in_sum2", (rng.random(t.shape[0]) * 100).astype(np.float32).reshape(1, -1))
            w.add_tensor(t.name + ".counts", np.array([[50.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    plain = quantize(tiny_gguf_f16, tmp_path / "plain.gguf", "Q4_K_M", nthread=2)
    weighted = quantize(tiny_gguf_f16, tmp_path / "weighted.gguf", "Q4_K_M", nthread=2,
                        imatrix=tmp_path / "imatrix.gguf")
    assert plain.stat().st_size == weighted.stat().st_size
    assert plain.read_bytes() != weighted.read_bytes()


# ------------------------------------------------------------------------------- bad input

def _assert_one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output
    for n in needles:
        assert n in lines[0]


def test_missing_params_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, src)
    (src / "params.json").unlink()
    r = run_cli("build", src, "--out", tmp_path / "out")
    _assert_one_line_error(r, 3, "params.json")
    assert finished_files(tmp_path / "out") == []


def test_truncated_safetensors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, src)
    st = src / "consolidated.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 4096)
    r = run_cli("build", src, "--out", tmp_path / "out")
    _assert_one_line_error(r, 4, "truncated")
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_corrupt_gguf(tiny_gguf_bf16: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf_bf16.read_bytes()[: -1024 * 1024])
    _assert_one_line_error(run_cli("build", bad, "--out", tmp_path / "out"), 4, "past the end")
    _assert_one_line_error(run_cli("inspect", bad), 4, "bad.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    _assert_one_line_error(run_cli("inspect", garbage), 4, "not a valid GGUF")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))


def test_unknown_quant_is_refused_before_any_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    r = run_cli("build", tiny_checkpoint, "--out", tmp_path / "out", "--quants", "Q4_K_M,Q9_X")
    _assert_one_line_error(r, 2, "Q9_X", "Q4_K_M")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_as_user(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    _assert_one_line_error(run_cli("build", tiny_checkpoint, "--out", out), 7, "not writable")


def test_unwritable_output_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("build", tiny_checkpoint, "--out", blocker / "sub")
    _assert_one_line_error(r, 7, "not writable")


def _small_fs(tmp_path: Path, size: str) -> Path | None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0
    return mnt if ok else None


def test_short_disk_is_refused_up_front(tiny_checkpoint: Path, tmp_path: Path) -> None:
    mnt = _small_fs(tmp_path, "64m")
    if mnt is None:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = run_cli("build", tiny_checkpoint, "--out", mnt / "out", "--quants", "Q8_0")
        _assert_one_line_error(r, 7, "GiB free")
        assert finished_files(mnt / "out") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="manifest"):
        mf.load(tmp_path)
    _assert_one_line_error(run_cli("verify", tmp_path / "nowhere"), 3, "manifest.json")


# ------------------------------------------------------------ one sha256 loop, one progress protocol


class Recording:
    """The progress protocol: each task's total, and the amounts its ``advance`` was told."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[int]] = {}

    def task(self, description: str, total: int):
        told = self.tasks.setdefault(description, [total])

        def advance(n: int) -> None:
            told.append(n)

        return advance


def test_the_sha256_loop_hashes_in_chunks_and_reports_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from edge_magistral import hashing

    monkeypatch.setattr(hashing, "CHUNK", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: 3 chunks
    p = tmp_path / "f"
    p.write_bytes(data)
    told: list[int] = []
    assert hashing.sha256_file(p, told.append) == hashlib.sha256(data).hexdigest()
    assert told == [1000, 1000, 560]
    with open(p, "rb") as f:
        f.seek(1000)
        assert hashing.sha256_stream(f) == hashlib.sha256(data[1000:]).hexdigest()  # the rest of an open file
    git = hashing.Digest(len(data), etag="0" * 40)  # a non-LFS hub file: its etag is git's blob sha1
    with open(p, "rb") as f:
        git.update_from(f)
    assert git.hexdigest() == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert git.sha256_hex() == hashlib.sha256(data).hexdigest()


def test_the_build_reports_its_hashing_through_the_progress_protocol(tiny_gguf_bf16: Path, tmp_path: Path) -> None:
    rec = Recording()
    build(BuildRequest(tiny_gguf_bf16, tmp_path, ["Q8_0"], name="t"), rec)
    total, *told = rec.tasks["hashing source"]
    assert total == sum(told) == tiny_gguf_bf16.stat().st_size
    total, *told = rec.tasks["hashing t-Q8_0.gguf"]
    assert total == sum(told) == (tmp_path / "t-Q8_0.gguf").stat().st_size
