"""What llama.cpp allocated on each RPC worker, read from its load log.

A head's llama.cpp names a remote buffer ``RPC<device>[<endpoint>]`` and logs its size as it
allocates it (``load_tensors: RPC0[10.0.0.2:50052] model buffer size = 33.82 MiB``, then the KV
cache and the compute buffer). Those lines are the worker's real use as the head sees it; the
service reports them in /health and the planner's prediction is checked against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MiB = 1024 * 1024

_LINE = re.compile(r"RPC(\d+)\[([^\]]+)\]\s+(model|KV|compute) buffer size\s*=\s*([0-9.]+) MiB")
_KINDS = {"model": "weights", "KV": "kv_cache", "compute": "compute"}


@dataclass
class RemoteBuffers:
    """Bytes per endpoint and kind (``weights``, ``kv_cache``, ``compute``); the last report of a
    kind wins (llama-cpp-python makes a throwaway context first, freed before the real one)."""

    by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)

    def feed(self, line: str) -> None:
        """One llama.cpp log line (anything else is ignored)."""
        m = _LINE.search(line)
        if m is None:
            return
        _, endpoint, kind, mib = m.groups()
        per = self.by_endpoint.setdefault(endpoint, {})
        per[_KINDS[kind]] = round(float(mib) * MiB)

    def total(self, endpoint: str) -> int:
        return sum(self.by_endpoint.get(endpoint, {}).values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {ep: {**kinds, "total": sum(kinds.values())} for ep, kinds in self.by_endpoint.items()}
