"""``--speculate`` and ``--draft-model``: one definition for every command that loads a model
(``run``, ``chat``, ``serve``, ``bench``), checked before anything is read or loaded."""

from __future__ import annotations

import click

from edge_magistral.cli.group import stacked
from edge_magistral.generation import SPECULATE_MODES

SPECULATE_OPTIONS = [
    click.option("--speculate", type=click.Choice(SPECULATE_MODES), default=None,
                 help="Speculative decoding: ngram (the default: guesses looked up in the prompt and the turn so "
                      "far, verified only when they pay), draft (a small draft model's guesses, see "
                      "--draft-model), off (one token per step). The output is the same either way."),
    click.option("--draft-model", default=None, metavar="FILE.gguf",
                 help="Draft model for --speculate draft (implies it): a small GGUF, or a quant in the store, "
                      "with the model's vocabulary id for id (for Magistral, a Tekken model); it costs its "
                      "weights and its own KV cache in memory."),
]


speculate_options = stacked(SPECULATE_OPTIONS)


def speculation(speculate: str | None, draft_model: str | None) -> tuple[str | None, str | None]:
    """The mode and draft asked, refused on one line if they do not go together (BadInputError):
    ``--draft-model`` alone means draft, ``--speculate draft`` needs one."""
    from edge_magistral.loader import ModelRequest

    req = ModelRequest(speculate=speculate, draft_model=draft_model)
    return req.speculate, req.draft_model
