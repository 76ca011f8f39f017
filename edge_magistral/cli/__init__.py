"""The ``edge-magistral`` command: click commands that parse, call the library and render.

Each command family lives in its own module here and registers itself on :data:`cli` (the group
in :mod:`edge_magistral.cli.group`, which the command modules import, so this package imports
them and never the other way round). Errors of the project's types are printed on one line and
exit with their code (no traceback).
"""

from __future__ import annotations

from edge_magistral.cli.group import cli


def main() -> None:
    # Importing a command module registers its commands on `cli`.
    from edge_magistral.cli import (  # noqa: F401
        audit_cmds,
        bench_cmds,
        build_cmds,
        model_cmds,
        plan_cmds,
        prompt_cmds,
        rpc_cmds,
        run_cmds,
        serve_cmds,
        service_cmds,
        store_cmds,
        tokenize_cmds,
    )

    cli(prog_name="edge-magistral")


__all__ = ["cli", "main"]
