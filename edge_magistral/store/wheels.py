"""A wheelhouse for another box: ``pip download`` of edge-magistral and every dependency for the
target platform, llama-cpp-python as a wheel if the index has one, else its source."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_magistral import __version__
from edge_magistral.errors import BadInputError, EdgeMagistralError
from edge_magistral.paths import source_root


@dataclass(frozen=True)
class WheelSpec:
    """A wheelhouse for another box: pip's target platform tags and Python version."""

    platforms: tuple[str, ...] = ()  # e.g. manylinux2014_aarch64; empty: this machine
    python_version: str = ""  # e.g. 3.10; empty: this interpreter
    pip_args: tuple[str, ...] = ()  # passed to every pip call (an index mirror, --find-links)


LLAMA = "llama-cpp-python"
LLAMA_BUILD_TOOLS = ("scikit-build-core[pyproject]>=0.9.2", "cmake>=3.21", "ninja")


def _requirements() -> list[str]:
    """edge-magistral's runtime requirements (no extras), as its metadata states them."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("edge-magistral") or []
    except PackageNotFoundError:
        raise BadInputError("edge-magistral is not installed as a package; `pip install .` first") \
            from None
    return [r for r in reqs if "extra ==" not in r]


def _req_name(r: str) -> str:
    m = re.match(r"[A-Za-z0-9._-]+", r)
    return re.sub(r"[-_.]+", "-", m.group(0)).lower() if m else r


def _project_dir() -> Path | None:
    """The source tree this package runs from (an editable install), to build its wheel."""
    root = source_root()
    pp = root / "pyproject.toml"
    return root if pp.is_file() and 'name = "edge-magistral"' in pp.read_text() else None


def pip_commands(spec: WheelSpec, dest: Path, requirements: list[str],
                 project: Path | None) -> tuple[list[list[str]], list[str], list[list[str]]]:
    """(steps, llama-cpp-python as a prebuilt wheel, its fallback: source + build tools).

    pip needs ``--only-binary=:all:`` for a foreign platform; llama-cpp-python publishes source
    only on PyPI, so it gets its own step: a wheel if the index has one for the target, else the
    sdist plus what building it offline takes."""
    pip = [sys.executable, "-m", "pip"]
    pv = spec.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    target = [*(f"--platform={p}" for p in spec.platforms), f"--python-version={pv}", "--implementation=cp",
              "--only-binary=:all:"] if spec.platforms else []
    dl = [*pip, "download", "--dest", str(dest), *spec.pip_args]
    llama = [r for r in requirements if _req_name(r) == LLAMA] or [LLAMA]
    others = [r for r in requirements if _req_name(r) != LLAMA] + _llama_runtime_deps()
    if project is not None:
        self_step = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest),
                     str(project)]
    else:
        self_step = [*dl, "--no-deps", f"edge-magistral=={__version__}"]
    steps = [self_step, [*dl, *target, *others]]
    prebuilt = [*dl, *target, "--no-deps", "--only-binary=:all:", *llama]
    from_source = [[*dl, "--no-deps", "--no-binary=:all:", *llama], [*dl, *target, *LLAMA_BUILD_TOOLS]]
    return steps, prebuilt, from_source


def _llama_runtime_deps() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in (requires(LLAMA) or []) if "extra ==" not in r]
    except PackageNotFoundError:
        return ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]


def _pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _pip_failed(cmd: list[str], r: subprocess.CompletedProcess[str]) -> EdgeMagistralError:
    lines = [x for x in (r.stderr or r.stdout).splitlines() if x.strip()]
    why = next((x for x in reversed(lines) if "ERROR" in x), lines[-1] if lines else f"exit {r.returncode}")
    return EdgeMagistralError(f"pip {cmd[3]} failed: {why.strip()} (it needs the package index; "
                              "--pip-arg=--index-url=URL for a mirror); no bundle was left")


def download_wheels(spec: WheelSpec, dest: Path) -> str:
    """Fill ``dest`` with edge-magistral and every dependency for the target; says how llama-cpp-python
    came (``wheel`` or ``source``)."""
    dest.mkdir(parents=True, exist_ok=True)
    steps, prebuilt, from_source = pip_commands(spec, dest, _requirements(), _project_dir())
    for cmd in steps:
        if (r := _pip(cmd)).returncode != 0:
            raise _pip_failed(cmd, r)
    if _pip(prebuilt).returncode == 0:
        return "wheel"
    for cmd in from_source:
        if (r := _pip(cmd)).returncode != 0:
            raise _pip_failed(cmd, r)
    return "source"
