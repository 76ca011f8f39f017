"""Speculative decoding: cheap guesses of the next tokens, verified by the model in one batch.

Decoding one token reads every weight once; verifying ``k + 1`` tokens in one batch reads them
once too, so each accepted guess is a token for (nearly) nothing where memory bandwidth is the
limit. The engine (``engine.py``) evaluates ``[t, d1 .. dk]`` with logits for every position and
then samples position by position with the turn's own sampler, exactly as plain decoding would:
a guess is accepted when the sampled token equals it, and the first mismatch is the corrected
token. With guesses that are fixed tokens (a point-mass proposal) this is the standard
accept/reject scheme and keeps the target's distribution exactly; with a seed, each accepted
token consumed the same random draw plain decoding would, so the output is the same tokens. The
turn sees every accepted token in order, so its watchdog, bans, grammar and stop strings hold; a
token it drops, or an injection (a forced ``[/THINK]``), discards the rest of the guesses.

Guesses come from :class:`NgramDraft` (model-free: it looks the last few tokens up in the prompt
and the turn so far and proposes what followed them last time; reasoning repeats itself: quotes
of the question, code, tables, lists) or from a small draft model with the same vocabulary
(:mod:`edge_magistral.draft_model`). :class:`Speculator` decides how many to verify from what it
costs and what it wins: it keeps a running acceptance rate (also measured while not verifying,
by comparing each proposal with the token that came) and a verify-cost slope the engine measures
on its own steps, and picks the ``k`` that maximizes expected tokens per unit of step time, 0
(plain decoding) when no ``k`` is worth it.

Where every layer is on a GPU, llama.cpp replays a captured CUDA graph for a step of the same
shape as the last two and runs a step of a new shape eagerly, then captures it: measured on an
H100 with a Magistral-shaped Q4_K_M, two tokens cost 1.06 one-token steps replayed but 1.20 right
after a one-token step, and the one-token step after that 1.5. Guesses only where a proposal
exists change the shape nearly every step, so there the :class:`Speculator` *holds* its width:
every step verifies exactly ``k`` guesses (a short proposal is padded with weaker ones, down to
the token that followed the last one's previous occurrence), and ``k`` is chosen again every
``HOLD_STEPS`` steps from the measured steady time of each width (hill-climbing one width at a
time, so a width is measured before it is relied on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DRAFT_MAX = 8  # the most guesses verified in one step
NGRAM_SIZES = (4, 3, 2)  # the longest match found first: longer contexts guess better
ACCEPT_PRIOR = 0.5  # the acceptance rate assumed before anything is measured
ACCEPT_WEIGHT = 0.1  # each observation's weight in the running acceptance rate
COST_PRIOR = 0.1  # a guess's extra cost, as a fraction of a one-token step, before it is measured
PROBE_EVERY = 16  # a draft model that does not pay still verifies one guess this often
HOLD_STEPS = 32  # a held width is kept for this many steps before it is chosen again
TRANSIENT_STEPS = 2  # steps of a new shape that are not steady (eager, then the graph capture)


class NgramDraft:
    """Prompt lookup over one turn's tokens: an index from each n-gram to where it last ended."""

    cheap = True  # a proposal costs a dict lookup: made at every token, to measure acceptance

    def __init__(self, history: Sequence[int], sizes: Sequence[int] = NGRAM_SIZES):
        self.sizes = tuple(sizes)
        self.tokens: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in self.sizes]
        for t in history:
            self.push(t)

    def push(self, token: int) -> None:
        """Append a token; index the n-grams that end just before it (each points at it)."""
        toks = self.tokens
        end = len(toks)
        for n, index in zip(self.sizes, self.index):
            if end >= n:
                index[tuple(toks[end - n:end])] = end
        toks.append(token)

    def propose(self, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of the longest suffix that
        occurred before ([] when none did). A match that runs into the end copies on from its own
        proposal (as LZ77 does): a repeating stretch is proposed for as long as asked."""
        toks = self.tokens
        end = len(toks)
        for n, index in zip(self.sizes, self.index):
            if end < n:
                continue
            at = index.get(tuple(toks[end - n:end]))
            if at is not None:
                out = toks[at:at + k]
                while len(out) < k:
                    out.append(out[len(out) - (end - at)])
                return out
        return []


@dataclass
class SpecStats:
    """Counters of one turn's (or one engine's) speculation."""

    drafted: int = 0  # guesses verified
    accepted: int = 0  # guesses that were the sampled token
    steps: int = 0  # verify steps (a step with at least one guess)

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class VerifyCost:
    """How a step's time grows with its tokens, measured on the engine's own generating steps:
    ``t(n) = t1 + slope * (n - 1)``; ``relative`` is slope / t1 (what one more guess costs, as a
    fraction of a one-token step)."""

    def __init__(self, prior: float = COST_PRIOR, fixed: float | None = None):
        self.t1: float | None = None
        self.slope: float | None = None
        self.prior = prior
        self.fixed = fixed  # a known relative cost (tests, benchmarks): measurements are ignored
        self.steady: dict[int, float] = {}  # one sequence: tokens in a step -> its steady seconds
        self.width = 0  # the held width chosen last: the next turn starts from it
        self._shape, self._run = 0, 0  # the last step's token count, and how many in a row had it

    def observe(self, n_tokens: int, seconds: float, n_sequences: int) -> None:
        if n_tokens == n_sequences:  # every sequence decoded one token: the base cost
            self.t1 = seconds / n_sequences if self.t1 is None else 0.9 * self.t1 + 0.1 * seconds / n_sequences
        elif self.t1 is not None and n_tokens > n_sequences:
            extra = max(0.0, (seconds - self.t1 * n_sequences) / (n_tokens - n_sequences))
            self.slope = extra if self.slope is None else 0.8 * self.slope + 0.2 * extra
        self._run = self._run + 1 if n_tokens == self._shape else 1
        self._shape = n_tokens
        if n_sequences == 1 and self._run > TRANSIENT_STEPS:
            old = self.steady.get(n_tokens)
            self.steady[n_tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def step_cost(self, k: int) -> float | None:
        """A held step of ``k`` guesses in one-token steps, both measured steady (None: not yet)."""
        if self.fixed is not None:
            return 1.0 + self.fixed * k
        t1, tk = self.steady.get(1), self.steady.get(k + 1)
        return tk / t1 if t1 and tk else None

    @property
    def relative(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.t1 is None or self.slope is None or self.t1 <= 0:
            return self.prior
        return self.slope / self.t1


def best_k(rate: float, cost: float, available: int, k_max: int = DRAFT_MAX) -> int:
    """The number of guesses that maximizes expected tokens per step time: with acceptance rate
    ``rate`` (each guess accepted given the previous was), a step with ``k`` guesses yields
    ``1 + rate + ... + rate**k`` tokens and costs ``1 + cost * k`` one-token steps."""
    return best_width(rate, lambda k: 1.0 + cost * k, range(1, min(available, k_max) + 1))


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step with ``k`` guesses yields at per-guess acceptance ``rate``."""
    return sum(rate ** i for i in range(k + 1))


