"""``prompt``: the token ids the engine feeds Magistral for an OpenAI-style chat request."""

from __future__ import annotations

import json

import click

from edge_magistral.cli.group import cli
from edge_magistral.cli.tool_io import read_json


@cli.command()
@click.argument("request", metavar="REQUEST.json")
@click.option("--model", default=None, help="GGUF file, or a quant in the model store (default: "
                                            "$EDGE_MAGISTRAL_MODEL, else the store's model); only its "
                                            "tokenizer is read.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...], "text": "..."} only.')
def prompt(request: str, model: str | None, as_json: bool) -> None:
    """Print the prompt the engine feeds for an OpenAI-style chat request body ('-' reads stdin).

    REQUEST.json holds messages and optionally tools, tool_choice, parallel_tool_calls and
    system_mode (other fields are ignored). The prompt is built by the code the service uses:
    the text shows control tokens by name, and the ids are what is evaluated. A turn may still
    append [THINK] (force_thinking) or a closed thought (a think budget of 0).
    """
    from edge_magistral.loader import resolve_model
    from edge_magistral.tekken import TekkenTokenizer
    from edge_magistral.tools import conversation_from_request

    conversation = conversation_from_request(read_json(request, "it"))  # before the model: bad input first
    tok = TekkenTokenizer.from_gguf(resolve_model(model))
    ids = conversation.prompt_ids(tok.encode)
    text = tok.text_with_specials(ids)
    if as_json:
        click.echo(json.dumps({"ids": ids, "text": text}, ensure_ascii=False))
        return
    click.echo(text)
    click.echo()
    click.echo(" ".join(map(str, ids)))
    choice = conversation.tool_choice + (f" ({conversation.tool_name})" if conversation.tool_name else "")
    click.echo(f"{len(ids)} tokens; {len(conversation.tools)} tools; tool_choice {choice}")
