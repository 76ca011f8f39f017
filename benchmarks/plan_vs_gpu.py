"""On a CUDA machine: does every plan that says it fits load and run at its full context, and how
close is the predicted GPU memory to what the process really uses?

For each scenario the GPU is made to look like a smaller card by holding "ballast" (GPU memory
allocated through ggml by a helper process) so that only the card's free memory is left. Then it
detects the box, plans with the scenario's profile over Magistral-shaped GGUFs (real header, zero
weights, sparse files), and in a child process loads the model with the plan's settings, fills the
whole planned context (prompt batches), decodes a few tokens, and reports llama.cpp's logged
buffer sizes and the process's GPU memory (nvidia-smi --query-compute-apps).

    source /tmp/llama-env.sh   # written by the CUDA build step (GPU_BUILD_SCRIPT in gpu_run.sh)
    python benchmarks/plan_vs_gpu.py --out "$OUT"

Writes plan_vs_gpu.json to --out (default benchmarks/out/).
"""

from __future__ import annotations

import sys

if len(sys.argv) == 3 and sys.argv[1] == "--child":
    # llama_cpp before numpy: the other order segfaults model loads on CUDA (see edge_magistral/model.py)
    import llama_cpp  # noqa: F401

import argparse
import ctypes
import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, from_gguf_info, tensor_specs  # noqa: E402
from edge_magistral.dryrun import parse_log  # noqa: E402
from edge_magistral.gguf_info import read_info  # noqa: E402
from edge_magistral.hardware import detect, llama_lib_dir  # noqa: E402
from edge_magistral.planner import NoFitError, Request, plan  # noqa: E402
from edge_magistral.profiles import load_profiles  # noqa: E402
from edge_magistral.shaped_gguf import write_shaped_gguf  # noqa: E402
from edge_magistral.units import GiB, MiB  # noqa: E402

QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
# name, profile (None: the matching one), GPU memory to leave free (None: all of it)
SCENARIOS = [
    ("h200", None, None),
    ("24gb", "rtx-24gb", 23.3 * GiB),
    ("16gb", "nvidia-16gb", 15.6 * GiB),
    ("12gb", "nvidia-12gb", 11.6 * GiB),
    ("8gb", "nvidia-8gb", 7.6 * GiB),
]
DECODE_TOKENS = 8


# --------------------------------------------------------------------------------- measurement


def gpu_used_by(pid: int) -> int | None:
    """GPU memory the process holds, per nvidia-smi (None without a GPU)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
    except FileNotFoundError:
        return None
    for line in out.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) == 2 and cols[0] == str(pid):
            return int(cols[1]) * MiB
    return None


def gpu_free() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip().splitlines()[0]) * MiB


def start_ballast(leave_free: float) -> subprocess.Popen[str] | None:
    """A helper process holding GPU memory so that about ``leave_free`` bytes stay free."""
    size = gpu_free() - int(leave_free)
    if size <= 0:
        return None
    p = subprocess.Popen(
        [sys.executable, __file__, "--ballast", str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"ballast failed: {line!r}")
    time.sleep(1)
    return p


def ballast_main(size: int) -> None:
    """Allocate ``size`` bytes on the first GPU through ggml's CUDA backend, then wait."""
    lib = llama_lib_dir()
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.restype = vp
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_buffer_type.restype = vp
    base.ggml_backend_dev_buffer_type.argtypes = [vp]
    base.ggml_backend_buft_alloc_buffer.restype = vp
    base.ggml_backend_buft_alloc_buffer.argtypes = [vp, ctypes.c_size_t]
    dev = ggml.ggml_backend_dev_by_type(1)  # GGML_BACKEND_DEVICE_TYPE_GPU
    buft = base.ggml_backend_dev_buffer_type(dev)
    held, chunk = [], 2 * GiB
    while size > 0:
        n = min(chunk, size)
        buf = base.ggml_backend_buft_alloc_buffer(buft, n)
        if not buf:
            print(f"alloc of {n} failed", flush=True)
            return
        held.append(buf)
        size -= n
    print("ready", flush=True)
    sys.stdin.read()  # hold until the parent closes stdin


# ------------------------------------------------------------------------------- the real load


