"""The [THINK] watchdog: a pure state machine the engine feeds one generated token at a time.

It decides, per token, whether generation goes on (``CONTINUE``), whether the thought must be
closed now (``FORCE_CLOSE``: inject a wrap-up sentence and ``[/THINK]``, then let the model answer)
or whether the turn ends (``STOP``). It never imports llama.cpp and does no I/O; the monotonic
clock is injected, so tests drive time. Everything it does to a turn is recorded as a
:class:`WatchdogEvent` and summed up by :meth:`Watchdog.usage`.

How the engine drives it::

    wd = Watchdog(config)                 # may raise BadInputError (max_tokens too small)
    d = wd.start()                        # think_budget=0: FORCE_CLOSE whose inject = (THINK, END_THINK):
                                          #   append those ids to the *prompt* (not counted as output)
    # during prefill, between batches: wd.poll() -> STOP("ttft_deadline"/"deadline") or CONTINUE
    loop:
        token = sample(logits with every id in d.banned set to -inf)
        phase = wd.phase                  # read *before* feed: THINKING -> reasoning text, else answer
        text, complete = detokenizer.push(token)   # text only of whole code points; complete=False
                                                   # while a multi-byte character is still pending
        d = wd.feed(token, text, complete)
        if d.drop: discard the token (do not stream it, do not evaluate it), continue sampling
        else: stream `text` as `phase` (control tokens never as text); the token is evaluated next
        if d.action is FORCE_CLOSE: evaluate d.inject (strings tokenized with special parsing off,
            ints fed as ids), stream its text as reasoning, then call wd.injected(n_tokens)
        if d.action is STOP: end the turn; finish_reason = wd.usage().finish_reason

Decisions for ``CONTINUE`` are cached objects, so the hot path allocates nothing; ``d.banned``
is the *complete* set of ids to ban from now on and is the same object until it changes, so the
engine can compare it by identity to update its logit bias only when needed.

Choices documented here because they are policy:
- The think budget counts the tokens inside the thought (not ``[THINK]``, ``[/THINK]`` or the
  wrap-up). At the budget the watchdog waits up to ``grace`` more tokens for a sentence or line
  end, then forces the close anyway; the close is never placed inside a multi-byte character.
- A loop (exact periodic tail, or n-gram novelty below a threshold) in the thought closes it at
  once; a loop in the answer stops the turn. Loop detectors restart at every phase change, since
  an answer often repeats the final draft of the thought.
- ``deadline_s`` is a hard wall-clock limit: STOP in any phase. Before that, a thought still open
  at ``think_deadline_fraction`` of the deadline is closed (reason ``deadline``), so the answer
  gets the rest of the time.
- ``[THINK]`` is banned once the answer has begun (the budget is per turn, not per block), and
  so is ``[/THINK]``; ``</s>`` is banned until the answer has ``min_answer_tokens`` non-blank
  tokens, so a turn never ends with an empty answer. An ``</s>`` inside the thought is replaced
  by the close. A banned token that is sampled anyway (an engine that does not apply the bias)
  is dropped and recorded; after ``max_violations`` of those the turn is stopped.
- A model whose first token is not ``[THINK]`` is answering without thinking: that is accepted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from edge_magistral.errors import BadInputError
from edge_magistral.tekken import END_THINK, EOS, THINK

WRAP_UP_TEXT = (
    "\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n"
)
MIN_THINKING_TEMPERATURE = 0.5  # below this, reasoning models fall into loops (greedy is the worst)


class Phase(str, Enum):
    BEFORE = "before"  # nothing generated yet
    THINKING = "thinking"
    ANSWER = "answer"
    DONE = "done"


class Action(str, Enum):
    CONTINUE = "continue"
    FORCE_CLOSE = "force_close"
    STOP = "stop"


class Reason(str, Enum):
    """Why the watchdog acted (values are stable strings for JSON, the audit log and the API)."""

    NO_THINKING = "no_thinking"  # think_budget 0: the thought is closed before it opens
    THINK_BUDGET = "think_budget"
    LOOP = "loop"
    EOS_IN_THINKING = "eos_in_thinking"
    DEADLINE = "deadline"
    TTFT_DEADLINE = "ttft_deadline"
    MAX_TOKENS = "max_tokens"
    ANSWER_BUDGET = "answer_budget"
    EOS = "eos"  # the answer ended naturally (not an intervention)
    VIOLATIONS = "violations"  # too many banned tokens sampled anyway
    THINK_AFTER_CLOSE = "think_after_close"
    NESTED_THINK = "nested_think"
    END_THINK_IN_ANSWER = "end_think_in_answer"
    EOS_BEFORE_ANSWER = "eos_before_answer"
    BUDGET_CLIPPED = "think_budget_clipped"


@dataclass(frozen=True)
class Decision:
    """What the engine must do after feeding a token.

    ``inject``: for FORCE_CLOSE, what to feed the model, in order: strings are text to tokenize
    (special-token parsing off) and stream as reasoning, ints are control-token ids.
    ``drop``: the token just fed must be discarded (not streamed, not evaluated).
    ``banned``: every token id the engine must make impossible from now on.
    """

    action: Action
    reason: Reason | None = None
    banned: frozenset[int] = frozenset()
    inject: tuple[str | int, ...] = ()
    drop: bool = False


@dataclass(frozen=True)
class WatchdogEvent:
    """One intervention, with the counts at the moment it happened."""

    action: str  # "force_close" | "stop" | "drop" | "clip"
    reason: Reason
    reasoning_tokens: int
    answer_tokens: int
    elapsed_s: float
    detail: str = ""


@dataclass(frozen=True)
class WatchdogUsage:
    """Counts for usage reporting: completion = reasoning + answer tokens."""

    reasoning_tokens: int
    answer_tokens: int
    completion_tokens: int
    reasoning_truncated: bool  # the watchdog cut the thought (budget, loop, deadline)
    close_reason: Reason | None  # why the watchdog closed the thought; None if the model did
    stop_reason: Reason | None  # why the turn ended; None while it runs
    finish_reason: str | None  # OpenAI's: "stop" (natural end) or "length" (cut by the runtime)
    think_budget: int  # the effective budget (after clipping)
    requested_think_budget: int | None
    events: tuple[WatchdogEvent, ...]


@dataclass(frozen=True)
class WatchdogConfig:
    """Limits for one turn. ``think_budget=None`` means as much as ``max_tokens`` leaves room for."""

    think_budget: int | None = 8192
    grace_fraction: float = 0.10  # how long to wait past the budget for a sentence end ...
    grace_max: int = 256  # ... at most this many tokens
    answer_budget: int | None = None
    max_tokens: int = 40960  # all generated tokens: thought, wrap-up and answer
    deadline_s: float | None = None
    think_deadline_fraction: float = 0.75
    ttft_deadline_s: float | None = None
    wrap_up_text: str = WRAP_UP_TEXT
    wrap_up_reserve: int = 32  # tokens kept for the wrap-up and [/THINK] when clipping the budget
    answer_reserve: int = 256  # tokens kept for the answer when clipping the budget
    min_think_budget: int = 64  # a clipped budget below this is refused (BadInputError)
    min_answer_tokens: int = 1  # non-blank answer tokens before </s> is allowed
    max_violations: int = 8
    loop_max_period: int = 64  # exact periodic tail: pattern sizes 1..loop_max_period ...
    loop_min_repeats: int = 4  # ... repeated at least this often ...
    loop_min_span: int = 48  # ... and covering at least this many tokens ("the the" is no loop)
    novelty_n: int = 4  # n-gram size of the novelty measure
    novelty_window: int = 512  # tokens in its sliding window
    novelty_min_thinking: float = 0.35  # distinct n-grams / n-grams below this is a loop (thought)
    novelty_min_answer: float = 0.25  # ... in the answer, where a false stop costs more
    think_id: int = THINK
    end_think_id: int = END_THINK
    eos_id: int = EOS

    def __post_init__(self) -> None:
        for problem in _config_problems(self):
            raise BadInputError(f"invalid watchdog setting: {problem}")


def _config_problems(c: WatchdogConfig) -> list[str]:
    """Every setting out of range, described so that the caller knows what to change."""
    checks = [
        (c.think_budget is None or c.think_budget >= 0, "think_budget must be >= 0 (0 = no thinking)"),
        (0.0 <= c.grace_fraction <= 1.0, "grace_fraction must be within [0, 1]"),
        (c.grace_max >= 0, "grace_max must be >= 0"),
        (c.answer_budget is None or c.answer_budget >= 1, "answer_budget must be >= 1"),
        (c.max_tokens >= 1, "max_tokens must be >= 1"),
        (c.deadline_s is None or c.deadline_s > 0, "deadline_s must be > 0"),
        (0.0 < c.think_deadline_fraction <= 1.0, "think_deadline_fraction must be within (0, 1]"),
        (c.ttft_deadline_s is None or c.ttft_deadline_s > 0, "ttft_deadline_s must be > 0"),
        (c.wrap_up_reserve >= 1, "wrap_up_reserve must be >= 1"),
        (c.answer_reserve >= 0, "answer_reserve must be >= 0"),
        (c.min_think_budget >= 1, "min_think_budget must be >= 1"),
        (c.min_answer_tokens >= 0, "min_answer_tokens must be >= 0"),
        (c.max_violations >= 1, "max_violations must be >= 1"),
        (c.loop_max_period >= 1 and c.loop_min_repeats >= 2 and c.loop_min_span >= 2,
         "loop_max_period >= 1, loop_min_repeats >= 2, loop_min_span >= 2"),
        (1 <= c.novelty_n < c.novelty_window, "novelty_n must be >= 1 and < novelty_window"),
        (0.0 <= c.novelty_min_thinking <= 1.0 and 0.0 <= c.novelty_min_answer <= 1.0,
         "novelty thresholds must be within [0, 1]"),
        (len({c.think_id, c.end_think_id, c.eos_id}) == 3, "think_id, end_think_id and eos_id must differ"),
    ]
    return [message for ok, message in checks if not ok]


# ------------------------------------------------------------------------------ helpers


def check_sampling(temperature: float, thinking: bool) -> tuple[float, str | None]:
    """The temperature to use and why it was changed (None if unchanged).

    Greedy or near-greedy decoding makes reasoning models repeat themselves until the budget,
    so in thinking mode the temperature is raised to :data:`MIN_THINKING_TEMPERATURE`.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise BadInputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if thinking and temperature < MIN_THINKING_TEMPERATURE:
        return MIN_THINKING_TEMPERATURE, (
            f"temperature {temperature:g} raised to {MIN_THINKING_TEMPERATURE:g}: greedy decoding makes a "
            "reasoning model loop (pass think_budget=0 to answer without thinking at this temperature)")
    return temperature, None


