"""The planner's memory model against llama.cpp's own dry run (no_alloc) on Magistral-shaped GGUFs,
and for parallel slots (the engine's n_slots + 1 KV streams) on the tiny model too.

The GGUFs carry Magistral Small 1.1's real tensor shapes and each quant's real tensor types (the
header is exact) but sparse, all-zero data, so a "14 GB" file costs a few MB and llama.cpp's dry
run reads only the header.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, catalog, tensor_specs
from edge_magistral.dryrun import DryRunRequest, compare, dry_run, parse_log
from edge_magistral.errors import BackendError, ModelNotFoundError
from edge_magistral.gguf_info import read_info
from edge_magistral.shaped_gguf import write_shaped_gguf

pytest.importorskip("llama_cpp")

QUANTS = ["Q8_0", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shaped")
    arch = MAGISTRAL_SMALL_1_1
    return {q: write_shaped_gguf(d / f"magistral-{q}.gguf", arch, tensor_specs(arch, q), q) for q in QUANTS}


def test_shaped_files_are_header_true_and_sparse(shaped: dict[str, Path]) -> None:
    cat = {c.quant: c for c in catalog(QUANTS)}
    for q, path in shaped.items():
        info = read_info(path)  # the project's bounded pre-check passes too
        assert info.bytes_per_layer == cat[q].bytes_per_layer
        assert info.token_embd_bytes == cat[q].token_embd_bytes and info.output_bytes == cat[q].output_bytes
        assert info.file_type_name == q
        assert os.stat(path).st_blocks * 512 < 32 * 1024 * 1024 < info.file_size  # a hole, not gigabytes


def _grid() -> list[tuple[str, int, int, str, bool]]:
    rows = [
        (q, ctx, 0, kv, True)
        for q, ctx, kv in itertools.product(QUANTS, [4096, 32768, 131072], ["f16", "q8_0", "q4_0"])
    ]
    rows += [
        (q, 16384, 41, "f16", True) for q in QUANTS
    ]  # n_gpu_layers asks for the GPU; this build has none
    rows += [("Q4_K_M", ctx, 0, "f16", False) for ctx in (4096, 32768, 131072)]  # flash attention off
    return rows


def test_prediction_within_5_percent_of_llama_cpp_dry_run(shaped: dict[str, Path]) -> None:
    rows = _grid()
    reqs = [DryRunRequest(str(shaped[q]), ctx, ngl, kv, kv, fa) for q, ctx, ngl, kv, fa in rows]
    with ThreadPoolExecutor(max_workers=2) as ex:  # each dry run is its own process
        results = list(ex.map(compare, reqs))
    errs = [c.errors() for c in results]
    worst = {k: max(abs(e[k]) for e in errs) for k in errs[0]}
    mean_compute = sum(abs(e["compute"]) for e in errs) / len(errs)
    print(f"\n{len(rows)} dry runs; worst error {worst}; mean compute error {mean_compute:.2%}")
    for row, e in zip(rows, errs, strict=True):
        for k, v in e.items():
            assert abs(v) <= TOLERANCE, f"{row}: {k} predicted {v:+.1%} off llama.cpp's dry run"
    assert worst["weights"] == 0 and worst["kv_cache"] < 1e-4  # these follow exactly from the header
    assert all(e["compute"] >= 0 for e in errs), "compute buffers are predicted on the safe side"


def test_catalog_matches_the_file_llama_cpp_sees(shaped: dict[str, Path]) -> None:
    r = dry_run(DryRunRequest(str(shaped["Q4_K_M"]), 4096))
    assert r.model_size == catalog(["Q4_K_M"])[0].weight_bytes
    assert r.kv_cells == 4096 and r.n_ctx == 4096


def test_failed_load_is_an_error_not_a_crash(tmp_path: Path) -> None:
    arch = MAGISTRAL_SMALL_1_1
    specs = [s for s in tensor_specs(arch, "Q4_K_M") if s.name != "blk.3.ffn_down.weight"]  # a tensor missing
    bad = write_shaped_gguf(tmp_path / "bad.gguf", arch, specs, "Q4_K_M")
    with pytest.raises(BackendError, match="dry run failed"):
        dry_run(DryRunRequest(str(bad), 4096))
    with pytest.raises(ModelNotFoundError):
        dry_run(DryRunRequest(str(tmp_path / "missing.gguf"), 4096))


def test_parse_log_reads_gpu_buffer_lines() -> None:
    # the lines a real CUDA load logs (format of llama.cpp 0c1e57098; sizes from an H200 run)
    log = (
        "load_tensors: layer  39 assigned to device CUDA0, is_swa = 0\n"
        "load_tensors: layer  40 assigned to device CUDA0, is_swa = 0\n"
        "load_tensors:        CUDA0 model buffer size = 13302.00 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =   360.00 MiB\n"
        "llama_context:  CUDA_Host  output buffer size =     0.50 MiB\n"
        "llama_kv_cache: layer  39: dev = CUDA0\n"
        "llama_kv_cache:      CUDA0 KV buffer size =  5120.00 MiB\n"
        "llama_kv_cache: size = 5120.00 MiB ( 32768 cells,  40 layers,  1/1 seqs), K (f16): 2560.00 MiB, "
        "V (f16): 2560.00 MiB\n"
        "sched_reserve:      CUDA0 compute buffer size =   266.00 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    74.01 MiB\n"
    )
    r = parse_log(log)
    mib = 1024 * 1024
    assert r.model_buffers == {"CUDA0": 13302 * mib, "CPU_Mapped": 360 * mib}
    assert r.kv_bytes == 5120 * mib and r.kv_cells == 32768 and r.kv_k_bytes == 2560 * mib
    assert r.compute_buffers == {"CUDA0": 266 * mib, "CUDA_Host": round(74.01 * mib)}
    assert r.output_buffers == {"CUDA_Host": mib // 2}
    assert r.layer_devices == ["CUDA0", "CUDA0"] and r.kv_devices == ["CUDA0"]


# ------------------------------------------------------------------------------ parallel slots

def _slot_rows(shaped: dict[str, Path], tiny: Path) -> list[DryRunRequest]:
    rows = [DryRunRequest(str(tiny), ctx, n_slots=n, flash_attn=fa)
            for ctx, n, fa in itertools.product([1000, 4096], [1, 2, 4], [True, False])]
    rows += [DryRunRequest(str(shaped["Q4_K_M"]), ctx, type_k=kv, type_v=kv, n_slots=n)
             for ctx, n, kv in [(4096, 2, "f16"), (32768, 4, "f16"), (32768, 4, "q8_0")]]
    return rows  # Magistral's shape at 1 slot: the grid above


def test_slots_prediction_within_5_percent_of_llama_cpp_dry_run(shaped: dict[str, Path], tiny_gguf_f16: Path
                                                                 ) -> None:
    """N slots: llama.cpp allocates N + 1 KV streams (each padded to 256 cells), one logits row per
    stream and a compute buffer for a ubatch split across the streams; the plan must say the same."""
    reqs = _slot_rows(shaped, tiny_gguf_f16)
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(compare, reqs))
    worst = {k: max(abs(c.errors()[k]) for c in results) for k in results[0].predicted}
    print(f"\n{len(reqs)} slot dry runs; worst error {worst}")
    for c in results:
        for k, v in c.errors().items():
            assert abs(v) <= TOLERANCE, f"{c.request}: {k} predicted {v:+.1%} off llama.cpp's dry run"
    assert worst["weights"] == 0 and worst["kv_cache"] < 1e-4
    by = {(c.request.model_path, c.request.n_ctx, c.request.type_k, c.request.flash_attn, c.request.n_slots): c
          for c in results}
    for (path, ctx, kv, fa, n), c in by.items():  # the KV cache grows by whole streams, as predicted
        one = by.get((path, ctx, kv, fa, 1))
        if one is not None:
            assert c.llama_cpp["kv_cache"] == (n + 1 if n > 1 else 1) * one.llama_cpp["kv_cache"]


def test_dry_run_of_slots_builds_batch_engines_context(tiny_gguf_f16: Path) -> None:
    r = dry_run(DryRunRequest(str(tiny_gguf_f16), 1000, n_slots=2))
    assert (r.kv_streams, r.kv_cells, r.n_ctx) == (3, 1024, 3072)  # 3000 padded to 3072, 1024 per stream
    one = dry_run(DryRunRequest(str(tiny_gguf_f16), 1000))
    assert (one.kv_streams, one.kv_cells) == (1, 1024)
    assert r.output_buffers["CPU"] == 3 * one.output_buffers["CPU"]  # one logits row per stream