def best_width(rate: float, cost_of: Callable[[int], float], ks: Iterable[int], base: int = 0) -> int:
    """Of ``base`` and ``ks``, the number of guesses with the most expected tokens per step cost
    (``cost_of(k)`` in one-token steps, ``cost_of(0)`` = 1; ``base`` first, so a tie keeps it)."""
    best, best_gain = base, expected_tokens(rate, base) / (cost_of(base) if base else 1.0)
    for k in ks:
        gain = expected_tokens(rate, k) / cost_of(k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


class Speculator:
    """One turn's guesses: the draft source, the acceptance rate, and what was proposed."""

    def __init__(self, history: Sequence[int], cost: VerifyCost, k_max: int = DRAFT_MAX,
                 sizes: Sequence[int] = NGRAM_SIZES, draft: Any = None, hold: bool = False):
        if draft is None and hold and 1 not in sizes:
            sizes = (*sizes, 1)  # a held width is filled: a 1-gram's guess beats none
        self.draft = draft if draft is not None else NgramDraft(history, sizes)
        self.cost = cost
        self.k_max = k_max
        self.hold = hold  # verify the same number of guesses every step (see the module's text)
        self.width = cost.width if hold else 0  # hold: the guesses each step verifies now
        self.rate = ACCEPT_PRIOR
        self.stats = SpecStats()
        self._shadow: int | None = None  # the first guess of a proposal not verified
        self._since_probe = 0  # tokens since a costly draft last proposed (see next)
        # hold: steps until the width is chosen again; a width carried over from the last turn is
        # kept for a first epoch while this turn's rate is learned (not judged at the prior's)
        self._hold_left = HOLD_STEPS if hold and cost.step_cost(0) is not None else 0

    def next(self, token: int, room: int) -> list[int]:
        """``token`` was sampled and goes to the KV cache next: the guesses to verify with it
        (at most ``room``), maybe none."""
        if self._shadow is not None:  # the last proposal was not verified: was it right?
            self._learn(self._shadow == token)
            self._shadow = None
        self.draft.push(token)
        if not self.draft.cheap:
            return self._from_model(room)
        if self.hold:
            return self._held(token, room)
        proposal = self.draft.propose(min(self.k_max, room))
        if not proposal:
            return []
        k = best_k(self.rate, self.cost.relative, len(proposal), self.k_max)
        if k == 0:
            self._shadow = proposal[0]
        return proposal[:k]

    def _from_model(self, room: int) -> list[int]:
        """A draft model's guesses cost its decodes too. When none pay at the measured rate, one
        guess is still verified every ``PROBE_EVERY`` tokens, so the rate can recover; unless a
        guess costs a whole step or more, when it cannot pay even if always right."""
        guess = self.draft.guess_cost(self.cost.t1)
        if self.hold:
            k = min(self._held_width(guess), room)
        else:
            k = min(best_k(self.rate, self.cost.relative + guess, room, self.k_max), room)
        self._since_probe += 1
        if k == 0 and self._since_probe >= PROBE_EVERY and room > 0 and self.cost.relative + guess < 1.0:
            k = 1
        if k == 0:
            return []
        self._since_probe = 0
        return self.draft.propose(k)

    def _held(self, token: int, room: int) -> list[int]:
        """Hold: the proposal cut or padded to the held width (the padding repeats its last
        guess); at width 0 its first guess is kept to learn the rate from."""
        if room <= 0:
            return []
        k = min(self._held_width(), room)
        n = max(k, 1)
        guesses = self.draft.propose(n)
        guesses = (list(guesses) + [guesses[-1] if guesses else token] * n)[:n]
        if k == 0:
            self._shadow = guesses[0]
            return []
        return guesses

    def _held_width(self, guess_cost: float = 0.0) -> int:
        """The held width, chosen again every ``HOLD_STEPS`` steps: plain steps until a steady
        one-token step is measured, then the best of the width and its neighbours."""
        if self._hold_left <= 0:
            self._hold_left = HOLD_STEPS
            if self.cost.step_cost(0) is None:
                self.width = 0
            else:
                ks = [j for j in (self.width - 1, self.width + 1) if 0 <= j <= self.k_max]
                self.width = best_width(self.rate, lambda j: self._cost_at(j) + guess_cost * j, ks, self.width)
            self.cost.width = self.width
        self._hold_left -= 1
        return self.width

    def _cost_at(self, k: int) -> float:
        """A held step of ``k`` guesses, in one-token steps: measured, else extrapolated from the
        widest measured width below it (or the linear slope)."""
        known = self.cost.step_cost(k)
        if known is not None:
            return known
        below = max((j for j in range(1, k) if self.cost.step_cost(j) is not None), default=0)
        c = self.cost.step_cost(below) if below else 1.0
        slope = (c - 1.0) / below if below else self.cost.relative
        return c + slope * (k - below)

    def verified(self, drafted: int, accepted: int) -> None:
        """A step verified ``drafted`` guesses and the model agreed with the first ``accepted``."""
        self.stats.steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        for _ in range(accepted):
            self._learn(True)
        if accepted < drafted:
            self._learn(False)

    def accepted_token(self, token: int) -> None:
        """An accepted guess is a token of the turn: the draft index learns it as well."""
        self.draft.push(token)

    def release(self) -> None:
        """The turn ended: a draft model's stream goes back."""
        release = getattr(self.draft, "release", None)
        if release is not None:
            release()

    def injected(self, ids: Sequence[int]) -> None:
        """Tokens the turn injected (a forced ``[/THINK]`` and its wrap-up) are history too; a
        proposal made before them is no longer about the next token."""
        self._shadow = None
        for t in ids:
            self.draft.push(t)

    def _learn(self, hit: bool) -> None:
        self.rate += ACCEPT_WEIGHT * ((1.0 if hit else 0.0) - self.rate)
