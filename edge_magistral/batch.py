"""The pieces of one decoding step: the ``llama_batch`` the engine fills, and which prompt prefix
the shared KV stream holds (see ``engine.py`` for how they are used)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp  # noqa: I001  first, before numpy (see model.py)
import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PrefixCache:
    """Which tokens the reserved sequence holds, and when to replace them (the KV operations
    stay with the engine). It keeps the longest prefix the latest two prompts shared, and at
    least the latest prompt's system prompt, so a changed system prompt takes over at once."""

    limit: int  # at most this many tokens (their KV cells are reserved for it)
    system_end: int | None  # the token that closes a system prompt ([/SYSTEM_PROMPT]), if any
    tokens: list[int] = field(default_factory=list)
    last_prompt: list[int] = field(default_factory=list)

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many of ``prompt``'s first tokens the cache holds (one is always left to evaluate,
        for fresh logits)."""
        return min(common_prefix(self.tokens, prompt), len(prompt) - 1)

    def offer(self, prompt: Sequence[int]) -> int:
        """After ``prompt`` was evaluated: how many of its first tokens to cache now (0: keep)."""
        n = max(common_prefix(prompt, self.last_prompt), self._system_len(prompt))
        self.last_prompt = list(prompt)
        n = min(n, self.limit, len(prompt) - 1)
        if n <= 0 or self.tokens[:n] == list(prompt[:n]):  # already held, or a longer prefix of it
            return 0
        self.tokens = list(prompt[:n])
        return n

    def _system_len(self, prompt: Sequence[int]) -> int:
        if self.system_end is None or self.system_end not in prompt:
            return 0
        return list(prompt).index(self.system_end) + 1


class Batch:
    """A ``llama_batch`` over arrays the engine owns (one sequence id per token), filled a run of
    tokens at a time: a 512-token prompt chunk is four slice copies, not 2,500 ctypes stores (on
    the tiny test model those stores cost 6% of pp512); a single token takes plain stores."""

    def __init__(self, size: int):
        lc = llama_cpp
        self.size = size
        self._token = (lc.llama_token * size)()
        self._pos = (lc.llama_pos * size)()
        self._seq = (lc.llama_seq_id * size)()
        self._logits = (ctypes.c_int8 * size)()
        n_seq = (ctypes.c_int32 * size)(*([1] * size))
        seq_ptrs = (ctypes.POINTER(lc.llama_seq_id) * size)(
            *[ctypes.cast(ctypes.addressof(self._seq) + i * ctypes.sizeof(lc.llama_seq_id),
                          ctypes.POINTER(lc.llama_seq_id)) for i in range(size)])
        self._keep = (n_seq, seq_ptrs)  # the struct points into them
        self.struct = lc.llama_batch(
            n_tokens=0, token=ctypes.cast(self._token, ctypes.POINTER(ctypes.c_int)), embd=None,
            pos=ctypes.cast(self._pos, ctypes.POINTER(ctypes.c_int)),
            n_seq_id=ctypes.cast(n_seq, ctypes.POINTER(ctypes.c_int)),
            seq_id=ctypes.cast(seq_ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int))),
            logits=ctypes.cast(self._logits, ctypes.POINTER(ctypes.c_byte)))
        self._views = tuple(np.frombuffer(a, dtype=np.int32) for a in (self._token, self._pos, self._seq)) + \
            (np.frombuffer(self._logits, dtype=np.int8),)

    def put(self, i: int, tokens: Sequence[int], pos: int, seq: int) -> int:
        """Tokens ``i..`` of the batch: ``tokens`` at positions ``pos..`` of sequence ``seq``, no
        logits; returns the next free index."""
        n = len(tokens)
        if n <= 8:
            tok, p, sq, lg = self._token, self._pos, self._seq, self._logits
            for k, t in enumerate(tokens):
                tok[i + k], p[i + k], sq[i + k], lg[i + k] = t, pos + k, seq, 0
        else:
            tok, p, sq, lg = self._views
            tok[i:i + n] = tokens
            p[i:i + n] = np.arange(pos, pos + n, dtype=np.int32)
            sq[i:i + n] = seq
            lg[i:i + n] = 0
        return i + n

    def want_logits(self, i: int) -> None:
        self._logits[i] = 1
