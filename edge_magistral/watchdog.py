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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from edge_magistral.loops import LoopDetector, NgramNovelty, NoLoops, PeriodicTail  # noqa: F401  (re-exported)
from edge_magistral.watchdog_config import (  # noqa: F401  (re-exported: the watchdog's settings)
    MIN_THINKING_TEMPERATURE,
    WRAP_UP_TEXT,
    WatchdogConfig,
    check_sampling,
    grace_tokens,
    resolve_think_budget,
)


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


_SENTENCE_END = frozenset(".!?;…。！？；")
_CLOSERS = "\"')]}»”’*_` \t"


def ends_sentence(text: str) -> bool:
    """Whether a decoded piece ends a sentence or a line (a good place to close a thought)."""
    if text.rstrip(" \t").endswith("\n"):
        return True
    stripped = text.rstrip(_CLOSERS)
    return bool(stripped) and stripped[-1] in _SENTENCE_END


# ---------------------------------------------------------------------------- watchdog


def _loops(c: WatchdogConfig, novelty_min: float) -> LoopDetector:
    return LoopDetector(c.loop_max_period, c.loop_min_repeats, c.loop_min_span, c.novelty_n, c.novelty_window,
                        novelty_min)



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
        self._loops = _loops(c, c.novelty_min_thinking)
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

    def stop_loop_checks(self) -> None:
        """A tool call began: its name and arguments follow a grammar, so loops are not looked
        for until the phase changes (the answer budget and max_tokens still hold)."""
        self._loops = NoLoops()

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
        self._loops = _loops(c, c.novelty_min_answer)
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