def grace_tokens(budget: int, config: WatchdogConfig) -> int:
    """How many tokens past the budget the close may wait for a sentence end."""
    return min(config.grace_max, int(budget * config.grace_fraction))


def resolve_think_budget(config: WatchdogConfig) -> tuple[int, bool]:
    """The effective think budget and whether it was clipped to fit ``max_tokens``.

    The turn needs room for [THINK], budget + grace, the wrap-up and a minimal answer. A budget
    that does not fit is clipped; one that cannot reach ``min_think_budget`` is refused.
    """
    wanted = config.think_budget
    if wanted == 0:
        return 0, False
    answer_reserve = min(config.answer_reserve, config.answer_budget or config.answer_reserve)
    room = config.max_tokens - 1 - config.wrap_up_reserve - answer_reserve
    if wanted is not None and wanted + grace_tokens(wanted, config) <= room:
        return wanted, False
    fits = _largest_fitting_budget(room, config)
    if fits < config.min_think_budget:
        smallest = config.min_think_budget
        need = smallest + grace_tokens(smallest, config) + config.max_tokens - room
        raise BadInputError(
            f"max_tokens={config.max_tokens} leaves no room to think: the smallest think budget "
            f"({smallest} tokens, plus grace, [THINK], a {config.wrap_up_reserve}-token wrap-up and a "
            f"{answer_reserve}-token answer) needs max_tokens >= {need}; "
            "raise max_tokens or set think_budget=0")
    return fits, wanted is not None


