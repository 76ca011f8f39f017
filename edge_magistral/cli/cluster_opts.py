"""``--worker``, ``--cluster`` and ``--allow-public-worker``: one definition for every command that
loads or plans a model across boxes (``run``, ``chat``, ``serve``, ``plan``, ``bench``), checked
before anything is read or loaded."""

from __future__ import annotations

import click

from edge_magistral.cli.group import stacked

CLUSTER_OPTIONS = [
    click.option("--worker", "workers", multiple=True, metavar="HOST:PORT",
                 help="An `edge-magistral rpc-worker` to place layers on (repeatable; order is device "
                      "order). Only loopback and private addresses unless --allow-public-worker."),
    click.option("--cluster", "cluster_file", default=None, metavar="FILE.yaml",
                 help="The workers (and their links' bandwidth and latency, for the plan) in a YAML file."),
    click.option("--allow-public-worker", is_flag=True,
                 help="Accept a worker on a public address. llama.cpp's RPC has no authentication or "
                      "encryption: only on a network that is yours alone."),
]


cluster_options = stacked(CLUSTER_OPTIONS)


def cluster_of(workers: tuple[str, ...], cluster_file: str | None, allow_public_worker: bool):
    """The workers asked for (``rpc.endpoints.Cluster``), or None for a one-box run; a bad address,
    a public one, a duplicate or a malformed file is refused on one line (BadInputError)."""
    if not workers and not cluster_file:
        return None
    from edge_magistral.rpc.endpoints import cluster_from

    return cluster_from(list(workers), cluster_file, allow_public_worker)
