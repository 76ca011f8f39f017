"""Hardware profiles: policy for a class of box, kept apart from the planner's arithmetic.

A profile says how it recognises a box (``match``), how much memory to leave free, which quants
to prefer, the context to aim for and the least it accepts, the KV cache type, the think budget,
threads, and ``parallel``: how many requests the service decodes at once by default (the planner
lowers it to what fits; 1 on small boxes, where every byte goes to context), ``speculate``: the
default speculative decoding (ngram, draft when a draft model is given, off) and
``draft_recommended`` with ``draft_reason``: whether a draft model pays on this class of box, and
why, in one line (the planner reports it). Profiles live in
``profiles/*.yaml`` (built in) and in a user directory (``$EDGE_MAGISTRAL_PROFILES`` or
``~/.config/edge-magistral/profiles``) whose files add profiles or replace built-in ones of the
same name. Every file is validated on load; a broken one is an error
naming the file and the field.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edge_magistral.catalog import QUALITY_ORDER
from edge_magistral.errors import BadInputError
from edge_magistral.generation import SPECULATE_MODES
from edge_magistral.units import GiB

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware


def _builtin_dir() -> Path:
    """The repository's profiles/ (a checkout or an editable install); else the copy a wheel
    installs under ``<prefix>/share/edge-magistral/profiles`` (pyproject's data-files)."""
    src = Path(__file__).resolve().parent.parent / "profiles"
    return src if src.is_dir() else Path(sys.prefix) / "share" / "edge-magistral" / "profiles"


BUILTIN_DIR = _builtin_dir()
KV_TYPES = ("f16", "q8_0", "q4_0")
QUANTS = tuple(QUALITY_ORDER)  # the quant names a profile may list
GPU_KINDS = ("none", "discrete", "unified", "any")
MAX_PARALLEL = 64  # decoding slots; llama.cpp allows 255 sequences, one is the prefix cache


@dataclass(frozen=True)
class Match:
    """How a profile recognises a box; every given condition must hold."""

    gpu: str = "any"  # none | discrete | unified | any: the kind of the largest usable GPU
    vendor: str | None = None  # nvidia | amd | apple
    name_regex: str | None = None  # against the largest GPU's name, or the board for Jetson
    gpu_gib: tuple[float, float] | None = None  # [min, max] total memory of the largest GPU
    ram_gib: tuple[float, float] | None = None  # [min, max] total RAM
    jetson: bool | None = None


@dataclass(frozen=True)
class Profile:
    """Policy for one class of box (see the module docstring)."""

    name: str
    description: str
    match: Match
    priority: int = 0  # the highest-priority matching profile wins
    reserve_gpu_mib: int = 512  # leave free on each discrete GPU
    reserve_ram_mib: int = 2048  # leave free in RAM (or the unified pool)
    quants: tuple[str, ...] = ("Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M")
    target_ctx: int = 32768
    min_ctx: int = 8192
    kv_type: str = "f16"  # the first choice; q8_0 then q4_0 are tried when memory binds
    allow_kv_quant: bool = True
    flash_attn: bool = True
    think_budget: int = 16384
    threads: str | int = "physical"  # physical | logical | a number
    n_batch: int = 512
    n_ubatch: int = 512
    parallel: int = 1  # default decoding slots for the service (the planner lowers it to what fits)
    min_tokens_per_s: float = 3.0  # partial offloads slower than this are a last resort
    gpu_efficiency: float = 0.6  # share of memory bandwidth decoding achieves
    cpu_bandwidth_gbs: float = 40.0  # host memory bandwidth, for predicted tokens/s
    speculate: str = "ngram"  # ngram | draft (used when a draft model is given, else ngram) | off
    draft_recommended: bool = False  # whether a draft model pays on this class of box
    draft_reason: str = ""  # why (or why not), in one line
    source: str = ""  # the file it came from

    def matches(self, hw: Hardware) -> bool:
        return match_score(self.match, hw)

    def threads_for(self, hw: Hardware) -> int:
        if isinstance(self.threads, int):
            return self.threads
        n = hw.cpu.cores_physical if self.threads == "physical" else hw.cpu.cores_logical
        return max(1, n or os.cpu_count() or 1)


def _largest_gpu(hw: Hardware):  # noqa: ANN202 (GPUInfo | None)
    gpus = hw.runnable_gpus()
    return max(gpus, key=lambda g: g.total_bytes) if gpus else None


def match_score(m: Match, hw: Hardware) -> bool:
    """Does the box satisfy every condition of ``m``?"""
    g = _largest_gpu(hw)
    kind = "none" if g is None else ("unified" if g.unified else "discrete")
    if m.gpu != "any" and m.gpu != kind:
        return False
    if m.vendor and (g is None or g.vendor != m.vendor):
        return False
    if m.name_regex:
        text = (g.name if g else "") + " " + hw.board
        if not re.search(m.name_regex, text, re.I):
            return False
    if m.gpu_gib and (g is None or not _within(g.total_bytes, m.gpu_gib)):
        return False
    if m.ram_gib and not _within(hw.ram_total_bytes, m.ram_gib):
        return False
    if m.jetson is not None and m.jetson != hw.is_jetson:
        return False
    return True


def _within(n_bytes: int, bounds: tuple[float, float]) -> bool:
    return bounds[0] * GiB <= n_bytes <= bounds[1] * GiB


# ------------------------------------------------------------------------------------ validation


class _Fields:
    """Reads typed fields out of one YAML mapping, naming the file and field on any error."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix
        self.seen: set[str] = set()

    def fail(self, key: str, why: str) -> BadInputError:
        return BadInputError(f"{self.source}: field '{self.prefix}{key}' {why}")

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
        v = self.get(key, default)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {v!r}")
        if choices and v not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def int(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}, got {v!r}")
        return v

    def float(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(key, f"must be a number from {lo} to {hi}, got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool | None) -> Any:
        v = self.get(key, default)
        if v is not None and not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {v!r}")
        return v

    def range(self, key: str) -> tuple[float, float] | None:
        v = self.get(key)
        if v is None:
            return None
        if (
            not isinstance(v, list)
            or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            or v[0] > v[1]
            or v[0] < 0
        ):
            raise self.fail(key, f"must be [min, max] in GiB, got {v!r}")
        return float(v[0]), float(v[1])

    def mapping(self, key: str) -> _Fields:
        v = self.get(key, {})
        if not isinstance(v, dict):
            raise self.fail(key, f"must be a mapping, got {v!r}")
        return _Fields(v, self.source, f"{self.prefix}{key}.")

    def done(self) -> None:
        unknown = set(self.data) - self.seen
        if unknown:
            raise self.fail(sorted(unknown)[0], "is not a known field (typo?)")


def parse_profile(data: Any, source: str) -> Profile:
    """Validate one profile mapping; every problem names the file and the field."""
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: a profile must be a YAML mapping")
    f = _Fields(data, source)
    name = f.str("name")
    if not name or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise f.fail("name", f"must be lower-case letters, digits and dashes, got {name!r}")
    m = f.mapping("match")
    regex = m.str("name_regex")
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise m.fail("name_regex", f"is not a valid regular expression ({e})") from None
    match = Match(
        gpu=m.str("gpu", "any", GPU_KINDS),
        vendor=m.str("vendor", None, ("nvidia", "amd", "apple", "intel")),
        name_regex=regex,
        gpu_gib=m.range("gpu_gib"),
        ram_gib=m.range("ram_gib"),
        jetson=m.bool("jetson", None),
    )
    m.done()
    r = f.mapping("reserve")
    reserve_gpu, reserve_ram = r.int("gpu_mib", 512, 0, 1 << 20), r.int("ram_mib", 2048, 0, 1 << 22)
    r.done()
    c = f.mapping("context")
    target, minimum = c.int("target", 32768, 512, 1 << 20), c.int("min", 8192, 512, 1 << 20)
    c.done()
    if minimum > target:
        raise f.fail("context.min", f"({minimum}) is larger than context.target ({target})")
    quants = f.get("quants", list(Profile.quants))
    if not isinstance(quants, list) or not quants or any(q not in QUANTS for q in quants):
        raise f.fail(
            "quants", f"must be a non-empty list of quant names from {', '.join(QUANTS)}, got {quants!r}"
        )
    threads = f.get("threads", "physical")
    if not (
        threads in ("physical", "logical")
        or (isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= 1024)
    ):
        raise f.fail("threads", f"must be physical, logical or a number from 1 to 1024, got {threads!r}")
    p = Profile(
        name=name,
        description=f.str("description", "") or "",
        match=match,
        priority=f.int("priority", 0, -1000, 1000),
        reserve_gpu_mib=reserve_gpu,
        reserve_ram_mib=reserve_ram,
        quants=tuple(quants),
        target_ctx=target,
        min_ctx=minimum,
        kv_type=f.str("kv_type", "f16", KV_TYPES),
        allow_kv_quant=f.bool("allow_kv_quant", True),
        flash_attn=f.bool("flash_attn", True),
        think_budget=f.int("think_budget", 16384, 0, 1 << 20),
        threads=threads,
        n_batch=f.int("n_batch", 512, 32, 8192),
        n_ubatch=f.int("n_ubatch", 512, 32, 8192),
        parallel=f.int("parallel", 1, 1, MAX_PARALLEL),
        min_tokens_per_s=f.float("min_tokens_per_s", 3.0, 0, 10000),
        gpu_efficiency=f.float("gpu_efficiency", 0.6, 0.01, 1.0),
        cpu_bandwidth_gbs=f.float("cpu_bandwidth_gbs", 40.0, 0.1, 10000),
        **_speculation(f),
        source=source,
    )
    f.done()
    if p.n_ubatch > p.n_batch:
        raise f.fail("n_ubatch", f"({p.n_ubatch}) is larger than n_batch ({p.n_batch})")
    return p


MAX_REASON = 200  # draft_reason: one line the plan prints


def _speculation(f: _Fields) -> dict[str, Any]:
    """speculate, draft_recommended and draft_reason, checked together: a profile that defaults
    to a draft must recommend one, and the reason is one line."""
    mode = f.str("speculate", "ngram", SPECULATE_MODES)
    recommended = f.bool("draft_recommended", False)
    reason = f.str("draft_reason", "") or ""
    if "\n" in reason.strip() or len(reason) > MAX_REASON:
        raise f.fail("draft_reason", f"must be one line of at most {MAX_REASON} characters")
    if mode == "draft" and not recommended:
        raise f.fail("speculate", "is draft but draft_recommended is false; recommend the draft or use ngram")
    return {"speculate": mode, "draft_recommended": recommended, "draft_reason": reason.strip()}


def load_profile_file(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read profile ({e})") from None
    return parse_profile(data, str(path))


def user_dir() -> Path:
    env = os.environ.get("EDGE_MAGISTRAL_PROFILES")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "edge-magistral" / "profiles"


def load_profiles(dirs: list[Path] | None = None) -> dict[str, Profile]:
    """All profiles by name; later directories (the user's) replace earlier ones of the same name."""
    out: dict[str, Profile] = {}
    for d in dirs if dirs is not None else [BUILTIN_DIR, user_dir()]:
        if not d.is_dir():
            continue
        seen: dict[str, Path] = {}
        for path in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            p = load_profile_file(path)
            if p.name in seen:
                raise BadInputError(f"{path}: profile name {p.name!r} is already used by {seen[p.name]}")
            seen[p.name] = path
            out[p.name] = p
    if "generic" not in out:
        out["generic"] = Profile(
            name="generic",
            description="fallback for any box",
            match=Match(),
            priority=-1000,
            source="(built in)",
        )
    return out


def choose_profile(hw: Hardware, profiles: dict[str, Profile], name: str | None = None) -> Profile:
    """The named profile, or the highest-priority one that matches (the generic one always does)."""
    if name:
        if name not in profiles:
            raise BadInputError(f"no profile named {name!r}; known: {', '.join(sorted(profiles))}")
        return profiles[name]
    matching = [p for p in profiles.values() if p.matches(hw)]
    if not matching:
        return profiles["generic"]
    return max(matching, key=lambda p: (p.priority, p.name))
