"""The service's config file, ``/etc/edge-magistral/config.yaml``: what ``edge-magistral serve
--config FILE`` reads (the model, the address, the plan pinned at install time), written with
its comments and read back with every key checked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from edge_magistral.errors import BadInputError
from edge_magistral.generation import SPECULATE_MODES

if TYPE_CHECKING:
    from edge_magistral.planner import Plan


@dataclass(frozen=True)
class ServiceConfig:
    """What ``edge-magistral serve --config FILE`` reads: the model and how to serve it.

    ``ctx``, ``n_gpu_layers``, ``profile`` and ``parallel`` pin the plan made at install time (None
    lets the planner choose at start); a pinned plan that stops fitting fails at start with the reason.
    ``speculate`` None leaves the mode to the plan; ``draft_model`` is the draft GGUF's absolute path,
    checked at install time (the service must be able to read it, as it reads ``model``).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    ctx: int | None = None
    n_gpu_layers: int | None = None
    profile: str | None = None
    parallel: int | None = None  # decoding slots (serve --parallel)
    think_budget: int | None = None
    audit_log: str | None = "/var/log/edge-magistral/audit.jsonl"
    stall_timeout_s: float = 120.0  # busy without progress this long: restart the worker, withhold liveness pings
    speculate: str | None = None  # ngram | draft | off (serve --speculate); None: the plan's
    draft_model: str | None = None  # the draft GGUF for speculate draft (serve --draft-model)
    cluster: str | None = None  # a cluster file of RPC workers (serve --cluster)

    @classmethod
    def from_plan(cls, plan: Plan) -> ServiceConfig:
        """The plan's model path and load settings (other fields at their defaults)."""
        return cls(model=plan.model_path, ctx=plan.n_ctx, n_gpu_layers=plan.n_gpu_layers,
                   profile=plan.profile, parallel=plan.n_slots, think_budget=plan.think_budget)

    def to_yaml(self) -> str:
        """The config file, commented; values are JSON scalars (valid YAML) so paths need no quoting rules."""
        def v(x: object) -> str:
            return "null" if x is None else _json_scalar(x)

        return "\n".join([
            "# edge-magistral service settings, read by `edge-magistral serve --config FILE`.",
            "# Written by `edge-magistral install-service`; rerun it (or edit, then restart) to change.",
            f"model: {v(self.model)}",
            "# Bind address: 127.0.0.1 keeps the API on this box. Another address needs the API key",
            "# (the systemd credential `api-key`) and an IPAddressAllow= that admits the clients.",
            f"host: {v(self.host)}",
            f"port: {v(self.port)}",
            "# The plan made at install time (null: let the planner choose at each start).",
            f"ctx: {v(self.ctx)}",
            f"n_gpu_layers: {v(self.n_gpu_layers)}",
            f"profile: {v(self.profile)}",
            "# Requests decoded at once; each slot keeps its own KV cache of ctx cells (plus one shared).",
            f"parallel: {v(self.parallel)}",
            "# Default maximum thinking tokens per request (a request may ask for fewer).",
            f"think_budget: {v(self.think_budget)}",
            "# Speculative decoding: ngram, draft (needs draft_model: a small GGUF with the model's",
            "# vocabulary, in memory beside it) or off; null: the plan's. The model verifies every guess.",
            f"speculate: {v(self.speculate)}",
            f"draft_model: {v(self.draft_model)}",
            "# RPC workers to place layers on: a cluster file (see README, \"Across several boxes\"); null: none.",
            f"cluster: {v(self.cluster)}",
            "# Append-only, hash-chained record of every request (null: none).",
            f"audit_log: {v(self.audit_log)}",
            "# Seconds without progress during a request before the engine worker is restarted (and",
            "# liveness pings (WATCHDOG=1) stop until it is back). Keep it above the slowest prefill batch.",
            f"stall_timeout_s: {v(self.stall_timeout_s)}",
            "",
        ])


def _json_scalar(x: object) -> str:
    return json.dumps(x, ensure_ascii=False)


def read_service_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Load and check a config file; a mistake names the key and the file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such file; write it with `edge-magistral install-service`") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInputError(f"{p}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{p}: expected `key: value` lines, got {type(data).__name__}")
    known = [f.name for f in fields(ServiceConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadInputError(f"{p}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise BadInputError(f"{p}: `model` must be the path of a GGUF file")
    if data.get("speculate") is False:  # YAML 1.1 reads a bare `off` as false
        data["speculate"] = "off"
    for key, value in data.items():
        _check_value(p, key, value)
    _check_speculation(p, data.get("speculate"), data.get("draft_model"))
    return ServiceConfig(**data)


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "host": (str,), "port": (int,), "ctx": (int,), "n_gpu_layers": (int,),
    "profile": (str,), "parallel": (int,), "think_budget": (int,), "audit_log": (str,),
    "stall_timeout_s": (int, float), "speculate": (str,), "draft_model": (str,),
    "cluster": (str,),
}
_NULLABLE = {"ctx", "n_gpu_layers", "profile", "parallel", "think_budget", "audit_log", "speculate", "draft_model",
             "cluster"}
_CHOICES = {"speculate": SPECULATE_MODES}
_RANGES = {"port": (1, 65535), "ctx": (256, None), "n_gpu_layers": (0, None), "parallel": (1, 64),
           "think_budget": (0, None), "stall_timeout_s": (1, None)}


def _check_value(p: Path, key: str, value: object) -> None:
    if value is None and key in _NULLABLE:
        return
    if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
        want = " or ".join(t.__name__ for t in _TYPES[key])
        raise BadInputError(f"{p}: `{key}` must be {want}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise BadInputError(f"{p}: `{key}` must be one of {', '.join(_CHOICES[key])} or null, got {value!r}")
    lo, hi = _RANGES.get(key, (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):  # type: ignore[operator]
        raise BadInputError(f"{p}: `{key}` is {value}, outside {lo}..{hi if hi is not None else ''}")


def _check_speculation(p: Path, speculate: object, draft_model: object) -> None:
    """The pair serve would refuse at start, refused here on one line instead."""
    if draft_model == "":
        raise BadInputError(f"{p}: `draft_model` must be the path of a GGUF file, or null")
    if speculate == "draft" and not draft_model:
        raise BadInputError(f"{p}: `speculate` is draft: set `draft_model` to the draft GGUF's path")
    if draft_model and speculate not in (None, "draft"):
        raise BadInputError(f"{p}: `draft_model` goes with `speculate: draft`, not {speculate}")