def _largest_fitting_budget(room: int, config: WatchdogConfig) -> int:
    """The largest budget B with B + grace(B) <= room (0 if none)."""
    if room <= 0:
        return 0
    budget = max(room - config.grace_max, int(room / (1.0 + config.grace_fraction)))
    while budget > 0 and budget + grace_tokens(budget, config) > room:
        budget -= 1
    while budget + 1 + grace_tokens(budget + 1, config) <= room:
        budget += 1
    return budget


_SENTENCE_END = frozenset(".!?;…。！？；")
_CLOSERS = "\"')]}»”’*_` \t"


def ends_sentence(text: str) -> bool:
    """Whether a decoded piece ends a sentence or a line (a good place to close a thought)."""
    if text.rstrip(" \t").endswith("\n"):
        return True
    stripped = text.rstrip(_CLOSERS)
    return bool(stripped) and stripped[-1] in _SENTENCE_END


# ------------------------------------------------------------------------- loop detectors


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

    def __init__(self, config: WatchdogConfig, novelty_min: float):
        self.periodic = PeriodicTail(config.loop_max_period, config.loop_min_repeats, config.loop_min_span)
        self.novelty = NgramNovelty(config.novelty_n, config.novelty_window, novelty_min)

    def push(self, token: int) -> str | None:
        """Add a token; a description of the loop found, or None."""
        period = self.periodic.push(token)
        low_novelty = self.novelty.push(token)
        if period:
            return f"period {period} repeated {self.periodic.repeats(period)} times"
        if low_novelty:
            return f"n-gram novelty {self.novelty.fraction:.2f} over the last {self.novelty.window} tokens"
        return None


