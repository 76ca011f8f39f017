#!/usr/bin/env python3
"""Write a tiny Magistral checkpoint (Mistral-native layout, random BF16 weights, real Tekken vocab).

    scripts/make_tiny_model.py OUT_DIR [--seed N] [--layers N] [--dim N] [--hidden N]
"""

from dataclasses import replace
from pathlib import Path

import click

from edge_magistral.build.tiny import TINY, make_tiny_checkpoint


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--layers", default=TINY.n_layers, show_default=True)
@click.option("--dim", default=TINY.dim, show_default=True, help="Hidden size (keep a multiple of 256).")
@click.option("--hidden", default=TINY.hidden_dim, show_default=True, help="FFN size (multiple of 256).")
def main(out: Path, seed: int, layers: int, dim: int, hidden: int) -> None:
    params = replace(TINY, n_layers=layers, dim=dim, hidden_dim=hidden, n_heads=dim // TINY.head_dim,
                     n_kv_heads=max(1, dim // TINY.head_dim // 2))
    d = make_tiny_checkpoint(out, params, seed)
    click.echo(f"wrote {d} ({params.n_layers} layers, dim {params.dim}, vocab {params.vocab_size})")


if __name__ == "__main__":
    main()