def run_child(model: str, settings: dict[str, object], timeout_s: float = 900) -> dict[str, object]:
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps({"model": model, **settings})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    log, measured, t0 = [], None, time.time()
    for line in p.stdout:
        log.append(line)
        if line.startswith("edge_magistral: measure"):
            measured = gpu_used_by(p.pid)
            p.stdin.write("go\n")
            p.stdin.flush()
        if time.time() - t0 > timeout_s:
            p.kill()
            break
    rc = p.wait()
    text = "".join(log)
    return {"rc": rc, "gpu_used": measured, "log": text, "filled": "edge_magistral: filled" in text}


def child_main(spec: dict[str, object]) -> int:
    """Load with the plan's settings, fill the context, decode, then wait to be measured."""
    import llama_cpp

    from edge_magistral import llama_log

    llama_log.install()
    with llama_log.listen(lambda line: os.write(1, (line + "\n").encode())):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = int(spec["n_gpu_layers"])  # type: ignore[arg-type]
        model = llama_cpp.llama_model_load_from_file(str(spec["model"]).encode(), mp)
        if not model:
            return 3
        cp = llama_cpp.llama_context_default_params()
        n_ctx, n_batch = int(spec["n_ctx"]), int(spec["n_batch"])  # type: ignore[arg-type]
        cp.n_ctx, cp.n_batch, cp.n_ubatch = (
            n_ctx,
            min(n_ctx, n_batch),
            min(n_ctx, n_batch, int(spec["n_ubatch"])),
        )  # type: ignore[arg-type]
        kv = {"f16": 1, "q8_0": 8, "q4_0": 2}
        cp.type_k, cp.type_v = kv[str(spec["type_k"])], kv[str(spec["type_v"])]
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if spec["flash_attn"] else 0
        cp.n_threads = cp.n_threads_batch = os.cpu_count() or 4
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            return 4
        batch = llama_cpp.llama_batch_init(cp.n_batch, 0, 1)
        pos, n_prompt = 0, n_ctx - DECODE_TOKENS
        while pos < n_prompt:
            n = min(cp.n_batch, n_prompt - pos)
            _fill(batch, pos, n)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                print(f"edge_magistral: decode failed at {pos}", flush=True)
                return 5
            pos += n
        for _ in range(DECODE_TOKENS):
            _fill(batch, pos, 1)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                return 5
            pos += 1
        llama_cpp.llama_synchronize(ctx)
        print(f"edge_magistral: filled {pos} of {n_ctx}", flush=True)
        print("edge_magistral: measure", flush=True)
        sys.stdin.readline()
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return 0


def _fill(batch, pos: int, n: int) -> None:  # noqa: ANN001 (llama_batch)
    for i in range(n):
        batch.token[i] = 1000 + (pos + i) % 120000
        batch.pos[i] = pos + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == n - 1
    batch.n_tokens = n


# ---------------------------------------------------------------------------------- scenarios


