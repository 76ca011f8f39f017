"""``tokenize``: the token ids the engine feeds Magistral for a piece of user text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_magistral.cli.group import cli


def _read_text(text: str) -> str:
    """TEXT itself, or standard input for '-' (invalid UTF-8 there becomes U+FFFD)."""
    if text != "-":
        return text
    return sys.stdin.buffer.read().decode("utf-8", "replace")


def _piece(data: bytes) -> str:
    """A token's bytes for people: the text when it is whole UTF-8, else the raw bytes."""
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...]} only.')
def tokenize(model: Path, text: str, as_json: bool) -> None:
    """Print the ids MODEL.gguf's Magistral tokenizer gives TEXT ('-' reads stdin).

    These are the ids the engine feeds for user text: no BOS, and markers such as [INST] or </s>
    in TEXT are plain characters, never control tokens. Invalid UTF-8 on stdin and lone surrogates
    become U+FFFD.
    """
    from edge_magistral.tekken import TekkenTokenizer

    tok = TekkenTokenizer.from_gguf(model)
    ids = tok.encode(_read_text(text))
    if as_json:
        click.echo(json.dumps({"ids": ids}))
        return
    for i in ids:
        click.echo(f"{i:>7}  {_piece(tok.token_bytes(i))}")
    click.echo(f"{len(ids)} tokens")
