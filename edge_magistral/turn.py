"""One turn of generation: the per-token logic every engine path shares.

A :class:`Turn` knows the prompt, the request's limits, the [THINK] watchdog, the detokenizer
and the stop strings; it knows nothing of the KV cache or of batching, so the engine's scheduler
drives any number of turns with one code path. Its lifecycle::

    turn = Turn(model, prompt_ids, limits)   # validates: prompt vs context, max_tokens, schema
    ids = turn.prefill()                     # the ids to evaluate first (the prompt, maybe with
                                             #   [THINK][/THINK] closed in it for think budget 0)
    loop, once the last id's logits exist:
        if turn.stop_due(): turn.end(); break        # a deadline passed (also between prefill chunks)
        going = turn.token(sampled id)               # sampled with turn.sampler()
        evaluate turn.feed (the token, then any forced-close injection; empty: sample again)
        if not going: turn.end(); break
    turn.end("cancelled" | "context_full" | None)    # appends the held text, the watchdog's events, Done
    turn.release()                                   # frees the native sampler

Events accumulate in ``turn.events``; the driver hands them out and clears the list. Thinking and
answer are split by token id ([THINK]/[/THINK]), never by matching text, and text is emitted
only at UTF-8 code point boundaries. When nothing happens, a token costs one text event and no
other allocation: the watchdog's CONTINUE decisions are cached, its event list is compared by
length, and the feed list is reused.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

from edge_magistral import tekken as tk
from edge_magistral.errors import BadInputError, PromptTooLongError
from edge_magistral.generation import (
    DEFAULT_LIMITS,
    AnswerText,
    CallArguments,
    CallStart,
    Done,
    Event,
    Limits,
    ThinkingText,
    Timings,
    Usage,
    WatchdogAction,
)
from edge_magistral.toolcalls import ParseError
from edge_magistral.watchdog import Action, Decision, Phase, Watchdog, check_sampling

# Candidates a device-side top-k keeps beyond the request's top-k: room for the ids the watchdog
# bans (at most [THINK], [/THINK] and </s>) and ignore_eos, so the host's choice stays exact.
BACKEND_TOPK_MARGIN = 8
ENDED_BY = {"cancelled": "cancelled", "stop_string": "stop", "context_full": "length",
            "tool_error": "stop"}  # → finish_reason
# A grammar's alternative start for the first token of a thinking turn: open the thought, or
# begin the constrained answer (llama.cpp matches <[id]> by token id).
FIRST_RULE = f"\nthink-or-answer ::= <[{tk.THINK}]> | root\n"


class Detokenizer:
    """Token → text at constant cost: one piece lookup and an incremental UTF-8 decoder."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.complete = True  # no multi-byte character is pending

    def push(self, token: int) -> str:
        """The text this token completes (``complete`` then says whether bytes are pending)."""
        b = self._piece(token)
        text = self._dec.decode(b)
        self.complete = (b.isascii() and text != "") or not self._dec.getstate()[0]
        return text

    def flush(self) -> str:
        self.complete = True
        return self._dec.decode(b"", final=True)


class StopMatcher:
    """Holds back just enough answer text to find stop strings that span tokens."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.hit = False  # a stop string was found (the text before it was returned)

    def push(self, text: str) -> str:
        """The text safe to emit now."""
        if not self.stops:
            return text
        self.buf += text
        hits = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            out, self.buf, self.hit = self.buf[:min(hits)], "", True
            return out
        cut = len(self.buf) - self.hold
        if cut <= 0:
            return ""
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _always_banned(model: Any, limits: Limits, thinks: bool) -> frozenset[int]:
    """Ids this turn may never sample, whatever the watchdog decides: ``</s>`` under ignore_eos,
    and ``[TOOL_CALLS]`` in a Magistral chat turn that offers no tools (a call would reach the
    client as nothing). A turn with tools bans it inside ``[THINK]`` only (see tool_decoding)."""
    banned = {model.eos_id} if limits.ignore_eos and model.eos_id >= 0 else set()
    if thinks and limits.tools is None:
        banned.add(tk.TOOL_CALLS)
    return frozenset(banned)


def _tooling(model: Any, limits: Limits, thinks: bool) -> Any:
    """The turn's call decoding, or None when it offers no tools."""
    if limits.tools is None:
        return None
    if not thinks:
        raise BadInputError("tools need a Magistral chat turn (not a raw completion or another model's template)")
    if limits.json_schema is not None:
        raise BadInputError("response_format and tools together are not supported: use tool_choice none, "
                            "or drop response_format")
    from edge_magistral.tool_decoding import ToolDecoding  # the grammar converter lives beside llama.cpp

    return ToolDecoding(limits.tools)


