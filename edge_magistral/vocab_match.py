"""Whether a draft GGUF shares the target's vocabulary, read from the two files' headers.

A draft's guess is a token id; in another vocabulary the same id is another piece of text, so a
draft must match the target id for id: the same token count, the same special ids (BOS, EOS and
any other both declare) and the same piece for every id. The pieces come from the headers'
``tokenizer.ggml.tokens`` (all of them: comparing 131k byte strings takes milliseconds), so the
check runs before anything is loaded: ``plan --draft`` refuses a mismatch, and the engine can
call it before it loads the draft.
"""

from __future__ import annotations

from edge_magistral.errors import BadInputError
from edge_magistral.gguf_info import GGUFInfo, read_header

TOKENS_KEY = "tokenizer.ggml.tokens"
REQUIRED_SPECIAL = ("bos", "eos")  # must be declared alike; others are compared where both declare them


def token_pieces(info: GGUFInfo) -> list[bytes]:
    """Every token's piece, in id order, from the GGUF's header (empty when it has none)."""
    tokens = read_header(info.path, keep_arrays=frozenset({TOKENS_KEY})).metadata.get(TOKENS_KEY)
    return tokens if isinstance(tokens, list) else []


def check_draft_vocab(target: GGUFInfo, draft: GGUFInfo) -> None:
    """Refuse (BadInputError, one line) a draft whose vocabulary is not the target's id for id."""
    where = f"the draft model {draft.path}"
    check_token_count(target.n_vocab, draft)
    check_special_ids(target, draft)
    a, b = token_pieces(target), token_pieces(draft)
    if not a or not b:
        whose = target.path if not a else draft.path
        raise BadInputError(f"{whose} has no token list ({TOKENS_KEY}); cannot check the draft's vocabulary")
    if len(a) != len(b):
        raise BadInputError(f"{where} lists {len(b)} token pieces, the model {len(a)}")
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    if first is not None:
        n_diff = sum(x != y for x, y in zip(a, b, strict=True))
        raise BadInputError(
            f"{where}: token {first} is {b[first]!r} there and {a[first]!r} in the model ({n_diff} of "
            f"{len(a)} pieces differ); a draft must share the model's vocabulary id for id"
        )


def check_token_count(n_vocab: int, draft: GGUFInfo) -> None:
    """The draft has the target's number of tokens (all a model not downloaded yet can tell)."""
    if draft.n_vocab != n_vocab:
        raise BadInputError(
            f"the draft model {draft.path} has {draft.n_vocab} tokens, the model {n_vocab}: a draft must share "
            "the model's vocabulary (for Magistral: a Tekken model of 131072 tokens)"
        )


def check_special_ids(target: GGUFInfo, draft: GGUFInfo) -> None:
    """The same BOS and EOS, and the same id for every other special token both declare."""
    where = f"the draft model {draft.path}"
    t, d = target.special_tokens, draft.special_tokens
    for name in REQUIRED_SPECIAL:
        if t.get(name) != d.get(name):
            raise BadInputError(f"{where}: its {name.upper()} id is {d.get(name)}, the model's {t.get(name)}")
    for name in sorted(set(t) & set(d)):
        if t[name] != d[name]:
            raise BadInputError(f"{where}: its {name} token is id {d[name]}, the model's {t[name]}")