def scenario(
    name: str, profile_name: str | None, leave_free: float | None, files: dict[str, Path], ctx: int | None
) -> dict[str, object]:
    ballast = start_ballast(leave_free) if leave_free else None
    try:
        hw = detect()
        profiles = load_profiles()
        from edge_magistral.profiles import choose_profile

        profile = choose_profile(hw, profiles, profile_name)
        cands = [from_gguf_info(read_info(p)) for p in files.values()]
        try:
            p = plan(hw, profile, cands, Request(ctx=ctx, parallel=1))
        except NoFitError as e:
            return {"scenario": name, "profile": profile.name, "fits": False, "refusal": str(e)}
        settings = {
            k: getattr(p, k)
            for k in ("n_gpu_layers", "n_ctx", "type_k", "type_v", "flash_attn", "n_batch", "n_ubatch")
        }
        run = run_child(p.model_path, settings)
        logged = parse_log(str(run["log"]))
        gpu = next((d for d in p.memory if d.device != "CPU"), None)
        pred = (
            {
                "weights": gpu.weights,
                "kv_cache": gpu.kv_cache,
                "compute": gpu.compute,
                "overhead": gpu.overhead,
                "total": gpu.total,
            }
            if gpu
            else {}
        )
        dev = gpu.device if gpu else "CUDA0"
        actual = {
            "weights": logged.model_buffers.get(dev, 0),
            "compute": logged.compute_buffers.get(dev, 0),
            "kv_cache": _kv_on(logged, dev),
            "process_gpu_used": run["gpu_used"],
        }
        err = None
        if run["gpu_used"] and pred:
            err = pred["total"] / int(run["gpu_used"]) - 1  # type: ignore[arg-type]
        host = next(d for d in p.memory if d.device == "CPU")
        return {
            "scenario": name,
            "profile": profile.name,
            "fits": True,
            "quant": p.quant,
            **settings,
            "gpu_free_seen": [g.free_bytes for g in hw.runnable_gpus()],
            "predicted_gpu": pred,
            "predicted_host": {"weights": host.weights, "kv_cache": host.kv_cache, "compute": host.compute},
            "llama_cpp_gpu": actual,
            "llama_cpp_buffers": {
                "model": logged.model_buffers,
                "compute": logged.compute_buffers,
                "kv_total": logged.kv_bytes,
            },
            "ran_full_context": bool(run["filled"]) and run["rc"] == 0,
            "rc": run["rc"],
            "error_total_vs_process": err,
            "log_tail": "".join(str(run["log"]).splitlines(True)[-15:]) if run["rc"] else "",
        }
    finally:
        if ballast is not None:
            assert ballast.stdin is not None
            ballast.stdin.close()
            ballast.wait(timeout=60)


def _kv_on(logged, dev: str) -> int:  # noqa: ANN001 (DryRunResult)
    import re

    m = re.findall(rf"llama_kv_cache:\s+{re.escape(dev)} KV buffer size =\s+([0-9.]+) MiB", logged.log)
    return round(sum(float(x) for x in m) * MiB)


BRIEF = ("scenario", "profile", "fits", "quant", "n_gpu_layers", "n_ctx", "type_k", "ran_full_context",
         "error_total_vs_process", "seconds")


def per_model(models: list[str], ctxs: list[int], out: Path) -> None:
    """Each model alone, each context required: predicted vs measured on the whole GPU."""
    results = []
    for m in models:
        info = read_info(m)
        for ctx in ctxs:
            t0 = time.time()
            r = scenario(f"{info.file_type_name}-{ctx}", None, None, {info.file_type_name: Path(m)}, ctx)
            r["seconds"] = round(time.time() - t0, 1)
            r["model_bytes"] = info.file_size
            results.append(r)
            print(json.dumps({k: r.get(k) for k in BRIEF}), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            name = f"plan_vs_gpu_{Path(m).stem}.json" if len(models) == 1 else "plan_vs_gpu_models.json"
            (out / name).write_text(json.dumps(results, indent=1, default=str))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ballast":
        ballast_main(int(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(json.loads(sys.argv[2])))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--workdir", default="/tmp/plan_vs_gpu")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--ctx", type=int, default=None, help="require this context (smoke tests)")
    ap.add_argument("--vocab-from", default=None, help="copy the tokenizer of this GGUF (a real Tekken vocab)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of Magistral's width (smoke tests)")
    ap.add_argument("--models", default="", help="comma-separated GGUFs (e.g. the build pipeline's quants): plan "
                    "each alone on the whole GPU at every --ctxs context instead of the scenarios")
    ap.add_argument("--ctxs", default="8192,40960", help="contexts for --models")
    args = ap.parse_args()
    if args.models:
        per_model(args.models.split(","), [int(c) for c in args.ctxs.split(",")], Path(args.out))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    arch = replace(MAGISTRAL_SMALL_1_1, n_layers=2) if args.tiny else MAGISTRAL_SMALL_1_1
    files = {}
    for q in QUANTS:
        path = work / f"Magistral-shaped-{arch.n_layers}L-{q}.gguf"
        if not path.exists():
            write_shaped_gguf(path, arch, tensor_specs(arch, q), q, vocab_from=args.vocab_from)
        files[q] = path
    wanted = [s for s in SCENARIOS if not args.only or s[0] in args.only.split(",")]
    results = []
    for name, prof, leave in wanted:
        t0 = time.time()
        r = scenario(name, prof, leave, files, args.ctx)
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in BRIEF}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_vs_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'plan_vs_gpu.json'}")


if __name__ == "__main__":
    main()
