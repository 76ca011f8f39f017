#!/usr/bin/env python3
"""Build llama.cpp's RPC backend (ggml-rpc) for the installed llama-cpp-python, in seconds.

llama-cpp-python's default build has no RPC backend, and rebuilding it with
``CMAKE_ARGS="-DGGML_RPC=on"`` takes 15-25 minutes on a small box. ggml-rpc is two C++ files that
need only ggml's public headers and ``libggml-base``, so this compiles just them, from the source
of the *installed* version (the RPC protocol and ggml's ABI must match exactly), and puts
``libggml-rpc.so`` beside llama.cpp's libraries, where ``edge_magistral.rpc.backend`` looks.

    python scripts/build_rpc_backend.py                     # fetches the matching sdist from PyPI
    python scripts/build_rpc_backend.py --sdist FILE.tar.gz # offline: a llama-cpp-python sdist
    python scripts/build_rpc_backend.py --source DIR        # offline: an unpacked llama-cpp-python tree

Linux only (on macOS use the RPC build of llama-cpp-python). Needs a C++17 compiler (``$CXX``,
else ``c++``). Written atomically; an existing RPC library (an RPC build's own) is kept unless
``--force``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_magistral.rpc.backend import LIB_NAME, llama_lib_dir  # noqa: E402

GGML = "vendor/llama.cpp/ggml"
NEEDED = (f"{GGML}/include/", f"{GGML}/src/ggml-rpc/")


def _wanted(rel: str) -> bool:
    """ggml's public headers, ggml-rpc's sources and the private headers beside ggml's sources."""
    if rel.startswith(NEEDED):
        return True
    return rel.startswith(f"{GGML}/src/") and rel.count("/") == 4 and rel.endswith(".h")


def extract(sdist: Path, dest: Path) -> Path:
    """Unpack only what the build needs; returns the tree's root."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rel = m.name.partition("/")
            if (m.isfile() or m.isdir()) and _wanted(rel):
                members.append(m)
        if not members:
            raise SystemExit(f"error: {sdist} holds no {GGML}: give a llama-cpp-python sdist")
        tar.extractall(dest, members=members, filter="data")
        return dest / members[0].name.partition("/")[0]


def fetch_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: could not download the llama-cpp-python {version} sdist: "
                         "give --sdist FILE or --source DIR (offline)")
    return next(dest.glob("llama_cpp_python-*.tar.gz"))


def compile_rpc(tree: Path, lib_dir: Path, out: Path) -> None:
    g = tree / GGML
    srcs = [g / "src/ggml-rpc/ggml-rpc.cpp", g / "src/ggml-rpc/transport.cpp"]
    for s in srcs:
        if not s.is_file():
            raise SystemExit(f"error: {s} is missing: this llama.cpp has another RPC layout")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise SystemExit("error: no C++ compiler: install one (Debian: apt-get install g++) or set $CXX")
    base = lib_dir / "libggml-base.so"
    if not base.is_file():
        raise SystemExit(f"error: {base} is missing: is llama-cpp-python installed in this environment?")
    cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-shared",
           "-DGGML_BACKEND_DL", "-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED", "-DGGML_SHARED", "-DGGML_BUILD",
           f"-I{g / 'include'}", f"-I{g / 'src'}", f"-I{g / 'src/ggml-rpc'}", *map(str, srcs),
           "-o", str(out), f"-L{lib_dir}", "-lggml-base", "-Wl,-rpath,$ORIGIN", "-pthread"]
    print("compiling ggml-rpc:", " ".join(cmd[:1] + [s.name for s in srcs]), flush=True)
    subprocess.run(cmd, check=True)


def check(lib: Path) -> None:
    """Load it in a fresh process, as the head and the worker will."""
    code = (f"import os; os.environ['EDGE_MAGISTRAL_RPC_LIB'] = {str(lib)!r}\n"
            "from edge_magistral.rpc import backend\nprint(len(backend.local_devices()), 'local device(s)')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the built library does not load: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help="a llama-cpp-python sdist (.tar.gz) of the installed version")
    ap.add_argument("--source", type=Path, help="an unpacked llama-cpp-python source tree of the installed version")
    ap.add_argument("--out", type=Path, help=f"where to write {LIB_NAME} (default: beside llama.cpp's libraries)")
    ap.add_argument("--force", action="store_true", help="replace an RPC library that is already there")
    a = ap.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("error: Linux only: elsewhere install llama-cpp-python with CMAKE_ARGS=\"-DGGML_RPC=on\"")
    version = importlib.metadata.version("llama-cpp-python")
    lib_dir = llama_lib_dir()
    out = a.out or lib_dir / LIB_NAME
    if out.exists() and not a.force:
        print(f"{out} is present (--force rebuilds it)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if a.source:
            tree = a.source
        else:
            tree = extract(a.sdist or fetch_sdist(version, t), t / "src")
        partial = out.with_name(out.name + ".partial")
        compile_rpc(tree, lib_dir, partial)
        check(partial)
        os.replace(partial, out)
    print(f"{out}: ggml-rpc for llama-cpp-python {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
