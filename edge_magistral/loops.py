"""Loop detectors for a token stream, each O(1) or close to it per token.

A reasoning model can fall into a loop: the same sentence verbatim (an exactly periodic tail of
period 1..64 tokens) or the same phrases paraphrased in a different order (the share of distinct
n-grams in a sliding window collapses). The [THINK] watchdog runs both over each phase's tokens;
neither rescans the stream, so a 40k-token thought costs the same per token as a short one.
"""

from __future__ import annotations

import math
from collections import deque


class PeriodicTail:
    """Detects an exactly periodic tail: some pattern of 1..max_period tokens repeated at least
    ``max(min_repeats, ceil(min_span / p))`` times in a row at the end of the stream.

    ``run[p]`` counts how many of the latest tokens each equal the token ``p`` places earlier;
    the tail is p-periodic over ``run[p] + p`` tokens. Only the periods at which the new token
    occurred within the last ``max_period`` tokens are touched (found through per-token position
    queues); other runs are reset lazily by remembering where they last grew. So a token costs
    O(its occurrences in the last max_period tokens) — a few for text — never a rescan.
    """

    __slots__ = ("_n", "_need", "_ring", "_where", "_run", "_last", "_i")

    def __init__(self, max_period: int, min_repeats: int, min_span: int):
        self._n = max_period
        # run length that proves the repeats: (repeats - 1) * p matches of the token p back
        self._need = [0] + [(max(min_repeats, -(-min_span // p)) - 1) * p for p in range(1, max_period + 1)]
        self._ring = [0] * max_period  # token at position i % n
        self._where: dict[int, deque[int]] = {}  # token -> its positions within the last n
        self._run = [0] * (max_period + 1)
        self._last = [-2] * (max_period + 1)
        self._i = 0

    def push(self, token: int) -> int:
        """Add a token; the smallest period found repeating at the tail, or 0."""
        i = self._i
        self._i = i + 1
        n, where = self._n, self._where
        found = 0
        positions = where.get(token)
        if positions:
            run, last, need = self._run, self._last, self._need
            for j in positions:  # oldest first, so the smallest period is checked last
                p = i - j
                r = run[p] + 1 if last[p] == i - 1 else 1
                run[p] = r
                last[p] = i
                if r >= need[p]:
                    found = p
        slot = i % n
        if i >= n:  # position i - n leaves the window
            old = self._ring[slot]
            queue = where[old]
            queue.popleft()
            if not queue:
                del where[old]
        self._ring[slot] = token
        queue = where.get(token)
        if queue is None:
            where[token] = deque((i,))
        else:
            queue.append(i)
        return found

    def repeats(self, period: int) -> int:
        """How many times the pattern of this period repeats at the tail (for reporting)."""
        run = self._run[period] if self._last[period] == self._i - 1 else 0
        return (run + period) // period


class NgramNovelty:
    """Distinct n-grams among the last ``window`` n-grams, kept incrementally (O(1) per token).

    A paraphrasing loop reuses the same phrases in a different order: exact periodicity misses
    it, but the share of distinct n-grams collapses. N-grams are packed exactly into one int
    (20 bits per token id), so there are no hash collisions for vocabularies below 2**20.
    """

    __slots__ = ("_n", "window", "_mask", "_key", "_seen", "_ring", "_grams", "_counts", "distinct", "_min")

    _BITS = 20

    def __init__(self, n: int, window: int, min_fraction: float):
        self._n = n
        self.window = window
        self._mask = (1 << (self._BITS * n)) - 1
        self._key = 0
        self._seen = 0
        self._ring = [0] * window
        self._grams = 0
        self._counts: dict[int, int] = {}
        self.distinct = 0
        self._min = math.ceil(min_fraction * window)

    def push(self, token: int) -> bool:
        """Add a token; True when the window is full and too few of its n-grams are distinct."""
        key = ((self._key << self._BITS) | (token & 0xFFFFF)) & self._mask
        self._key = key
        self._seen += 1
        if self._seen < self._n:
            return False
        g, counts = self._grams, self._counts
        slot = g % self.window
        if g >= self.window:
            old = self._ring[slot]
            c = counts[old] - 1
            if c:
                counts[old] = c
            else:
                del counts[old]
                self.distinct -= 1
        self._ring[slot] = key
        c = counts.get(key, 0)
        counts[key] = c + 1
        if not c:
            self.distinct += 1
        self._grams = g + 1
        return g + 1 >= self.window and self.distinct < self._min

    @property
    def fraction(self) -> float:
        return self.distinct / max(1, min(self._grams, self.window))


class LoopDetector:
    """Both loop measures over one phase's tokens."""

    __slots__ = ("periodic", "novelty")

    def __init__(self, max_period: int, min_repeats: int, min_span: int, novelty_n: int, novelty_window: int,
                 novelty_min: float):
        self.periodic = PeriodicTail(max_period, min_repeats, min_span)
        self.novelty = NgramNovelty(novelty_n, novelty_window, novelty_min)

    def push(self, token: int) -> str | None:
        """Add a token; a description of the loop found, or None."""
        period = self.periodic.push(token)
        low_novelty = self.novelty.push(token)
        if period:
            return f"period {period} repeated {self.periodic.repeats(period)} times"
        if low_novelty:
            return f"n-gram novelty {self.novelty.fraction:.2f} over the last {self.novelty.window} tokens"
        return None


class NoLoops:
    """The detector of a stretch that is not free text (a tool call under its grammar): a list of
    similar items in the arguments is structure, not a loop."""

    __slots__ = ()

    def push(self, token: int) -> str | None:
        return None