class Turn:
    """The state of one request's generation (see the module docstring for its lifecycle).

    ``model`` is a :class:`edge_magistral.model.LoadedModel` (or anything with its tokenization,
    ``sampler`` and ``watchdog_config``): this module never calls llama.cpp itself."""

    def __init__(self, model: Any, prompt: list[int], limits: Limits):
        self.model, self.prompt, self.limits = model, prompt, limits
        self.t0 = time.monotonic()
        if len(prompt) >= model.n_ctx:
            raise PromptTooLongError(
                f"the prompt is {len(prompt)} tokens but the context holds {model.n_ctx}: "
                f"{len(prompt) - model.n_ctx + 1} too many; shorten it or plan a larger --ctx")
        if limits.max_tokens <= 0:
            raise BadInputError("max_tokens must be at least 1")
        self.max_tokens = min(limits.max_tokens, model.n_ctx - len(prompt))
        self.thinks = model.thinks(limits)
        self.wd = Watchdog(model.watchdog_config(limits, self.max_tokens))
        # Only a turn that will think needs the anti-greedy clamp (think budget 0 never thinks).
        self.temperature, self.temp_note = check_sampling(limits.temperature, self.thinks and self.wd.think_budget > 0)
        self.tooling = _tooling(model, limits, self.thinks)
        self.grammar: str | None = None  # the answer's grammar: a JSON schema's, or the tool calls'
        if limits.json_schema is not None:
            from edge_magistral.model import schema_grammar  # the converter lives beside llama.cpp

            self.grammar = schema_grammar(limits.json_schema)
        elif self.tooling is not None:
            self.grammar = self.tooling.grammar
        # The grammar holds from the answer's first token (a JSON schema, a required call), or
        # from the first [TOOL_CALLS] (auto).
        self._from_answer = self.grammar is not None and (self.tooling is None or self.tooling.from_answer)
        self.detok = Detokenizer(model.piece)
        self.stops = StopMatcher(limits.stop)
        self.events: list[Event] = []  # due to the caller; the driver hands them out and clears
        self.feed: Sequence[int] = ()  # what to evaluate after the latest token
        self._one = [0]  # the feed of an ordinary token, reused
        self._events_seen = 0
        self._sampler: Any = None
        self.decision: Decision | None = None  # the watchdog's latest (sampler bans, grammar)
        self._banned: frozenset[int] = frozenset()
        self._tool_bans: frozenset[int] = frozenset()
        self._always_banned = _always_banned(model, limits, self.thinks)
        self._grammar_on = False
        self._root: str | None = None  # the grammar's start rule in use (None: no grammar)
        self._grammar_tokens: list[int] = []  # accepted by the grammar so far (replayed on a rebuild)
        self.n_prefill = len(prompt)  # the prompt as prefill() returns it
        self.cached = 0  # prompt tokens the engine took from its KV cache instead of evaluating
        self.drafted = self.accepted = 0  # speculative guesses verified and accepted (set by the engine)
        self.t_prompt: float | None = None  # when the prompt was evaluated (set by the driver)
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._n_gen = 0
        self.ended_by: str | None = None  # the engine's own reasons: cancelled, stop_string, context_full
        self.done: Done | None = None

    # ------------------------------------------------------------------------ lifecycle
    def prefill(self) -> list[int]:
        """Start the watchdog; the full prompt to evaluate (events due before it are queued)."""
        if self.temp_note:
            self.events.append(WatchdogAction("sampling", "temperature_clamped", self.temp_note))
        d = self.wd.start()
        prompt = list(self.prompt)
        if d.action is Action.FORCE_CLOSE and self.thinks:  # think budget 0: closed in the prompt
            prompt += self._to_parser([p for p in d.inject if isinstance(p, int)])
        elif self.limits.force_thinking and self.thinks:
            prompt += self._to_parser([tk.THINK])
            d = self.wd.feed(tk.THINK, "", True)
        self.decision = d
        self._watchdog_events()
        self.n_prefill = len(prompt)
        return prompt

    def stop_due(self) -> bool:
        """Whether a deadline has passed (between prefill chunks, or before sampling)."""
        return self.wd.poll().action is Action.STOP

    def sampler(self) -> Any:
        """The native sampler for the next token, rebuilt when the watchdog's bans or the call
        bans change, or the grammar switches on or off."""
        d = self.decision
        root = self._grammar_root() if self.grammar is not None else None
        tool_bans = self.tooling.bans(self.wd.phase is Phase.THINKING) if self.tooling is not None else self._tool_bans
        if (self._sampler is not None and d.banned is self._banned and root == self._root
                and tool_bans is self._tool_bans):
            return self._sampler
        self.release()
        self._banned, self._root, self._tool_bans, self._grammar_on = d.banned, root, tool_bans, root is not None
        grammar = None if root is None else self.grammar + FIRST_RULE if root != "root" else self.grammar
        self._sampler = self.model.sampler(self.limits, self.temperature, d.banned | self._always_banned | tool_bans,
                                           grammar, root or "root")
        if root is not None:  # a new grammar sampler starts from its root
            self.model.accept(self._sampler, self._grammar_tokens)
        return self._sampler

    def _grammar_root(self) -> str | None:
        """Which start rule the grammar holds from now, or None while it does not hold."""
        phase = self.wd.phase
        if not self._from_answer:  # tools, auto: from the first [TOOL_CALLS] to the end
            return "root" if self.tooling.started and phase is Phase.ANSWER else None
        if phase is Phase.ANSWER:
            return "root"
        if phase is Phase.BEFORE:  # the first token: open the thought, or begin the answer constrained
            return "think-or-answer" if self.thinks else "root"
        return None

    def token(self, token: int) -> bool:
        """Account one sampled token: queue its text, ask the watchdog, set ``feed``. False when
        the turn ends here (call :meth:`end`)."""
        wd = self.wd
        if self._grammar_on:
            self._grammar_tokens.append(token)
        self._t_last = time.monotonic()
        if self._t_first is None:
            self._t_first = self._t_last
        self._n_gen += 1
        phase = wd.phase
        text = self.detok.push(token)
        d = self.decision = wd.feed(token, text, self.detok.complete)
        if phase is Phase.BEFORE:  # a first token that is not [THINK] starts the answer
            phase = wd.phase
            if phase is Phase.THINKING:  # [THINK] under a grammar's first rule: the grammar waits
                self._grammar_tokens.clear()
        self.feed = ()  # nothing to evaluate: dropped or stopping
        going = d.action is not Action.STOP
        if not d.drop:
            emitted = self._emit(text, phase) if self.tooling is None else self._emit_tools(token, text)
            if not emitted:  # a stop string, or output that left the call grammar: the turn ends here
                self._watchdog_events()
                return False
            if going:
                self._one[0] = token
                self.feed = self._one
        if d.action is Action.FORCE_CLOSE:
            self._force_close(d)
        if len(wd.events) != self._events_seen:
            self._watchdog_events()
        return going

    @property
    def remaining(self) -> int:
        """Tokens this turn may still generate."""
        return self.max_tokens - self._n_gen

    def end(self, ended_by: str | None = None) -> None:
        """Close the turn: the held-back answer text, the last watchdog events and Done."""
        if ended_by is not None:
            self.ended_by = ended_by
        if self.ended_by != "stop_string":
            rest = self.stops.flush()
            if rest:
                self.events.append(AnswerText(rest))
        self._watchdog_events()
        done = self._done()
        if self.tooling is not None:
            done = self._with_calls(done)
        self.done = done
        self.events.append(done)

    def release(self) -> None:
        if self._sampler is not None:
            self.model.free_sampler(self._sampler)
            self._sampler = None

    def backend_k(self) -> int | None:
        """The top-k this turn's sampling allows on the device, or None. The host chain then
        applies its bans and its own top-k to these candidates; with room for every banned id it
        picks exactly what it would pick from the whole vocabulary. A grammar or top-k 0 needs
        the whole vocabulary."""
        if self.grammar is not None:  # a JSON schema, or tools (a grammar may switch on mid-turn)
            return None
        need = 1 if self.temperature <= 0 else self.limits.top_k
        if need <= 0:
            return None
        # Never below the default's: changing a sequence's device top-k makes llama.cpp re-reserve
        # its graphs (~12% of a pp512 on an H100), so greedy and default requests share one k.
        return max(need, DEFAULT_LIMITS.top_k) + BACKEND_TOPK_MARGIN

    # -------------------------------------------------------------------------- helpers
    def _emit(self, text: str, phase: Phase) -> bool:
        """Queue a token's text in its phase; False when it completed a stop string."""
        if not text:
            return True
        if phase is Phase.THINKING:
            self.events.append(ThinkingText(text))
        elif phase is Phase.ANSWER:
            out = self.stops.push(text)
            if out:
                self.events.append(AnswerText(out))
            if self.stops.hit:
                self.ended_by = "stop_string"
                return False
        return True

    def _emit_tools(self, token: int, text: str) -> bool:
        """A turn with tools: the parser splits thought, answer text and calls. Stop strings
        apply to the answer text only; False when one completed, or the output left the grammar."""
        t = self.tooling
        was_in_call = t.parser.in_call
        for ev in t.push(token, text):
            if isinstance(ev, AnswerText):
                out = self.stops.push(ev.text)
                if out:
                    self.events.append(AnswerText(out))
                if self.stops.hit:
                    self.ended_by = "stop_string"
                    return False
            elif isinstance(ev, (ThinkingText, CallStart, CallArguments)):
                self.events.append(ev)
            elif isinstance(ev, ParseError):
                self.ended_by = "tool_error"
                return False
        if t.parser.in_call and not was_in_call:  # a call opened: the held answer text goes first
            rest = self.stops.flush()
            if rest:
                self.events.append(AnswerText(rest))
            self.wd.stop_loop_checks()
            if not self._grammar_on:  # auto: the grammar starts at this [TOOL_CALLS]
                self._grammar_tokens = [token]
        return True

    def _to_parser(self, ids: list[int]) -> list[int]:
        """Control ids the engine injects (never sampled) also move the call parser."""
        if self.tooling is not None:
            for t in ids:
                self.tooling.push(t, "")
        return ids

    def _with_calls(self, done: Done) -> Done:
        """Done with the parser's verdict: the calls, "tool_calls" or "length" (cut in a call)."""
        fin = self.tooling.parser.end(done.finish_reason)[-1]
        return replace(done, finish_reason=fin.reason, tool_calls=fin.calls,
                       tool_error=fin.error.message if fin.error else None)

    def _force_close(self, d: Decision) -> None:
        """Evaluate the wrap-up and [/THINK] after the token (their text streams as reasoning;
        counted as reasoning)."""
        tail = self.detok.flush()
        if tail:
            self.events.append(ThinkingText(tail))
        ids = list(self.feed)  # the token itself first, unless it was dropped
        n = len(ids)
        for piece in d.inject:
            if isinstance(piece, int):
                ids += self._to_parser([piece])
            else:
                ids += self.model.encode_text(piece)
                self.events.append(ThinkingText(piece))
        self.wd.injected(len(ids) - n)
        self.feed = ids

    def _watchdog_events(self) -> None:
        events = self.wd.events
        for ev in events[self._events_seen:]:
            self.events.append(WatchdogAction(ev.action, ev.reason.value, ev.detail))
        self._events_seen = len(events)

    def _done(self) -> Done:
        u = self.wd.usage()
        now = time.monotonic()
        t_prompt = self.t_prompt or now
        gen_s = (self._t_last - self._t_first) if self._t_first and self._t_last else 0.0
        n_eval = self.n_prefill - self.cached  # the prompt as evaluated ([THINK][/THINK] appended or not)
        if self.ended_by is not None:
            finish, reason = ENDED_BY[self.ended_by], self.ended_by
        else:
            finish = u.finish_reason or "length"
            reason = u.stop_reason.value if u.stop_reason else "max_tokens"
        timings = Timings(
            load_s=self.model.load_s, prompt_s=t_prompt - self.t0,
            ttft_s=(self._t_first - self.t0) if self._t_first else None, generation_s=gen_s,
            tokens_per_s=(self._n_gen - 1) / gen_s if gen_s > 0 and self._n_gen > 1 else 0.0,
            prompt_tokens_per_s=n_eval / (t_prompt - self.t0) if t_prompt > self.t0 else 0.0,
            cached_prompt_tokens=self.cached, drafted_tokens=self.drafted, accepted_tokens=self.accepted)
        return Done(
            finish_reason=finish, stop_reason=reason,
            usage=Usage(len(self.prompt), u.reasoning_tokens, u.answer_tokens), timings=timings,
            reasoning_truncated=u.reasoning_truncated,
            watchdog_events=[{**asdict(ev), "reason": ev.reason.value} for ev in u.events],
            sampling={"temperature": self.temperature, "top_p": self.limits.top_p, "top_k": self.limits.top_k,
                      "min_p": self.limits.min_p, "seed": self.limits.seed,
                      "think_budget": u.think_budget, "max_tokens": self.max_tokens})
