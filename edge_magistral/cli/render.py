"""Terminal rendering shared by the commands: a rich console and progress bars."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bars  # rich's; not the protocol of the same name

from edge_magistral.progress import Advance


@lru_cache(maxsize=1)
def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


@lru_cache(maxsize=1)
def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class RichProgress:
    """Progress bars on stderr (hidden when it is not a terminal): the CLI's
    :class:`edge_magistral.progress.Progress`, one bar per ``task(description, total)``, moved on
    by the ``advance(n)`` it returns."""

    def __init__(self) -> None:
        self._p = Bars(TextColumn("{task.description:<28}"), BarColumn(), TaskProgressColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), console=err_console(), transient=False)

    def __enter__(self) -> RichProgress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._p.__exit__(*exc)

    def task(self, description: str, total: int) -> Advance:
        tid = self._p.add_task(description, total=total)
        return lambda n: self._p.advance(tid, n)


def echo_installed(r: Any) -> None:
    """What an install wrote, left alone and reloaded, and its notes (``install-service`` and
    ``install-rpc-worker`` report alike)."""
    import click

    for p in r.written:
        click.echo(f"wrote     {p}")
    for p in r.unchanged:
        click.echo(f"unchanged {p}")
    click.echo(f"systemctl daemon-reload: {r.daemon_reload}")
    for note in r.notes:
        click.secho(f"note: {note}", fg="yellow")

