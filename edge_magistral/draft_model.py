"""A draft model for speculative decoding: a small GGUF with the target's vocabulary proposes
the next tokens greedily, the target verifies them (see :mod:`edge_magistral.speculate`).

The draft has its own llama.cpp context, one KV stream per slot of the target (plus llama.cpp's
spare one for several slots, unused here), and keeps in each stream the longest prefix of the
turn it has already evaluated: a proposal evaluates only what the target accepted since, then
decodes ``k`` tokens one by one. A draft token is the argmax of the draft's logits: a fixed token,
so the engine's accept rule keeps the target's distribution exactly.

Its vocabulary must be the target's id for id: the same number of tokens, the same special ids
(BOS, EOS, and for Magistral [THINK], [/THINK], [TOOL_CALLS], [ARGS]) and the same pieces for a
spread of ids. A draft that differs is refused at load with what differs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import llama_cpp  # noqa: I001  first, before numpy (see model.py)
import numpy as np

from edge_magistral.batch import Batch, common_prefix
from edge_magistral.errors import BadInputError
from edge_magistral.generation import LoadSettings
from edge_magistral.model import LoadedModel

VOCAB_SAMPLE = 4096  # pieces compared, spread over the vocabulary (plus every id below 1000)


def check_same_vocab(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose tokens are not the target's, id for id (a guess is a token id: in
    another vocabulary it means another text)."""
    where = f"the draft model {draft.settings.model_path}"
    if draft.n_vocab != target.n_vocab:
        raise BadInputError(f"{where} has {draft.n_vocab} tokens, the model {target.n_vocab}: a draft must share "
                            "the model's vocabulary (for Magistral: a Tekken v13 model)")
    lc = llama_cpp
    for name, fn in (("BOS", lc.llama_vocab_bos), ("EOS", lc.llama_vocab_eos)):
        if fn(draft.vocab) != fn(target.vocab):
            raise BadInputError(f"{where}: its {name} id is {fn(draft.vocab)}, the model's {fn(target.vocab)}")
    n = target.n_vocab
    ids = sorted(set(range(min(1000, n))) | set(np.linspace(0, n - 1, VOCAB_SAMPLE, dtype=int).tolist()))
    for i in ids:
        a, b = target.llama_piece(i, special=True), draft.llama_piece(i, special=True)
        if a != b:
            raise BadInputError(f"{where}: token {i} is {b!r} there and {a!r} in the model; a draft must share "
                                "the model's vocabulary id for id")


class DraftModel:
    """The loaded draft and its per-slot KV streams (owned by the engine's decoding thread)."""

    def __init__(self, settings: LoadSettings, target: LoadedModel):
        draft_settings = replace(settings, model_path=settings.draft_model, n_gpu_layers=settings.draft_gpu_layers,
                                 speculate="off", draft_model=None, draft_gpu_layers=0, backend_sampling=False)
        self.model = LoadedModel(draft_settings)
        try:
            check_same_vocab(target, self.model)
        except BadInputError:
            self.model.close()
            raise
        self.mem = llama_cpp.llama_get_memory(self.model.ctx)
        self.batch = Batch(max(1, settings.n_batch))
        self.n_ctx = self.model.n_ctx
        self.held: dict[int, list[int]] = {}  # stream → the tokens its KV holds
        self.free = [0] if settings.n_slots == 1 else list(range(settings.n_slots, 0, -1))
        # seconds per guess of a whole proposal (the catch-up of the tokens the turn took since, and
        # the guesses' own decodes), running average: what a guess really costs
        self.guess_s: float | None = None

    def open(self, history: Sequence[int]) -> DraftSeq:
        """A turn's draft, starting from ``history`` (its prompt as evaluated)."""
        return DraftSeq(self, self.free.pop(), history)

    def close(self) -> None:
        self.model.close()

    def decode(self, seq: int, tokens: Sequence[int], pos: int) -> int:
        """Evaluate ``tokens`` at ``pos..`` of stream ``seq`` (in batches); the argmax after the last."""
        b, step = self.batch, self.batch.size
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            n = b.put(0, chunk, pos + start, seq)
            b.want_logits(n - 1)
            b.struct.n_tokens = n
            if llama_cpp.llama_decode(self.model.ctx, b.struct) != 0:
                raise RuntimeError("the draft model's decode failed (its KV cache is full?)")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.model.ctx, n - 1),
                                       shape=(self.model.n_vocab,))
        return int(logits.argmax())


class DraftSeq:
    """One turn's guesses from the draft model: ``push`` what the turn evaluates, ``propose``
    the next ``k`` (the interface of :class:`edge_magistral.speculate.NgramDraft`)."""

    cheap = False  # a proposal costs draft decodes: not made just to measure acceptance

    def __init__(self, dm: DraftModel, seq: int, history: Sequence[int]):
        self.dm, self.seq = dm, seq
        self.tokens = list(history)
        self.kv = dm.held.setdefault(seq, [])  # what the stream holds (kept from its last turn)

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        dm, kv, toks = self.dm, self.kv, self.tokens
        k = min(k, dm.n_ctx - len(toks) - 1)
        if k <= 0:
            return []
        t0 = time.perf_counter()
        keep = min(common_prefix(kv, toks), len(toks) - 1)  # the last token is evaluated for fresh logits
        if keep < len(kv):
            llama_cpp.llama_memory_seq_rm(dm.mem, self.seq, keep, -1)
            del kv[keep:]
        out = [dm.decode(self.seq, toks[keep:], keep)]
        kv.extend(toks[keep:])
        while len(out) < k:
            kv.append(out[-1])
            out.append(dm.decode(self.seq, out[-1:], len(kv) - 1))
        dt = (time.perf_counter() - t0) / k  # the argmax read the logits: the device has finished
        dm.guess_s = dt if dm.guess_s is None else 0.9 * dm.guess_s + 0.1 * dt
        return out

    def guess_cost(self, t1: float | None) -> float:
        """A guess's draft work, as a fraction of the target's one-token step."""
        if t1 is None or t1 <= 0 or self.dm.guess_s is None:
            return 0.05
        return self.dm.guess_s / t1

    def release(self) -> None:
        """The turn ended: the stream goes back (its KV stays, a prefix for the next turn)."""
        self.dm.free.append(self.seq)


def open_draft(settings: LoadSettings, target: Any) -> DraftModel | None:
    """The draft model of ``settings.speculate == "draft"``, else None."""
    if settings.speculate != "draft":
        return None
    return DraftModel(settings, target)
