"""The planner's data: what a caller asks for, the settings it evaluates, the devices and memory
pools of a box, what each device needs, and the plan it hands back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edge_magistral.errors import DoesNotFitError


@dataclass(frozen=True)
class Request:
    """What the caller insists on; None leaves the choice to the planner and the profile."""

    ctx: int | None = None
    n_gpu_layers: int | None = None
    quant: str | None = None
    kv_type: str | None = None
    flash_attn: bool | None = None
    parallel: int | None = None  # decoding slots (None: the profile's default)


@dataclass(frozen=True)
class Settings:
    """The load settings of one llama.cpp model + context."""

    n_ctx: int
    n_gpu_layers: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_batch: int = 512
    n_ubatch: int = 512
    n_slots: int = 1  # requests decoded together: 1 is one KV stream, N > 1 is N + 1 streams


@dataclass(frozen=True)
class Device:
    """A device the model can be placed on, and the memory pools it draws from."""

    name: str  # llama.cpp's name: "CPU", "CUDA0", "Metal"
    kind: str  # cpu | gpu
    backend: str  # cpu | cuda | rocm | metal | vulkan
    split_bytes: int  # free memory llama.cpp splits layers by
    pools: tuple[str, ...]  # e.g. ("CUDA0",) or ("Metal", "RAM") for unified memory
    bandwidth_gbs: float


@dataclass(frozen=True)
class Pool:
    """A memory pool (RAM, one discrete GPU, a unified GPU's cap) and what the profile leaves free."""

    name: str
    free_bytes: int
    reserve_bytes: int

    @property
    def budget(self) -> int:
        return max(0, self.free_bytes - self.reserve_bytes)


@dataclass
class DeviceMemory:
    """Predicted bytes on one device."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    layers: int = 0  # repeating layers placed here (the output layer not counted)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


@dataclass
class PoolUse:
    """What a set of settings needs from one pool, against the pool's budget."""

    pool: str
    need: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.need <= self.budget


@dataclass
class Option:
    """One evaluated alternative: a quant with the best settings found for it."""

    quant: str
    path: str
    fits: bool
    settings: Settings | None
    pools: list[PoolUse] = field(default_factory=list)
    tokens_per_s: float = 0.0
    note: str = ""

    @property
    def need_bytes(self) -> int:
        return sum(p.need for p in self.pools)


@dataclass
class DraftPlan:
    """The draft model of speculative decoding: its file, its GPU layers and its memory per device
    (its own llama.cpp context at the target's context, KV type, batch and slots)."""

    model_path: str
    quant: str
    n_gpu_layers: int  # of n_layers + 1 (the output layer counts, as for the target)
    n_layers: int
    context_length: int  # what it was trained for (0: not stated)
    memory: list[DeviceMemory]


@dataclass
class WorkerPlan:
    """One RPC worker of a cluster plan: its devices, what they hold and cost, and its link."""

    endpoint: str  # as the cluster names it ("10.0.0.2:50052")
    profile: str  # the profile its box matches (its reserves and bandwidth)
    devices: list[str]  # its devices in llama.cpp's order, as the plan names them ("CUDA0@10.0.0.2:50052")
    layers: int  # repeating layers on it (the output layer not counted)
    memory: DeviceMemory  # its devices together (device = endpoint)
    device_memory: list[DeviceMemory]
    pools: list[PoolUse]  # its pools, with its own profile's reserves
    first_load_bytes: int  # weights sent over the link on the first load
    reload_bytes: int  # on later loads with the worker's cache: tensors over 10 MiB go as a hash
    link_mbit: float
    link_ms: float  # one way


@dataclass
class ClusterPlan:
    """Layers across the head and its RPC workers, and what the links cost (planner.cluster)."""

    workers: list[WorkerPlan]
    device_order: list[str]  # llama.cpp's: every worker's devices, then the head's GPUs
    head_cpu_layers: int  # the first layers, on the head's CPU with the token embeddings
    output_device: str  # where the output layer (and the logits) is computed
    boundaries: int  # stage boundaries per token that cross a link
    round_trips_per_token: int
    tokens_per_s: float  # with the links' cost
    tokens_per_s_no_link: float
    link_ms_per_token: float
    ttft_s: float  # a prompt of ``prompt_tokens`` tokens, prefill and links
    prompt_tokens: int
    first_load_bytes: int  # over every worker
    reload_bytes: int


@dataclass
class Plan:
    """How to load the model on this box, why, and what it will cost."""

    model_path: str
    quant: str
    source: str
    profile: str
    n_gpu_layers: int
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_slots: int  # requests decoded at once (1: one KV stream; N > 1: N + 1, one for the shared prefix)
    n_threads: int
    n_threads_batch: int
    tensor_split: list[float]
    think_budget: int
    memory: list[DeviceMemory]
    pools: list[PoolUse]
    tokens_per_s: float
    reasons: dict[str, str]
    alternatives: list[Option] = field(default_factory=list)
    speculate: str = "ngram"  # ngram | draft | off: "draft" exactly when ``draft`` is planned
    draft: DraftPlan | None = None  # pools above count it; memory above is the model's alone
    cluster: ClusterPlan | None = None  # layers across RPC workers (planner.cluster); None: this box alone

    @property
    def settings(self) -> Settings:
        return Settings(
            self.n_ctx,
            self.n_gpu_layers,
            self.type_k,
            self.type_v,
            self.flash_attn,
            self.n_batch,
            self.n_ubatch,
            self.n_slots,
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for m, dm in zip(d["memory"], self.memory, strict=True):
            m["total"] = dm.total
        if self.draft is not None:
            for m, dm in zip(d["draft"]["memory"], self.draft.memory, strict=True):
                m["total"] = dm.total
        if self.cluster is not None:
            for w, wp in zip(d["cluster"]["workers"], self.cluster.workers, strict=True):
                _with_totals(w["memory"], wp.memory)
                for m, dm in zip(w["device_memory"], wp.device_memory, strict=True):
                    _with_totals(m, dm)
        return d


def _with_totals(d: dict[str, object], dm: DeviceMemory) -> None:
    """``total`` (what the pools count) and ``buffers`` (model + KV + compute: what llama.cpp's load
    log reports per RPC device, the process's own overhead left out)."""
    d["total"] = dm.total
    d["buffers"] = dm.weights + dm.kv_cache + dm.compute


class NoFitError(DoesNotFitError):
    """Nothing fits; carries the evaluated alternatives so a CLI can still show them."""

    def __init__(self, message: str, alternatives: list[Option], missing_bytes: int):
        super().__init__(message)
        self.alternatives = alternatives
        self.missing_bytes = missing_bytes
