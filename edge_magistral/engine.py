"""The engine: owns one ``llama_cpp.Llama`` and turns messages into a stream of typed events.

It drives llama.cpp through the low-level API (one ``llama_decode`` and one native sampler call
per token) rather than ``create_completion``, whose cost per token grows with the output, and
detokenizes incrementally at constant cost. The watchdog decides on every token; thinking and
answer are split by token id (``[THINK]``/``[/THINK]``), never by matching text, and text is
emitted only at UTF-8 code point boundaries. Magistral prompts are built from token ids with the
reference-exact Tekken tokenizer; other GGUF models use their own chat template, rendered in a
sandbox, with user text tokenized without special-token parsing.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# llama_cpp first: its libraries (ggml's CUDA and OpenMP runtimes) must load before numpy's do.
# Loading numpy (imported by gguf) first made model loading segfault on a CUDA build (H200).
import llama_cpp  # noqa: I001, F401  (used as self._lc)

from edge_magistral import llama_log
from edge_magistral import tekken as tk
from edge_magistral.chat import Message, magistral_prompt, render_template
from edge_magistral.errors import BackendError, BadInputError
from edge_magistral.generation import (  # noqa: F401  (re-exported: the engine's public data types)
    KV_TYPES,
    AnswerText,
    Done,
    Event,
    Limits,
    LoadSettings,
    ThinkingText,
    Timings,
    Usage,
    WatchdogAction,
    check_schema,
)
from edge_magistral.gguf_info import GGUFInfo, check_model, read_info
from edge_magistral.watchdog import Action, Decision, Phase, Watchdog, WatchdogConfig, WatchdogUsage

log = logging.getLogger(__name__)

# Candidates a device-side top-k keeps beyond the request's top-k: room for the ids the watchdog
# bans (at most [THINK], [/THINK] and </s>) and ignore_eos, so the host's choice stays exact.
BACKEND_TOPK_MARGIN = 8


# ------------------------------------------------------------------------------ detokenizer

class Detokenizer:
    """Token → text at constant cost: one piece lookup and an incremental UTF-8 decoder."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> tuple[str, bool]:
        """Text completed by this token, and whether no multi-byte character is pending."""
        text = self._dec.decode(self._piece(token))
        return text, not self._dec.getstate()[0]

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _StopMatcher:
    """Holds back just enough answer text to find stop strings that span tokens."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = len(self.buf) - self.hold
        if cut <= 0:
            return "", False
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# ---------------------------------------------------------------------------------- the engine

def schema_grammar(schema: dict[str, Any]) -> str:
    """A llama.cpp grammar for a JSON schema, after size and depth checks (a malformed or deeply
    nested grammar can crash llama.cpp, so nothing unchecked reaches it)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    raw = check_schema(schema)
    try:
        return json_schema_to_gbnf(raw)
    except Exception as e:  # the converter raises plain exceptions on unsupported schemas
        raise BadInputError(f"unsupported json schema: {e}") from None


