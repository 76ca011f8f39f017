"""Memory bandwidth of this box, and the bandwidth floor of token generation (issue 7).

Generating one token reads every weight once: decode at batch 1 is memory bound, so
``bytes read per token ÷ bandwidth`` is the fastest generation can be (the "floor" on the time per
token; as tokens/s, a ceiling). llama-bench's tg128 as a percentage of that ceiling says how close
llama.cpp's kernels come to the hardware.

Bytes read per token (:func:`bytes_per_token`): every tensor of the GGUF, except the token
embedding, which is only gathered (one row per token), unless the model has no ``output.weight``
(tied embeddings, e.g. SmolLM2), where it is also the output projection and read whole. The KV
cache read at the short depths of tg128 (at most 128 cells: ``2 × layers × kv_heads × head_dim ×
2 bytes`` per cell in f16) is reported apart and left out of the floor: for Magistral Small it
is 160 KiB a cell, ~10 MB at the mean depth of 64, against ~14 GB of Q4_K_M weights (0.07%).

Bandwidth (:func:`measure`):
- NVIDIA GPU: a device-to-device copy of a 2 GiB buffer (``dst.copy_(src)``) timed with CUDA
  events, best of N, counted as bytes read + bytes written ÷ time; and a read-only pass (a sum of
  the same buffer as float32). Uses torch (or cupy) in a subprocess of its own, never in a process
  that loads llama_cpp.
- CPU: numpy ``copyto`` of 1 GiB arrays (read + write), one thread and all threads (the array split
  into per-thread chunks; numpy releases the GIL while copying), best of N, the better of the two;
  and a read-only sum. Other processes on the box lower it: run it when the box is quiet.

    python benchmarks/bandwidth.py [--out benchmarks/out/bandwidth.json] [--no-gpu] [--model M ...]

Nothing here imports numpy or llama_cpp at module level, so the floor functions can be imported
from anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
OUT = Path(__file__).resolve().parent / "out" / "bandwidth.json"
KV_BYTES_F16 = 2


# ----------------------------------------------------------------------------- the floor

def bytes_per_token(model_path: str | os.PathLike[str]) -> dict:
    """Bytes one generated token reads from the GGUF's weights, from its header alone.

    Returns weights (the floor's numerator), the token-embedding bytes left out (or counted, when
    tied), whether the output is tied, and the KV bytes read per cell of depth (f16 K and V)."""
    from edge_magistral.gguf_info import read_info

    info = read_info(model_path)
    names = {t.name for t in info.tensors}
    tied = "output.weight" not in names
    embd = sum(t.n_bytes for t in info.tensors if t.name.startswith("token_embd"))
    row = embd // info.n_vocab if info.n_vocab else 0
    weights = info.tensor_bytes - embd + (embd if tied else row)
    kv_per_cell = 2 * info.n_layers * info.n_head_kv * info.head_dim * KV_BYTES_F16
    return {"model": str(model_path), "quant": info.file_type_name, "file_size": info.file_size,
            "tensor_bytes": info.tensor_bytes, "weights_read_bytes": weights, "token_embd_bytes": embd,
            "tied_output": tied, "kv_bytes_per_cell_f16": kv_per_cell, "n_layers": info.n_layers}


def floor_tokens_per_s(weights_read_bytes: float, bw_gbps: float, kv_bytes: float = 0.0) -> float:
    """The most tokens/s a memory-bound decode can reach: bandwidth ÷ bytes read per token."""
    return bw_gbps * GB / (weights_read_bytes + kv_bytes)


def bandwidth_floor(model_path: str | os.PathLike[str], bw_gbps: float, depth: int = 0) -> dict:
    """The bandwidth floor of ``model_path`` at ``bw_gbps`` GB/s: bytes per token and the max t/s.
    ``depth``: KV cells read per token (0: left out, as for tg128 where it is negligible)."""
    b = bytes_per_token(model_path)
    kv = b["kv_bytes_per_cell_f16"] * depth
    return {**b, "bandwidth_gbps": bw_gbps, "kv_read_bytes": kv,
            "seconds_per_token": (b["weights_read_bytes"] + kv) / (bw_gbps * GB),
            "max_tokens_per_s": floor_tokens_per_s(b["weights_read_bytes"], bw_gbps, kv)}


def percent_of_floor(tokens_per_s: float, weights_read_bytes: float, bw_gbps: float) -> float:
    """A measured generation rate as a percentage of the bandwidth ceiling."""
    return 100.0 * tokens_per_s / floor_tokens_per_s(weights_read_bytes, bw_gbps)


# ------------------------------------------------------------------------------- measuring

def cpu_bandwidth(size_bytes: int = 1 << 30, repeats: int = 10, threads: int | None = None) -> dict:
    """numpy copy (read + write) and read-only bandwidth of host memory, best of ``repeats``."""
    import threading

    import numpy as np

    threads = threads or os.cpu_count() or 1
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def parallel(fn, n: int):
        bounds = np.linspace(0, src.size, n + 1).astype(int)

        def run():
            ts = [threading.Thread(target=fn, args=(slice(bounds[i], bounds[i + 1]),)) for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return run

    def copy(s: slice) -> None:
        np.copyto(dst[s], src[s])

    def read(s: slice) -> None:
        src[s].sum()

    out = {"size_bytes": src.nbytes, "repeats": repeats, "threads": threads, "method": "numpy copyto / sum"}
    out["copy_gbps_1thread"] = 2 * src.nbytes / best(lambda: np.copyto(dst, src)) / GB
    out["read_gbps_1thread"] = src.nbytes / best(lambda: src.sum()) / GB
    if threads > 1:
        out[f"copy_gbps_{threads}threads"] = 2 * src.nbytes / best(parallel(copy, threads)) / GB
        out[f"read_gbps_{threads}threads"] = src.nbytes / best(parallel(read, threads)) / GB
    # what the box delivers: the better of one thread and all (a busy neighbour can spoil either)
    out["copy_gbps"] = max(v for k, v in out.items() if k.startswith("copy_gbps_"))
    out["read_gbps"] = max(v for k, v in out.items() if k.startswith("read_gbps_"))
    return out


# Runs in a subprocess of its own (torch or cupy never share a process with llama_cpp).
_GPU_SCRIPT = r"""
import json, sys
size, repeats = int(sys.argv[1]), int(sys.argv[2])
out = {}
try:
    import torch
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    src = torch.ones(size // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    def best(fn):
        fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return min(ts)
    n = src.numel() * 4
    out["copy_gbps"] = 2 * n / best(lambda: dst.copy_(src)) / 1e9
    out["read_gbps"] = n / best(lambda: src.sum()) / 1e9
    p = torch.cuda.get_device_properties(0)
    out.update(method="torch copy_ / sum, CUDA events", name=p.name, total_memory=p.total_memory,
               torch=torch.__version__, cuda=torch.version.cuda)
except Exception as e:
    out["torch_error"] = repr(e)
    import cupy as cp
    src = cp.ones(size // 4, dtype=cp.float32); dst = cp.empty_like(src)
    def best(fn):
        fn(); cp.cuda.Device().synchronize()
        ts = []
        for _ in range(repeats):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(); fn(); b.record(); b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
        return min(ts)
    n = src.nbytes
    out["copy_gbps"] = 2 * n / best(lambda: cp.copyto(dst, src)) / 1e9
    out["read_gbps"] = n / best(lambda: src.sum()) / 1e9
    out.update(method="cupy copyto / sum, CUDA events", name=cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
out.update(size_bytes=size, repeats=repeats)
print(json.dumps(out))
"""


def gpu_bandwidth(size_bytes: int = 2 << 30, repeats: int = 20, python: str = sys.executable) -> dict:
    """Device-to-device copy and read bandwidth of GPU 0, measured in a subprocess."""
    p = subprocess.run([python, "-c", _GPU_SCRIPT, str(size_bytes), str(repeats)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def gpu_info() -> dict | None:
    """The NVIDIA GPU(s) and driver from nvidia-smi (None without one)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return {"gpus": [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]} if rows else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(gpu: bool | None = None, cpu_size: int = 1 << 30, gpu_size: int = 2 << 30, repeats: int = 10) -> dict:
    """CPU bandwidth always; GPU bandwidth when an NVIDIA GPU is seen (or ``gpu`` is True)."""
    info = gpu_info()
    out: dict = {"kind": "bandwidth", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                 "cpu_name": cpu_name(), "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
                 "gpu_info": info}
    out["cpu"] = cpu_bandwidth(cpu_size, repeats)
    if gpu or (gpu is None and info):
        out["gpu"] = gpu_bandwidth(gpu_size, max(repeats, 20))
    out["loadavg_after"] = list(os.getloadavg())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-gpu", action="store_true", help="CPU only, even when a GPU is present")
    ap.add_argument("--cpu-mib", type=int, default=1024, help="size of each CPU array")
    ap.add_argument("--gpu-mib", type=int, default=2048, help="size of each GPU buffer")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", action="append", default=[], help="also give the floor of this GGUF (repeatable)")
    a = ap.parse_args()
    r = measure(False if a.no_gpu else None, a.cpu_mib << 20, a.gpu_mib << 20, a.repeats)
    c = r["cpu"]
    print(f"CPU ({r['cpu_name']}, {c['threads']} threads): copy {c['copy_gbps']:.1f} GB/s, "
          f"read {c['read_gbps']:.1f} GB/s; " + ", ".join(f"{k} {v:.1f}" for k, v in c.items() if "gbps_" in k))
    if "gpu" in r:
        g = r["gpu"]
        print(f"GPU: {g}" if "error" in g else
              f"GPU ({g.get('name')}): copy {g['copy_gbps']:.0f} GB/s, read {g['read_gbps']:.0f} GB/s")
    floors = []
    for m in a.model:
        for dev in ("cpu", "gpu"):
            bw = r.get(dev, {}).get("copy_gbps")
            if bw:
                f = bandwidth_floor(m, bw)
                floors.append({"device": dev, **f})
                print(f"{Path(m).name} on {dev}: {f['weights_read_bytes'] / 1e6:.1f} MB/token → "
                      f"at most {f['max_tokens_per_s']:.1f} t/s")
    if floors:
        r["floors"] = floors
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
