"""The head's side of a cluster: ask each RPC worker what it is, then plan across the boxes.

Nothing here loads llama.cpp: the probe is pure Python (``probe``), a worker's box is what its
``edge-magistral rpc-worker`` publishes (``detect --json`` of that box, in ``/info``), and the plan
is the planner's (``planner.cluster``). ``loader.plan_model`` calls :func:`plan_across` when a
request names workers; the model then loads with the plan's ``tensor_split`` and the workers'
endpoints in :class:`~edge_magistral.generation.LoadSettings` (``workers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_magistral.errors import BackendError
from edge_magistral.rpc.probe import WorkerProbe, probe_with_info

if TYPE_CHECKING:
    from edge_magistral.hardware import Hardware
    from edge_magistral.planner import Plan, Request
    from edge_magistral.planner.cluster import WorkerBox
    from edge_magistral.rpc.endpoints import Cluster, WorkerSpec

PROBE_TIMEOUT_S = 10.0


def worker_hardware(p: WorkerProbe) -> Hardware:
    """The box behind a worker, as its rpc-worker detected it (the real device type and memory:
    llama.cpp's RPC reports every remote device as a GPU)."""
    from edge_magistral.hardware.serialize import from_dict

    detect = (p.info or {}).get("detect")
    if detect is None:
        raise BackendError(f"worker {p.endpoint} does not publish its hardware (a bare llama.cpp rpc-server?): "
                           "run `edge-magistral rpc-worker` there, so the plan knows its devices and memory")
    return from_dict(detect, f"worker {p.endpoint}'s hardware")


def worker_boxes(cluster: Cluster, timeout_s: float = PROBE_TIMEOUT_S) -> list[WorkerBox]:
    """Probe every worker (a dead, busy or mismatched one is a one-line WorkerError, before
    llama.cpp could abort on it) and describe its box and link for the planner."""
    from edge_magistral.planner.cluster import WorkerBox

    out = []
    for spec in cluster.workers:
        p = probe_with_info(str(spec.endpoint), timeout_s)
        out.append(WorkerBox(str(spec.endpoint), worker_hardware(p), link_of(spec), spec.layers))
    return out


def link_of(spec: WorkerSpec) -> Any:
    """The link to a worker as the cluster file states it, else the planner's default."""
    from edge_magistral.planner.cluster import Link

    d = Link()
    bw = spec.link_mbit * 1e6 / 8 if spec.link_mbit else d.bandwidth_bytes_s
    lat = spec.latency_ms / 1e3 if spec.latency_ms is not None else d.latency_s
    return Link(bandwidth_bytes_s=bw, latency_s=lat)


def plan_across(model_path: str, request: Request, head: Hardware, cluster: Cluster,
                profile_name: str | None = None) -> Plan:
    """Plan ``model_path`` over this box and the cluster's workers (in device order)."""
    from edge_magistral.catalog import from_gguf_info
    from edge_magistral.gguf_info import read_info
    from edge_magistral.planner.cluster import plan_cluster
    from edge_magistral.profiles import choose_profile, load_profiles

    profile = choose_profile(head, load_profiles(), profile_name)
    target = from_gguf_info(read_info(model_path))
    return plan_cluster(head, worker_boxes(cluster), [target], request, profile)