class LoadedModel:
    """The model side that Engine and BatchEngine share: loading, tokenization, token pieces,
    sampler chains and watchdog settings. The context (``self.ctx``) is whatever ``_load`` built."""

    def __init__(self, settings: LoadSettings):
        self.settings = settings
        self.info: GGUFInfo = read_info(settings.model_path)  # bounded pre-check first
        check_model(self.info)
        self.is_magistral = self.info.tokenizer_pre == "tekken" and "end_think" in self.info.special_tokens
        t0 = time.monotonic()
        self.llm = self._load(settings)
        self.load_s = time.monotonic() - t0
        self._lc = llama_cpp
        self.ctx = self.llm.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.tokenizer = tk.TekkenTokenizer.from_gguf(settings.model_path) if self.is_magistral else None
        self._pieces: dict[int, bytes] = {}
        self.backend_sampling = self._want_backend_sampling(settings)
        self._backend_topk: dict[int, tuple[int, Any]] = {}  # seq id → (k, the chain attached to it)

    # ----------------------------------------------------------------------- loading
    @staticmethod
    def _load(s: LoadSettings):
        llama_log.install()
        for name, t in (("type_k", s.type_k), ("type_v", s.type_v)):
            if t not in KV_TYPES:
                raise BadInputError(f"{name} {t!r} is not one of {', '.join(KV_TYPES)}")
        try:
            return llama_cpp.Llama(
                model_path=s.model_path, n_ctx=s.n_ctx, n_gpu_layers=s.n_gpu_layers, n_batch=s.n_batch,
                n_ubatch=s.n_ubatch, n_threads=s.n_threads or _default_threads(),
                n_threads_batch=s.n_threads_batch or s.n_threads or os.cpu_count(), flash_attn=s.flash_attn,
                type_k=KV_TYPES[s.type_k], type_v=KV_TYPES[s.type_v],
                tensor_split=list(s.tensor_split) or None, logits_all=False,
                verbose=os.environ.get("EDGE_MAGISTRAL_LLAMA_VERBOSE") == "1",  # llama.cpp's own log on stderr
                chat_format="chatml",  # llama-cpp-python's own template handling is never used
            )
        except ValueError as e:
            raise BackendError(f"llama.cpp could not load {s.model_path}: {e}") from None

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
        for _, chain in getattr(self, "_backend_topk", {}).values():  # the context no longer uses them
            self._lc.llama_sampler_free(chain)
        self._backend_topk = {}

    # ----------------------------------------------------------- sampling on the device
    def _want_backend_sampling(self, s: LoadSettings) -> bool:
        """Auto: only when the output layer (and so the logits) lives on a GPU. There a top-k on
        the device leaves the host ~50 candidates instead of 131k logits to copy and sort (about
        0.2 ms a token on a fast CPU, 2-3% of a 24B model's step on an H200); on a CPU backend the
        same top-k only moves that work into the graph and measured slower."""
        if s.backend_sampling is not None:
            return s.backend_sampling
        return bool(llama_cpp.llama_supports_gpu_offload()) and s.n_gpu_layers > self.info.n_layers

    def set_backend_topk(self, seq: int, k: int | None) -> None:
        """Attach a device-side top-``k`` to sequence ``seq`` (``None``: detach). Changing it makes
        llama.cpp re-reserve its graphs, so it is only redone when ``k`` changes."""
        k = k if self.backend_sampling else None
        held = self._backend_topk.get(seq)
        if (held[0] if held else None) == k:
            return
        lc = self._lc
        chain = None
        if k is not None:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(k))
        ok = lc.llama_set_sampler(self.ctx, seq, chain)
        if held:
            lc.llama_sampler_free(held[1])
            del self._backend_topk[seq]
        if chain is not None:
            if ok:
                self._backend_topk[seq] = (k, chain)
            else:  # the backend cannot run it: sample on the host from now on
                lc.llama_sampler_free(chain)
                self.backend_sampling = False

    # ------------------------------------------------------------------ tokenization
    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens: none), cached."""
        b = self._pieces.get(token)
        if b is None:
            b = self.tokenizer.token_bytes(token) if self.tokenizer else self._llama_piece(token)
            self._pieces[token] = b
        return b

    def _llama_piece(self, token: int, special: bool = False) -> bytes:
        """llama.cpp's bytes for a token, growing the buffer when a piece is longer than 256 bytes."""
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def encode_text(self, text: str) -> list[int]:
        """Plain text → ids, never control tokens (prompt-injection guard)."""
        if self.tokenizer:
            return self.tokenizer.encode(text)
        return self.llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)

    def prompt_ids(self, messages: Sequence[Message], system_mode: str = "replace") -> list[int]:
        if self.is_magistral:
            return magistral_prompt(messages, self.encode_text, system_mode)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BadInputError(f"{self.info.path} has no chat template; use a Magistral GGUF or raw completion")
        bos = self.piece_text(self._lc.llama_vocab_bos(self.vocab), special=True)
        eos = self.piece_text(self.eos_id, special=True)
        rendered = render_template(template, messages, bos_token=bos, eos_token=eos)
        ids: list[int] = []
        for text, trusted in rendered.parts:
            ids += self.llm.tokenize(text.encode(), add_bos=False, special=True) if trusted else \
                self.encode_text(text)
        return ids

    def piece_text(self, token: int, special: bool = False) -> str:
        return self._llama_piece(token, special).decode("utf-8", "replace") if token >= 0 else ""

    def _sampler(self, limits: Limits, temperature: float, banned: frozenset[int], grammar: str | None):
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if banned:
            arr = (lc.llama_logit_bias * len(banned))()
            for i, t in enumerate(sorted(banned)):
                arr[i].token, arr[i].bias = t, float("-inf")
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(banned), arr))
        if grammar is not None:
            g = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not g:
                lc.llama_sampler_free(chain)
                raise BadInputError("the JSON schema's grammar did not parse")
            lc.llama_sampler_chain_add(chain, g)
        if temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            if limits.top_k > 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(limits.top_k))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(limits.top_p, 1))
            if limits.min_p > 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(limits.min_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
            seed = limits.seed if limits.seed is not None else lc.LLAMA_DEFAULT_SEED
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def thinks(self, limits: Limits) -> bool:
        """Whether this turn has a [THINK] phase: Magistral chat turns, not raw completions."""
        return self.is_magistral and not limits.raw

    def watchdog_config(self, limits: Limits, max_tokens: int) -> WatchdogConfig:
        budget = self.settings.think_budget if limits.think_budget is None else limits.think_budget
        thinks = self.thinks(limits)
        if not thinks:  # no [THINK] phase: everything is answer
            budget = 0
        ids = {} if thinks else {"think_id": -1, "end_think_id": -2, "eos_id": self.eos_id}
        return WatchdogConfig(think_budget=budget, answer_budget=limits.answer_budget, max_tokens=max_tokens,
                              deadline_s=limits.deadline_s, ttft_deadline_s=limits.ttft_deadline_s, **ids)

class Engine(LoadedModel):
    """One loaded model and its context; :meth:`generate` runs one turn at a time."""

    def __init__(self, settings: LoadSettings):
        super().__init__(settings)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._kv: list[int] = []  # the tokens now in the KV cache (sequence 0)
        self.tokens_evaluated = 0  # grows with every prefill batch and token: progress for a heartbeat
        self._one = (llama_cpp.llama_token * 1)()

    # ---------------------------------------------------------------- llama.cpp calls
    def _decode(self, tokens: Sequence[int], poll: Callable[[], bool] | None = None) -> bool:
        """Evaluate tokens in n_batch chunks; False if ``poll`` asked to stop between chunks."""
        lc, n_batch = self._lc, max(1, self.settings.n_batch)
        for i in range(0, len(tokens), n_batch):
            chunk = tokens[i:i + n_batch]
            arr = self._one if len(chunk) == 1 else (lc.llama_token * len(chunk))()
            arr[:] = chunk
            rc = lc.llama_decode(self.ctx, lc.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self._reset_kv()
                raise BackendError(f"llama_decode failed ({rc}): out of KV cache or backend error")
            self._kv.extend(chunk)
            self.tokens_evaluated += len(chunk)
            if poll is not None and i + n_batch < len(tokens) and poll():
                return False
        return True

    def _reset_kv(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.ctx), True)
        self._kv = []

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the longest common prefix of the KV cache and ``prompt`` (at least one token is
        always re-evaluated, to get fresh logits); return how many tokens were reused."""
        n = 0
        for a, b in zip(self._kv, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        if n <= 0:
            self._reset_kv()
            return 0
        if not self._lc.llama_memory_seq_rm(self._lc.llama_get_memory(self.ctx), 0, n, -1):
            self._reset_kv()
            return 0
        del self._kv[n:]
        return n

    # ---------------------------------------------------------------------- a turn
    def cancel(self) -> None:
        """Ask the running generation to stop at the next token (thread-safe)."""
        self._cancel.set()

    def generate(self, messages: Sequence[Message], limits: Limits = Limits()) -> Iterator[Event]:
        """Run one turn; yields ThinkingText/AnswerText/WatchdogAction events, then Done."""
        prompt = self.prompt_ids(messages, limits.system_mode)
        yield from self.generate_ids(prompt, limits)

    def generate_ids(self, prompt: list[int], limits: Limits = Limits()) -> Iterator[Event]:
        if self.llm is None:
            raise BackendError("the engine is closed")
        if not self._lock.acquire(blocking=False):
            raise BackendError("the engine is already generating; one turn at a time")
        try:
            self._cancel.clear()
            yield from _Turn(self, prompt, limits).run()
        finally:
            self._lock.release()


def _default_threads() -> int:
    """Physical cores are the fastest thread count for generation on CPUs."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


@dataclass
class Step:
    """What one sampled token led to: events to stream, token runs to evaluate next (in order:
    the token itself, then any forced-close injection), and whether the turn ends here."""

    events: list[Event]
    feeds: list[list[int]]
    end: bool


class _Turn:
    """The state of one generation: kept apart from the Engine so a turn's state dies with it.

    The per-token logic (:meth:`open`, :meth:`advance`, :meth:`finish`) knows nothing of the KV
    cache, so the single-sequence :meth:`run` and the batching loop (``batch.py``) share it."""

    def __init__(self, engine: LoadedModel, prompt: list[int], limits: Limits):
        self.e, self.prompt, self.limits = engine, prompt, limits
        self.t0 = time.monotonic()
        if len(prompt) >= engine.n_ctx:
            raise BadInputError(f"the prompt is {len(prompt)} tokens but the context holds {engine.n_ctx}: "
                                f"{len(prompt) - engine.n_ctx + 1} too many; shorten it or plan a larger --ctx")
        if limits.max_tokens <= 0:
            raise BadInputError("max_tokens must be at least 1")
        room = engine.n_ctx - len(prompt)
        self.max_tokens = min(limits.max_tokens, room)
        self.wd = Watchdog(engine.watchdog_config(limits, self.max_tokens))
        from edge_magistral.watchdog import check_sampling

        # Only a turn that will think needs the anti-greedy clamp (think budget 0 never thinks).
        thinking = engine.thinks(limits) and self.wd.think_budget > 0
        self.temperature, self.temp_note = check_sampling(limits.temperature, thinking)
        self.grammar = schema_grammar(limits.json_schema) if limits.json_schema is not None else None
        self.detok = Detokenizer(engine.piece)
        self.stops = _StopMatcher(limits.stop)
        self.events_seen = 0
        self.sampler = None
        self.decision: Decision | None = None  # the watchdog's latest decision (sampler bans, grammar)
        self.banned: frozenset[int] = frozenset()
        self.always_banned = frozenset({engine.eos_id}) if limits.ignore_eos and engine.eos_id >= 0 else frozenset()
        self.grammar_on = False
        self.grammar_tokens: list[int] = []  # accepted by the grammar so far (replayed on a rebuild)
        self.cached = 0
        self.t_prompt = self.t_first = self.t_last = None
        self.n_gen = 0
        self.ended_by: str | None = None  # the engine's own reasons: cancelled, stop_string, context_full

    # -- per-sequence logic, shared with the batching loop
    def open(self) -> tuple[list[int], list[Event]]:
        """Start the watchdog: the full prompt to evaluate and the events due before it."""
        e = self.e
        events: list[Event] = []
        if self.temp_note:
            events.append(WatchdogAction("sampling", "temperature_clamped", self.temp_note))
        d = self.wd.start()
        prompt = list(self.prompt)
        if d.action is Action.FORCE_CLOSE and e.thinks(self.limits):  # think budget 0: closed in the prompt
            prompt += [p for p in d.inject if isinstance(p, int)]
        elif self.limits.force_thinking and e.thinks(self.limits):
            prompt.append(tk.THINK)
            d = self.wd.feed(tk.THINK, "", True)
        self.decision = d
        return prompt, events + self._new_events()

    def backend_k(self) -> int | None:
        """The top-k this turn's sampling allows on the device, or None. The host chain then
        applies its bans and its own top-k to these candidates; with room for every banned id it
        picks exactly what it would pick from the whole vocabulary. A grammar or top-k 0 needs
        the whole vocabulary."""
        if self.grammar is not None:
            return None
        if self.temperature <= 0:
            return 1 + BACKEND_TOPK_MARGIN
        return self.limits.top_k + BACKEND_TOPK_MARGIN if self.limits.top_k > 0 else None

    def sampler_now(self):
        """The native sampler for the next token, rebuilt if the watchdog's decision changed it."""
        self._sampler_for(self.decision)
        return self.sampler

    def advance(self, token: int) -> Step:
        """Account one sampled token: stream its text, ask the watchdog, say what to evaluate."""
        wd = self.wd
        if self.grammar_on:
            self.grammar_tokens.append(token)
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.n_gen += 1
        phase = wd.phase
        text, complete = self.detok.push(token)
        d = self.decision = wd.feed(token, text, complete)
        if phase is Phase.BEFORE:  # a first token that is not [THINK] starts the answer
            phase = wd.phase
        events: list[Event] = []
        feeds: list[list[int]] = []
        if not d.drop:
            if text and phase is Phase.THINKING:
                events.append(ThinkingText(text))
            elif text and phase is Phase.ANSWER:
                out, hit = self.stops.push(text)
                if out:
                    events.append(AnswerText(out))
                if hit:
                    self.ended_by = "stop_string"
                    return Step(events + self._new_events(), [], True)
            if d.action is not Action.STOP:
                feeds.append([token])
        if d.action is Action.FORCE_CLOSE:
            tail = self.detok.flush()
            if tail:
                events.append(ThinkingText(tail))
            feeds.append(self._inject(d, events))
        return Step(events + self._new_events(), feeds, d.action is Action.STOP)

    def finish(self) -> list[Event]:
        """The held-back answer text, the last watchdog events and Done."""
        rest = self.stops.flush() if self.ended_by != "stop_string" else ""
        return ([AnswerText(rest)] if rest else []) + self._new_events() + [self._done()]

    def release(self) -> None:
        if self.sampler is not None:
            self.e._lc.llama_sampler_free(self.sampler)
            self.sampler = None

    # -- helpers
    def _new_events(self) -> list[Event]:
        events = self.wd.usage().events
        new: list[Event] = [WatchdogAction(ev.action, ev.reason.value, ev.detail) for ev in events[self.events_seen:]]
        self.events_seen = len(events)
        return new

    def _sampler_for(self, d: Decision) -> None:
        """(Re)build the native sampler when the banned set changes or the grammar switches on."""
        want_grammar = self.grammar is not None and self.wd.phase == Phase.ANSWER
        if self.sampler is not None and d.banned is self.banned and want_grammar == self.grammar_on:
            return
        if self.sampler is not None:
            self.e._lc.llama_sampler_free(self.sampler)
        self.banned, self.grammar_on = d.banned, want_grammar
        self.sampler = self.e._sampler(self.limits, self.temperature, d.banned | self.always_banned,
                                       self.grammar if want_grammar else None)
        for t in self.grammar_tokens if want_grammar else ():  # a new grammar sampler starts from its root
            self.e._lc.llama_sampler_accept(self.sampler, t)

    def _inject(self, d: Decision, events: list[Event]) -> list[int]:
        """The ids a forced close feeds (its text streams as reasoning); counted as reasoning."""
        ids: list[int] = []
        for piece in d.inject:
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids += self.e.encode_text(piece)
                events.append(ThinkingText(piece))
        self.wd.injected(len(ids))
        return ids

    # -- the single-sequence loop (Engine)
    def run(self) -> Iterator[Event]:
        e = self.e
        prompt, events = self.open()
        yield from events
        try:
            e.set_backend_topk(0, self.backend_k())
            self.cached = e._reuse_prefix(prompt)
            stopped = not e._decode(prompt[self.cached:], poll=self._poll_stop)
            self.t_prompt = time.monotonic()
            if stopped or self._poll_stop():
                if e._cancel.is_set():
                    self.ended_by = "cancelled"
                yield from self._new_events()
                yield self._done()
                return
            yield from self._loop()
        finally:
            self.release()

    def _poll_stop(self) -> bool:
        return self.e._cancel.is_set() or self.wd.poll().action is Action.STOP

    def _loop(self) -> Iterator[Event]:
        e = self.e
        while True:
            if e._cancel.is_set():
                self.ended_by = "cancelled"
                break
            if len(e._kv) >= e.n_ctx:
                self.ended_by = "context_full"
                break
            step = self.advance(e._lc.llama_sampler_sample(self.sampler_now(), e.ctx, -1))
            # Queue the next decode before handing the events out: on a GPU llama_decode returns
            # once the work is queued, so whatever the caller does with the text overlaps it.
            for ids in step.feeds:
                e._decode(ids)
            yield from step.events
            if step.end:
                break
        yield from self.finish()

    def _done(self) -> Done:
        u: WatchdogUsage = self.wd.usage()
        now = time.monotonic()
        t_prompt = self.t_prompt or now
        gen_s = (self.t_last - self.t_first) if self.t_first and self.t_last else 0.0
        n_eval = len(self.prompt) - self.cached
        if self.ended_by is not None:
            finish = {"cancelled": "cancelled", "stop_string": "stop", "context_full": "length"}[self.ended_by]
            reason = self.ended_by
        else:
            finish = u.finish_reason or "length"
            reason = u.stop_reason.value if u.stop_reason else "max_tokens"
        return Done(
            finish_reason=finish,
            stop_reason=reason,
            usage=Usage(len(self.prompt), u.reasoning_tokens, u.answer_tokens),
            timings=Timings(
                load_s=self.e.load_s,
                prompt_s=t_prompt - self.t0,
                ttft_s=(self.t_first - self.t0) if self.t_first else None,
                generation_s=gen_s,
                tokens_per_s=(self.n_gen - 1) / gen_s if gen_s > 0 and self.n_gen > 1 else 0.0,
                prompt_tokens_per_s=n_eval / (t_prompt - self.t0) if t_prompt > self.t0 else 0.0,
                cached_prompt_tokens=self.cached,
            ),
            reasoning_truncated=u.reasoning_truncated,
            watchdog_events=[{**asdict(ev), "reason": ev.reason.value} for ev in u.events],
            sampling={"temperature": self.temperature, "top_p": self.limits.top_p, "top_k": self.limits.top_k,
                      "min_p": self.limits.min_p, "seed": self.limits.seed,
                      "think_budget": u.think_budget, "max_tokens": self.max_tokens},
        )
