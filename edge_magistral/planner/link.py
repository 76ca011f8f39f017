"""What a pipeline across boxes costs on the wire: per token, per prompt, and on the first load.

The cost follows ggml-rpc's client (protocol 7). Commands without a reply (SET_TENSOR,
GRAPH_COMPUTE, GRAPH_RECOMPUTE) are queued on one connection per worker and do not wait; commands
with a reply (GET_TENSOR, COPY_TENSOR, SET_TENSOR_HASH) wait for it, and the worker answers them
in order, after the graph queued before them has run. llama.cpp's scheduler moves activations
between backends with a blocking copy (the RPC backend has no async copy): into a worker,
SET_TENSOR; out of it, GET_TENSOR; between two devices of one worker, COPY_TENSOR; between two
workers, GET_TENSOR from the first then SET_TENSOR to the second.

So one visit of a token's pass to a worker (a run of its devices in device order) costs

    2 x latency + (bytes in + bytes out) / bandwidth   (+ 2 x latency per device change inside it)

where bytes in are the activation (n_embd x 4 per token) and, per device with layers, the
attention mask (n_kv x 2 bytes per token with flash attention, 4 without), and bytes out are the
activation, or the logits row (n_vocab x 4) when the output layer is there. The graph itself
travels only when llama.cpp rebuilds it (GRAPH_RECOMPUTE, a few bytes, when it reuses it); that is
not counted. The compute of the worker's layers is the memory-bandwidth term of every device, as
``memory.tokens_per_s`` counts it.

A prompt of P tokens costs the same per ubatch, with P-token activations (P x n_embd x 4 bytes:
10 MiB for 512 tokens of Magistral's 5120) and masks over the prompt's cells, plus the prefill's
compute, estimated here (no measured figure in the planner): each device reads its weights once
per ubatch and does 2 x parameters x tokens FLOPs at ``PREFILL_FLOPS_PER_BYTE`` times its decode
bandwidth, whichever takes longer.

First load: every weight byte placed on a worker crosses its link. With the worker's cache
(``rpc-worker`` with a cache directory), a tensor over ``HASH_THRESHOLD`` is sent as its hash on
later loads; a layer's tensors are sized here in proportion to their parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_magistral.units import MiB

if TYPE_CHECKING:
    from edge_magistral.catalog import ModelCandidate
    from edge_magistral.hardware import Hardware
    from edge_magistral.planner.types import DeviceMemory, Settings

HASH_THRESHOLD = 10 * MiB  # ggml-rpc sends larger weight tensors as a hash first
PREFILL_FLOPS_PER_BYTE = {"gpu": 50.0, "cpu": 20.0}  # rough: FLOPs per byte/s of decode bandwidth
PROMPT_TOKENS = 512


@dataclass(frozen=True)
class Link:
    """The network between the head and one worker."""

    bandwidth_bytes_s: float = 1e9 / 8  # 1 Gbit/s
    latency_s: float = 0.0005  # one way


@dataclass(frozen=True)
class WorkerBox:
    """A worker as the planner sees it: its name (the endpoint), its box and its link."""

    name: str
    hardware: Hardware
    link: Link = Link()
    layers: int | None = None  # repeating layers pinned here (the cluster file's); None: the fill decides


@dataclass(frozen=True)
class Visit:
    """One run of a token's pass on one worker's devices."""

    link: Link
    devices_with_layers: int
    device_changes: int  # moves between its own devices (one COPY_TENSOR round trip each)
    holds_output: bool


def visit_seconds(m: ModelCandidate, v: Visit, tokens: int, n_kv: int, flash_attn: bool) -> float:
    """The link's cost of one visit for a ubatch of ``tokens`` tokens (module docstring)."""
    act = tokens * m.n_embd * 4
    mask = v.devices_with_layers * n_kv * tokens * (2 if flash_attn else 4)
    out = m.n_vocab * 4 if v.holds_output else act  # one logits row: the last token's
    round_trips = 1 + v.device_changes
    return 2 * v.link.latency_s * round_trips + (act + mask + out) / v.link.bandwidth_bytes_s


def round_trips(visits: list[Visit]) -> int:
    return sum(1 + v.device_changes for v in visits)