# ---------------------------------------------------------------------------- watchdog


@dataclass
class _Counts:
    total: int = 0  # every output token: thought, control tokens, wrap-up, answer
    reasoning: int = 0  # [THINK], thought, wrap-up, [/THINK]
    think: int = 0  # tokens inside the thought (what the budget counts)
    answer: int = 0
    visible_answer: int = 0  # answer tokens with non-blank text (counted while </s> is banned)
    violations: int = 0
    fed: int = 0  # tokens fed, dropped ones included


@dataclass
class _Closing:
    """A close that has been decided but waits for a good place."""

    reason: Reason
    force_at: int  # think-token count at which the close happens even without a sentence end
    wait_for_sentence: bool
    detail: str = ""


class Watchdog:
    """Decides, token by token, when a turn's thought is closed and when the turn stops."""

    def __init__(self, config: WatchdogConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = c = config or WatchdogConfig()
        self._clock = clock
        self._t0 = clock()
        self.think_budget, clipped = resolve_think_budget(c)
        self.grace = grace_tokens(self.think_budget, c)
        self.events: list[WatchdogEvent] = []
        self.phase = Phase.BEFORE
        self.counts = _Counts()
        self.close_reason: Reason | None = None
        self.reasoning_truncated = False
        self.stop_reason: Reason | None = None
        self._closing: _Closing | None = None
        self._loops = LoopDetector(c, c.novelty_min_thinking)
        self._timed = c.deadline_s is not None or c.ttft_deadline_s is not None
        self._soft_deadline = None if c.deadline_s is None else c.deadline_s * c.think_deadline_fraction
        # the latest think-token count at which the thought must close so that max_tokens still
        # holds the wrap-up and a minimal answer (a safety net under the clipped budget)
        self._think_cap = c.max_tokens - 1 - c.wrap_up_reserve - c.min_answer_tokens
        self._stop_decision: Decision | None = None
        self._feed_phase: Callable[[int, str, bool], Decision] = self._feed_before
        self._set_banned(frozenset())
        if clipped:
            detail = f"think budget {c.think_budget} -> {self.think_budget} to fit max_tokens={c.max_tokens}"
            self._event("clip", Reason.BUDGET_CLIPPED, detail)

    # ------------------------------------------------------------------ engine entry points

    def start(self) -> Decision:
        """Call once before generation; restarts the clock. With think_budget 0 the answer
        begins at once: append ``inject`` ([THINK], [/THINK]) to the prompt."""
        self._t0 = self._clock()
        if self.think_budget == 0 and self.phase is Phase.BEFORE:
            self._enter_answer()
            self.close_reason = Reason.NO_THINKING
            return Decision(Action.FORCE_CLOSE, Reason.NO_THINKING, self.banned,
                            inject=(self.config.think_id, self.config.end_think_id))
        return self._continue

    def poll(self) -> Decision:
        """Deadline checks without a token (e.g. between prefill batches): STOP or CONTINUE."""
        if self._stop_decision is not None:
            return self._stop_decision
        if not self._timed:
            return self._continue
        return self._check_time(self._clock() - self._t0) or self._continue

    def feed(self, token_id: int, text: str = "", complete: bool = True) -> Decision:
        """Account one sampled token and decide. ``text`` is its decoded piece (whole code
        points only); ``complete`` is False while a multi-byte character is still pending."""
        if self._stop_decision is not None:
            return self._stop_decision
        if self._timed:
            stop = self._check_time(self._clock() - self._t0)
            if stop is not None:
                return stop
        self.counts.fed += 1
        return self._feed_phase(token_id, text, complete)

    def injected(self, n_tokens: int) -> None:
        """Count the tokens the engine fed for a FORCE_CLOSE (wrap-up text and [/THINK])."""
        self.counts.total += n_tokens
        self.counts.reasoning += n_tokens

    def usage(self) -> WatchdogUsage:
        c = self.counts
        finish = None
        if self.stop_reason is not None:
            finish = "stop" if self.stop_reason is Reason.EOS else "length"
        return WatchdogUsage(c.reasoning, c.answer, c.total, self.reasoning_truncated, self.close_reason,
                             self.stop_reason, finish, self.think_budget, self.config.think_budget,
                             tuple(self.events))

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._t0

    # ------------------------------------------------------------------------------ phases

    def _feed_before(self, token: int, text: str, complete: bool) -> Decision:
        """The first token: [THINK] opens the thought; anything else starts the answer."""
        c = self.config
        if token == c.think_id:
            self.counts.total += 1
            self.counts.reasoning += 1
            self.phase = Phase.THINKING
            self._feed_phase = self._feed_thinking
            return self._continue
        if token == c.end_think_id:  # an empty thought closed without opening: harmless
            self.counts.total += 1
            self.counts.reasoning += 1
            self._enter_answer()
            return self._continue
        self._enter_answer()
        return self._feed_answer(token, text, complete)

    def _feed_thinking(self, token: int, text: str, complete: bool) -> Decision:
        c, counts = self.config, self.counts
        if token == c.end_think_id:  # the model closed its thought itself
            counts.total += 1
            counts.reasoning += 1
            self._enter_answer()
            return self._continue
        if token == c.eos_id:
            self._closing = _Closing(Reason.EOS_IN_THINKING, counts.think, False)
            return self._force_close(drop=True)
        if token == c.think_id:
            return self._violation(Reason.NESTED_THINK)
        counts.total += 1
        counts.reasoning += 1
        n = counts.think = counts.think + 1
        loop = self._loops.push(token)
        if loop is not None and (self._closing is None or self._closing.reason is not Reason.LOOP):
            self._closing = _Closing(Reason.LOOP, n, False, loop)
        elif self._closing is None and (n >= self.think_budget or n >= self._think_cap):
            reason = Reason.THINK_BUDGET if n >= self.think_budget else Reason.MAX_TOKENS
            self._closing = _Closing(reason, min(n + self.grace, self._think_cap), True)
        closing = self._closing
        if closing is not None and complete and (
                n >= closing.force_at or (closing.wait_for_sentence and ends_sentence(text))):
            return self._force_close(drop=False)
        return self._continue

    def _feed_answer(self, token: int, text: str, complete: bool) -> Decision:
        c, counts = self.config, self.counts
        if token == c.eos_id:
            if self._eos_ban:
                return self._violation(Reason.EOS_BEFORE_ANSWER)
            return self._stop(Reason.EOS, record=False)
        if token == c.think_id or token == c.end_think_id:
            reason = Reason.THINK_AFTER_CLOSE if token == c.think_id else Reason.END_THINK_IN_ANSWER
            return self._violation(reason)
        counts.total += 1
        n = counts.answer = counts.answer + 1
        if self._eos_ban and text.strip():
            counts.visible_answer += 1
            if counts.visible_answer >= c.min_answer_tokens:
                self._set_banned(frozenset((c.think_id, c.end_think_id)))
        loop = self._loops.push(token)
        if loop is not None:
            return self._stop(Reason.LOOP, loop)
        if c.answer_budget is not None and n >= c.answer_budget:
            return self._stop(Reason.ANSWER_BUDGET)
        if counts.total >= c.max_tokens:
            return self._stop(Reason.MAX_TOKENS)
        return self._continue

    # ------------------------------------------------------------------------ transitions

    def _enter_answer(self) -> None:
        c = self.config
        self.phase = Phase.ANSWER
        self._closing = None
        self._loops = LoopDetector(c, c.novelty_min_answer)
        self._feed_phase = self._feed_answer
        banned = {c.think_id, c.end_think_id}
        if c.min_answer_tokens > 0:
            banned.add(c.eos_id)
        self._set_banned(frozenset(banned))

    def _force_close(self, drop: bool) -> Decision:
        closing = self._closing
        assert closing is not None
        truncated = closing.reason is not Reason.EOS_IN_THINKING
        detail = closing.detail
        if closing.reason is Reason.THINK_BUDGET:
            over = self.counts.think - self.think_budget
            detail = f"budget {self.think_budget}, closed {over} tokens later (grace {self.grace})"
        self._event("force_close", closing.reason, detail)
        self.close_reason = closing.reason
        self.reasoning_truncated = truncated
        self._enter_answer()
        inject: tuple[str | int, ...] = (self.config.end_think_id,)
        if truncated:
            inject = (self.config.wrap_up_text, self.config.end_think_id)
        return Decision(Action.FORCE_CLOSE, closing.reason, self.banned, inject=inject, drop=drop)

    def _violation(self, reason: Reason) -> Decision:
        """A banned token was sampled anyway: drop it; too many of them end the turn."""
        self.counts.violations += 1
        self._event("drop", reason)
        if self.counts.violations >= self.config.max_violations:
            return self._stop(Reason.VIOLATIONS, f"{self.counts.violations} banned tokens sampled")
        return Decision(Action.CONTINUE, reason, self.banned, drop=True)

    def _stop(self, reason: Reason, detail: str = "", record: bool = True) -> Decision:
        if record:
            self._event("stop", reason, detail)
        self.stop_reason = reason
        if self.phase is Phase.THINKING:  # the turn ends inside the thought (deadline, violations)
            self.reasoning_truncated = True
        self.phase = Phase.DONE
        self._stop_decision = Decision(Action.STOP, reason, self.banned)
        return self._stop_decision

    def _check_time(self, elapsed: float) -> Decision | None:
        """STOP past a deadline; start closing the thought past the soft deadline."""
        c = self.config
        if c.ttft_deadline_s is not None and self.counts.fed == 0 and elapsed > c.ttft_deadline_s:
            return self._stop(Reason.TTFT_DEADLINE, f"no token after {elapsed:.2f}s")
        if c.deadline_s is None:
            return None
        if elapsed >= c.deadline_s:
            return self._stop(Reason.DEADLINE, f"{elapsed:.2f}s >= {c.deadline_s:g}s")
        if (self.phase is Phase.THINKING and self._closing is None and self._soft_deadline is not None
                and elapsed >= self._soft_deadline):
            n = self.counts.think
            self._closing = _Closing(Reason.DEADLINE, min(n + 1 + self.grace, self._think_cap), True,
                                     f"{elapsed:.2f}s >= {self._soft_deadline:g}s")
        return None

    # -------------------------------------------------------------------------- bookkeeping

    def _set_banned(self, banned: frozenset[int]) -> None:
        self.banned = banned
        self._eos_ban = self.config.eos_id in banned
        self._continue = Decision(Action.CONTINUE, None, banned)

    def _event(self, action: str, reason: Reason, detail: str = "") -> None:
        self.events.append(WatchdogEvent(action, reason, self.counts.reasoning, self.counts.answer,
                                         round(self._clock() - self._t0, 6), detail))


def per_token_cost_us(token_ids: Sequence[int], config: WatchdogConfig | None = None) -> float:
    """Microseconds the watchdog adds per token for this stream (for benchmarks).

    The ids are fed as one thought after [THINK]; by default the budget and max_tokens exceed
    the stream, so every token takes the full path (counting, both loop detectors).
    """
    n = len(token_ids)
    config = config or WatchdogConfig(think_budget=n + 1, max_tokens=2 * n + 1024)
    wd = Watchdog(config)
    wd.start()
    wd.feed(config.think_id, "")
    feed = wd.feed
    t0 = time.perf_counter()
    for token in token_ids:
        feed(token, "x")
    return (time.perf_counter() - t0) * 1e6 / max(1, n)
