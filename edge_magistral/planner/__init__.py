"""The planner: which quant, how many GPU layers, what context, KV type, batch and slots fit this box.

Pure functions, no llama.cpp import. Its parts:

- :mod:`~edge_magistral.planner.types`: the request, the settings evaluated, devices and pools,
  and the :class:`Plan` handed back;
- :mod:`~edge_magistral.planner.memory`: the memory model, :func:`predict` (what llama.cpp
  allocates per device for one set of settings), checked against llama.cpp's dry runs;
- :mod:`~edge_magistral.planner.box`: the search space one box, profile and request allow;
- :mod:`~edge_magistral.planner.search`: the policy, :func:`plan` (and :func:`plan_for_model`
  for one local GGUF on the detected or a recorded box);
- :mod:`~edge_magistral.planner.explain`: the reasons in a plan and the refusals;
- :mod:`~edge_magistral.planner.draft`: a draft model for speculative decoding, placed next to
  the plan (its memory per device, its GPU layers, and what the model gives up for it).
"""

from edge_magistral.planner.box import KV_ORDER
from edge_magistral.planner.draft import DRAFT_GPU_OVERHEAD, draft_candidate, predict_draft
from edge_magistral.planner.memory import (
    BATCH_LOAD_CTX,
    CPU_EFFICIENCY,
    DEFAULT_GPU_GBS,
    GPU_OVERHEAD,
    HOST_OVERHEAD,
    KV_BYTES,
    OP_OFFLOAD_MIN_BATCH,
    compute_stages,
    devices_of,
    kv_bytes_per_cell,
    kv_cells,
    kv_streams,
    layer_devices,
    pool_use,
    predict,
    tokens_per_s,
    ubatch_tokens,
)
from edge_magistral.planner.search import CTX_STEP, plan, plan_for_model
from edge_magistral.planner.types import (
    Device,
    DeviceMemory,
    DraftPlan,
    NoFitError,
    Option,
    Plan,
    Pool,
    PoolUse,
    Request,
    Settings,
)

__all__ = [
    "BATCH_LOAD_CTX",
    "CPU_EFFICIENCY",
    "CTX_STEP",
    "DEFAULT_GPU_GBS",
    "DRAFT_GPU_OVERHEAD",
    "GPU_OVERHEAD",
    "HOST_OVERHEAD",
    "KV_BYTES",
    "KV_ORDER",
    "OP_OFFLOAD_MIN_BATCH",
    "Device",
    "DeviceMemory",
    "DraftPlan",
    "NoFitError",
    "Option",
    "Plan",
    "Pool",
    "PoolUse",
    "Request",
    "Settings",
    "compute_stages",
    "devices_of",
    "draft_candidate",
    "kv_bytes_per_cell",
    "kv_cells",
    "kv_streams",
    "layer_devices",
    "plan",
    "plan_for_model",
    "pool_use",
    "predict",
    "predict_draft",
    "tokens_per_s",
    "ubatch_tokens",
]
