"""``inspect``: what a GGUF file holds, read from its header (nothing is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_magistral.cli.group import cli
from edge_magistral.cli.render import console
from edge_magistral.units import GiB, MiB


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--tensors", is_flag=True, help="Also list every tensor (name, type, shape, bytes).")
def inspect(file: Path, as_json: bool, tensors: bool) -> None:
    """Show FILE.gguf's architecture, layers, dims, quant, bytes per layer, special tokens and
    whether it carries a chat template. The file is validated first."""
    from edge_magistral.gguf_info import read_info

    info = read_info(file)
    if as_json:
        click.echo(json.dumps(info.to_dict(with_tensors=tensors), indent=2))
        return
    c = console()
    c.print(f"[bold]{info.path}[/bold]  ({_gib(info.file_size)}, GGUF v{info.version})")
    c.print(f"  model         {info.name or '-'}  arch {info.architecture}, {info.n_params / 1e9:.3f} B params")
    c.print(f"  quant         {info.file_type_name}  tensor types {info.tensor_types}")
    c.print(f"  layers        {info.n_layers}  hidden {info.n_embd}  ffn {info.n_ff}")
    c.print(f"  attention     {info.n_head} heads, {info.n_head_kv} KV heads, head dim {info.head_dim}")
    c.print(f"  vocab         {info.n_vocab}  tokenizer {info.tokenizer_model}/{info.tokenizer_pre or '-'}")
    c.print(f"  context       {info.context_length}  rope theta {info.rope_theta}  rms eps {info.rms_eps}")
    per = info.bytes_per_layer
    if per:
        c.print(f"  bytes/layer   {_gib(min(per))}" + (f" .. {_gib(max(per))}" if max(per) != min(per) else ""))
    c.print(f"  embeddings    {_gib(info.token_embd_bytes)} (token_embd, stays on the host)")
    c.print(f"  output        {_gib(info.output_bytes)} (output + output_norm)")
    c.print(f"  special       {info.special_tokens}")
    c.print(f"  chat template {'present' if info.has_chat_template else 'absent'}")
    if tensors:
        for t in info.tensors:
            c.print(f"    {t.name:<36} {t.type_name:<6} {str(list(t.shape)):<18} {t.n_bytes}")
