"""``audit``: check the hash-chained audit log (and read it)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_magistral.cli.group import cli


@cli.group()
def audit() -> None:
    """Check and read the audit log (one hash-chained JSON record per request)."""


@audit.command()
@click.argument("file", type=click.Path(path_type=Path))
def verify(file: Path) -> None:
    """Check that FILE is intact: no record edited, removed, inserted or reordered, no cut-off tail.

    Exits 0 with a summary when intact; otherwise prints the first bad line and exits 4. Removing
    whole records from the end is only caught by comparing the printed last hash with one kept
    elsewhere.
    """
    from edge_magistral.audit import CorruptAuditLogError, verify_file

    r = verify_file(file)
    if not r.ok:
        raise CorruptAuditLogError(f"audit log {file}: line {r.bad_line}: {r.problem} "
                                   f"({r.records} record(s) before it are intact)")
    span = f", {r.first_time} .. {r.last_time}" if r.records else ""
    click.echo(f"{file}: intact, {r.records} record(s){span}, last hash {r.last_hash}")


@audit.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-n", "--last", "last", type=click.IntRange(min=1), default=None,
              help="Only the last N records.")
def show(file: Path, last: int | None) -> None:
    """Print FILE's records as indented JSON (verify it first: this does not check the chain)."""
    from edge_magistral.errors import BadInputError

    try:
        lines = file.read_bytes().decode("utf-8", "replace").split("\n")  # not splitlines(): U+2028
    except OSError as e:
        raise BadInputError(f"cannot read audit log {file}: {e.strerror or e}") from None
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    for line in lines[-last:] if last else lines:
        try:
            click.echo(json.dumps(json.loads(line), indent=2, ensure_ascii=False))
        except ValueError:
            click.echo(f"(not JSON) {line}")