def reload_bytes(m: ModelCandidate, layers: list[int], with_output: bool) -> int:
    """Bytes a later load still sends to a worker that caches: its layers' tensors of at most
    ``HASH_THRESHOLD`` (and the output norm when it holds the output layer)."""
    q, kv = m.n_head * m.head_dim, m.n_head_kv * m.head_dim
    params = [m.n_embd * q, m.n_embd * kv, m.n_embd * kv, q * m.n_embd] + [m.n_embd * m.n_ff] * 3
    norms = 2 * m.n_embd * 4
    total = 0
    for il in layers:
        body = max(0, (m.bytes_per_layer[il] if il < len(m.bytes_per_layer) else 0) - norms)
        sizes = [body * p // sum(params) for p in params]
        total += norms + sum(s for s in sizes if s <= HASH_THRESHOLD)
    if with_output:
        total += m.n_embd * 4 if m.output_bytes > HASH_THRESHOLD else m.output_bytes
    return total


def prefill_seconds(m: ModelCandidate, weights: int, bytes_s: float, kind: str, tokens: int) -> float:
    """One ubatch of ``tokens`` on one device: its weights read once, or its FLOPs, the longer."""
    if weights <= 0 or bytes_s <= 0:
        return 0.0
    params = weights * 8 / max(m.bits_per_weight, 1.0)
    flops = PREFILL_FLOPS_PER_BYTE[kind] * bytes_s
    return max(weights / bytes_s, 2 * params * tokens / flops)


@dataclass(frozen=True)
class Stage:
    """One device of the pipeline, in llama.cpp's order: its worker (None: the head) and what it runs."""

    worker: str | None
    link: Link | None
    layers: int
    holds_output: bool


def visits(stages: list[Stage]) -> list[Visit]:
    """The runs of a token's pass on each worker: consecutive devices of one worker that hold
    layers or the output layer (devices with neither are skipped: nothing runs there)."""
    out: list[Visit] = []
    run: list[Stage] = []
    for st in [*(x for x in stages if x.layers or x.holds_output), Stage(None, None, 0, False)]:
        if run and st.worker != run[0].worker:
            if run[0].worker is not None and run[0].link is not None:
                out.append(Visit(run[0].link, sum(1 for x in run if x.layers), len(run) - 1,
                                 any(x.holds_output for x in run)))
            run = []
        run.append(st)
    return out


def link_seconds(m: ModelCandidate, vs: list[Visit], tokens: int, n_kv: int, flash_attn: bool) -> float:
    """The links' cost of one ubatch of ``tokens`` through the pipeline."""
    return sum(visit_seconds(m, v, tokens, n_kv, flash_attn) for v in vs)


def decode_seconds(m: ModelCandidate, mem: list[DeviceMemory], speeds: list[float]) -> float:
    """Compute of one token, as ``memory.tokens_per_s``: each device reads its weights and half its
    KV cache at its own bandwidth; ``mem[0]`` is the head's CPU (one embedding row per token)."""
    seconds = 0.0
    for i, (dm, bw) in enumerate(zip(mem, speeds, strict=True)):
        read = dm.weights + dm.kv_cache // 2 - (m.token_embd_bytes if i == 0 else 0)
        seconds += max(0, read) / bw
    return seconds


def ttft_seconds(m: ModelCandidate, mem: list[DeviceMemory], speeds: list[float], kinds: list[str],
                 vs: list[Visit], s: Settings, prompt: int) -> float:
    """Prefill of ``prompt`` tokens, ubatch by ubatch: every device's compute, then the links."""
    from edge_magistral.planner.memory import kv_cells

    ub = max(1, min(s.n_batch, s.n_ubatch))
    seconds, left = 0.0, prompt
    while left > 0:
        n = min(ub, left)
        for i, (dm, bw, kind) in enumerate(zip(mem, speeds, kinds, strict=True)):
            seconds += prefill_seconds(m, dm.weights - (m.token_embd_bytes if i == 0 else 0), bw, kind, n)
        seconds += link_seconds(m, vs, n, kv_cells(prompt), s.flash_attn)
        left -= n
    return seconds
