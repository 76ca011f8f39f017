"""The ``edge-magistral`` click group that every command module registers on, and how the
project's errors end a command: one line on stderr and the error's exit code (no traceback)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import click

from edge_magistral import __version__
from edge_magistral.errors import EdgeMagistralError


def stacked(options: Sequence[Callable]) -> Callable:
    """One decorator that applies ``options`` (click.option decorators) in their listed order, so
    a shared option list reads in ``--help`` as it is written."""
    def apply(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


class _Group(click.Group):
    """Turns project errors into one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EdgeMagistralError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-magistral")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for llama.cpp's own log).")
def cli(verbose: int) -> None:
    """Run Magistral Small 1.1 on edge hardware: build, plan, run, operate."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
