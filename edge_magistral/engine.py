"""The engine: one loaded model whose slots decode requests together, one code path for one slot
or many (as llama.cpp's server does).

:meth:`Engine.submit` is thread-safe and returns a :class:`Stream` of typed events at once
(``ThinkingText``, ``AnswerText``, ``WatchdogAction``, then ``Done``); requests beyond the slots
queue. One background thread owns the llama.cpp context and runs steps: each step builds one
``llama_batch`` holding, for every active slot, what it still has to evaluate (one sampled token
for a generating slot, a chunk of prompt for a joining one) under its own ``seq_id``, and calls
``llama_decode`` once. Generating slots go first and prompt chunks fill the rest of ``n_batch``,
so a long prompt joining mid-flight slows the others' steps but never stalls them. Then every
slot whose last token was evaluated samples from its own row of logits with its own sampler
chain, and its :class:`~edge_magistral.turn.Turn` (watchdog, detokenizer, stop strings) turns the
token into events. Requests join between steps; a cancel takes effect at the next step (within a
token, or between two prompt chunks).

It drives llama.cpp through the low-level API (one ``llama_decode`` and one native sampler call
per token) rather than ``create_completion``, whose cost per token grows with the output.

KV layout. One slot: one KV stream of ``n_ctx`` cells, and the tokens left in it by the previous
turn are the prompt cache (the longest common prefix is kept, the rest removed). N > 1 slots:
llama.cpp's separate per-sequence KV streams (``kv_unified = False``), ``N + 1`` of ``n_ctx``
cells each. Sequence 0 holds the prefix cache (the system prompt and what the latest prompts had
in common); a new slot takes it with ``llama_memory_seq_cp`` (across streams llama.cpp copies the
whole stream on the device, which we then trim) instead of evaluating it. Why not one unified
cache, where ``seq_cp`` only tags shared cells: there every sequence's attention spans the cells
of all sequences (masked), so its cost grows with the others' lengths and its float sums change
with them: a request's tokens depended on its neighbours (measured on the tiny model). With
streams a slot attends to its own cells, its tokens equal the one-slot engine's (tested), and one
slot cannot run another out of cells. The price: one extra stream of KV for the prefix.

Memory the planner accounts for with N slots: KV for ``(N + 1) × n_ctx`` cells (``n_ctx`` for
one slot), a compute buffer for ``n_ubatch`` tokens, one logits row per slot per step, and N
sampler chains (small; a grammar adds its own state).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import llama_cpp  # noqa: I001  first, before anything that imports numpy (see model.py)

from edge_magistral import tekken as tk
from edge_magistral.batch import Batch, PrefixCache, common_prefix
from edge_magistral.chat import Message
from edge_magistral.draft_model import open_draft
from edge_magistral.errors import BackendError
from edge_magistral.generation import DEFAULT_LIMITS, Done, Event, Limits, LoadSettings
from edge_magistral.model import LoadedModel
from edge_magistral.speculate import NGRAM_SIZES, Speculator, VerifyCost
from edge_magistral.turn import Turn

log = logging.getLogger(__name__)

PREFIX_SEQ = 0  # with several slots, the reserved sequence holding the cached prefix
_END = object()


class Stream:
    """One request's events, fed by the engine's thread. Iterating blocks until the next event;
    a backend failure is raised from the iterator."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._ended = False
        self.done: Done | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._ended:
            raise StopIteration
        item = self._q.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if isinstance(item, Done):
            self.done = item
        return item  # type: ignore[return-value]

    # the engine's side
    def _put(self, events: list[Event]) -> None:
        for ev in events:
            self._q.put(ev)
        events.clear()

    def _end(self, events: list[Event], error: BaseException | None = None) -> None:
        self._put(events)
        self._q.put(error if error is not None else _END)


@dataclass(eq=False)
class _Slot:
    """An admitted request: its sequence id, its turn, and what it still has to evaluate."""

    seq: int
    turn: Turn
    stream: Stream
    prompt: list[int]
    pending: Sequence[int]  # the rest of the prompt while prefilling, then the sampled/injected tokens
    n_past: int  # tokens of this sequence in the KV cache (its next position)
    prefilling: bool = True
    spec: Speculator | None = None  # the turn's guesses (None: speculation is off)
    draft: Sequence[int] = ()  # the guesses at the end of ``pending``, verified with it


@dataclass
class EngineStats:
    """Counters for progress, tests and benchmarks (written by the engine's thread only)."""

    steps: int = 0  # llama_decode calls
    tokens_evaluated: int = 0  # every token evaluated (prompt and generated)
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0  # prompt tokens taken from the KV cache instead
    max_active: int = 0  # the most slots decoding in one step
    moves: int = 0  # slots moved to a lower sequence id when one below them ended
    drafted: int = 0  # speculative guesses verified
    accepted: int = 0  # guesses the model agreed with


class Engine(LoadedModel):
    """One model, one context, ``settings.n_slots`` requests decoded together (see the module
    docstring). ``n_ctx`` is the context of each slot."""

    def __init__(self, settings: LoadSettings):
        super().__init__(settings)
        self.stats = EngineStats()
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = Batch(max(1, settings.n_batch))
        one = self.n_slots == 1
        self._prefix = None if one else PrefixCache(settings.n_ctx, tk.END_SYSTEM if self.is_magistral else None)
        self._kept: list[int] = []  # one slot: the tokens its KV stream holds between turns
        self._free = [0] if one else list(range(self.n_slots, 0, -1))  # several: ids 1..N, 0 is the prefix
        self._active: list[_Slot] = []
        self.verify_cost = VerifyCost()  # how a step's time grows with its tokens (speculation's price)
        self.ngram_sizes = NGRAM_SIZES  # the n-gram lengths guesses are looked up by
        self._speculating = settings.speculate != "off"
        hold = settings.speculate_hold
        self.speculate_hold = self.all_on_gpu() if hold is None else hold  # see speculate.py
        try:
            self.drafter = open_draft(settings, self)  # speculate="draft": the draft model, else None
        except BaseException:
            super().close()
            raise
        self._queue: collections.deque[tuple[Turn, Stream]] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------- API
    def submit(self, request: Sequence[int] | Sequence[Message], limits: Limits = DEFAULT_LIMITS) -> Stream:
        """Queue a request (prompt ids, or messages to render); bad input raises here, at once."""
        return self.submit_all([(request, limits)])[0]

    def submit_all(self, requests: Sequence[tuple[Sequence[int] | Sequence[Message], Limits]]) -> list[Stream]:
        """Queue several requests at once: all are validated first (one bad request queues none),
        and free slots take them in the same step (benchmarks and tests of concurrency)."""
        if self._closing or self.llm is None:
            raise BackendError("the engine is closed")
        turns = [Turn(self, self._prompt(request, limits), limits) for request, limits in requests]
        streams = [Stream() for _ in turns]
        with self._cv:
            self._queue.extend(zip(turns, streams))
            self._cv.notify()
        return streams

    def _prompt(self, request: Sequence[int] | Sequence[Message], limits: Limits) -> list[int]:
        if request and all(isinstance(t, int) for t in request):
            return list(request)  # type: ignore[arg-type]
        return self.prompt_ids(request, limits.system_mode)  # type: ignore[arg-type]

    def generate(self, messages: Sequence[Message], limits: Limits = DEFAULT_LIMITS) -> Stream:
        """One chat turn: its events (the same as :meth:`submit`'s stream)."""
        return self.submit(messages, limits)

    def generate_ids(self, prompt: list[int], limits: Limits = DEFAULT_LIMITS) -> Stream:
        return self.submit(prompt, limits)

    def cancel(self, stream: Stream | None = None) -> None:
        """Stop a request (queued or running; ``None``: every request) at the next step; its slot
        is freed. Thread-safe."""
        with self._cv:
            targets = [stream] if stream is not None else \
                [s.stream for s in self._active] + [s for _, s in self._queue]
            for s in targets:
                s._cancel.set()
            self._cv.notify()

    def close(self) -> None:
        """Cancel what is queued or running, stop the thread, free the context and the model."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if getattr(self, "drafter", None) is not None:
            self.drafter.close()
            self.drafter = None
        super().close()

    def busy_seqs(self) -> list[int]:
        """The sequence ids of the slots decoding now (a snapshot; with several slots they stay
        1..k, so one ubatch holds them all: see :meth:`_compact`)."""
        return sorted(s.seq for s in list(self._active))

    @property
    def tokens_evaluated(self) -> int:
        """Every token evaluated so far (prompt chunks and generated): progress for a heartbeat."""
        return self.stats.tokens_evaluated

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._step()
        except BaseException as e:  # a bug or a backend failure: no stream may hang on it
            log.exception("the decoding loop failed")
            for slot in list(self._active):
                self._drop(slot, BackendError(f"the decoding loop failed: {type(e).__name__}"))
        finally:
            for slot in list(self._active):
                self._finish(slot, "cancelled")
            with self._cv:
                waiting, self._closing = list(self._queue), True
                self._queue.clear()
            for turn, stream in waiting:
                turn.end("cancelled")
                stream._end(turn.events)

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not (self._closing or self._queue or self._active):
                self._cv.wait()
            return not self._closing

    def _step(self) -> None:
        """Admit, end what must end, evaluate one batch, sample every slot that is due."""
        self._admit()
        for slot in list(self._active):
            self._check_stop(slot)
        plan = self._fill_batch()
        if not plan:
            return
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self._batch.struct)
        if rc == 0 and self._speculating and not any(slot.prefilling for slot, _, _ in plan):
            # generation only: what one more token in a step costs (the price of a guess)
            llama_cpp.llama_synchronize(self.ctx)
            self.verify_cost.observe(self._batch.struct.n_tokens, time.perf_counter() - t0, len(plan))
        self.stats.steps += 1
        self.stats.max_active = max(self.stats.max_active, len(plan))
        if rc != 0:
            for slot, _, _ in plan:
                self._drop(slot, BackendError(f"llama_decode failed ({rc}): out of KV cache or backend error"))
            return
        one = self._prefix is None
        for slot, n, _ in plan:  # all first: a slot ending below may move another's KV (_compact)
            p = slot.pending
            done = p if n == len(p) else p[:n]
            if one:  # one slot: what its KV stream holds is the next turn's prompt cache
                self._kept += done
            slot.pending, slot.n_past = (() if done is p else p[n:]), slot.n_past + n
            self.stats.tokens_evaluated += n
            if slot.prefilling:
                self.stats.prompt_tokens_evaluated += n
        for slot, _, idx in plan:
            if idx >= 0 and slot in self._active:
                try:
                    self._sample(slot, idx)
                except Exception as e:  # one request's failure (e.g. its grammar) ends only it
                    self._drop(slot, e)

    def _admit(self) -> None:
        """Move queued requests into free slots, starting each from the cached prefix."""
        while self._free:
            with self._cv:
                if not self._queue:
                    return
                turn, stream = self._queue.popleft()
            if stream.cancelled:
                turn.end("cancelled")
                stream._end(turn.events)
                continue
            prompt = turn.prefill()
            stream._put(turn.events)
            seq = min(self._free)  # busy ids stay 1..k (see _compact)
            self._free.remove(seq)
            self.set_backend_topk(seq, turn.backend_k())
            n = self._reuse(seq, prompt)
            turn.cached = n
            self.stats.prompt_tokens_reused += n
            spec = self._speculator(prompt, turn.limits)
            self._active.append(_Slot(seq, turn, stream, prompt, prompt[n:], n, spec=spec))

    def _speculator(self, prompt: list[int], limits: Limits) -> Speculator | None:
        mode = self.settings.speculate if limits.speculate else "off"
        if mode == "ngram":
            return Speculator(prompt, self.verify_cost, sizes=self.ngram_sizes, hold=self.speculate_hold)
        if mode == "draft":
            return Speculator(prompt, self.verify_cost, draft=self.drafter.open(prompt), hold=self.speculate_hold)
        return None

    def _reuse(self, seq: int, prompt: list[int]) -> int:
        """Put the longest cached prefix of ``prompt`` into ``seq``; how many tokens that is."""
        if self._prefix is not None:
            n = self._prefix.reusable(prompt)
            if n > 0:
                self._copy_kv(PREFIX_SEQ, seq, n)
            return n
        n = min(common_prefix(self._kept, prompt), len(prompt) - 1)  # one token is always evaluated
        if n <= 0 or not llama_cpp.llama_memory_seq_rm(self._mem, seq, n, -1):
            llama_cpp.llama_memory_clear(self._mem, True)
            n = 0
        del self._kept[n:]
        return n

    def _check_stop(self, slot: _Slot) -> None:
        """Before each step: a cancel, or a deadline passed while the prompt is evaluated, ends it."""
        if slot.stream.cancelled:
            self._finish(slot, "cancelled")
        elif slot.prefilling and slot.turn.stop_due():
            self._finish(slot)

    def _fill_batch(self) -> list[tuple[_Slot, int, int]]:
        """Put each slot's pending tokens in the batch, up to n_batch (generating slots get their
        token first), ordered by sequence id; a slot's last token asks for logits. Returns (slot,
        tokens taken, logits row or -1). The order matters: with one KV stream per sequence,
        llama.cpp puts only consecutive, increasing sequence ids in one ubatch, so any other order
        splits the step into several passes over the weights (measured: 4 streams ran at 60% of
        llama-batched-bench, slower than 2)."""
        b, budget, used = self._batch, max(1, self.settings.n_batch), 0
        chosen = []
        for slot in sorted(self._active, key=lambda s: s.prefilling):  # stable: admission order kept
            if slot.draft and len(slot.pending) > budget - used:  # no room to verify guesses: plain step
                slot.pending, slot.draft = slot.pending[:1], ()
            take = slot.pending[:budget - used]
            if take:
                chosen.append((slot, take))
                used += len(take)
        plan, i = [], 0
        for slot, take in sorted(chosen, key=lambda c: c[0].seq):
            i = b.put(i, take, slot.n_past, slot.seq)
            last = len(take) == len(slot.pending)
            first = i - 1 - len(slot.draft)  # guesses want logits too: one row per verified position
            if last:
                for row in range(first, i):
                    b.want_logits(row)
            plan.append((slot, len(take), first if last else -1))
        b.struct.n_tokens = i
        return plan

    def _sample(self, slot: _Slot, idx: int) -> None:
        """The slot's logits are ready: sample, let its turn account the token, queue what to
        evaluate next. A dropped token (the watchdog refused it) is sampled again from the same
        logits with the new bans. With guesses, row ``idx + i`` holds the logits after guess i:
        sampling goes on row by row while the sampled token equals the guess (see speculate.py)."""
        turn = slot.turn
        if slot.prefilling:
            slot.prefilling = False
            llama_cpp.llama_synchronize(self.ctx)  # a GPU may still be evaluating: time the prompt to its end
            turn.t_prompt = time.monotonic()
            self._offer_prefix(slot)
            if turn.stop_due():
                return self._finish(slot)
        draft, slot.draft = slot.draft, ()
        row = 0  # guesses accepted so far
        while True:
            if slot.stream.cancelled:
                return self._end_verify(slot, draft, row, "cancelled")
            if slot.n_past - (len(draft) - row) >= self.n_ctx:
                return self._end_verify(slot, draft, row, "context_full")
            token = llama_cpp.llama_sampler_sample(turn.sampler(), self.ctx, idx + row)
            going = turn.token(token)
            if turn.events:
                slot.stream._put(turn.events)
            if not going:
                return self._end_verify(slot, draft, row, None)
            feed = turn.feed
            if not feed:
                continue
            if row < len(draft) and token == draft[row] and len(feed) == 1:
                row += 1  # the guess was right: its logits are the next row
                slot.spec.accepted_token(token)
                continue
            self._verified(slot, draft, row)
            slot.pending = feed
            if slot.spec is not None:
                self._guess(slot, feed)
            return

    def _guess(self, slot: _Slot, feed: Sequence[int]) -> None:
        """Append the guesses to verify with the next token, when they pay (see speculate.py)."""
        if len(feed) != 1:  # an injection (a forced [/THINK]): history, no guesses
            slot.spec.injected(feed)
            return
        room = min(self.n_ctx - slot.n_past - 1, slot.turn.remaining)
        guesses = slot.spec.next(feed[0], room)
        if guesses:
            slot.pending, slot.draft = [feed[0], *guesses], guesses

    def _verified(self, slot: _Slot, draft: Sequence[int], row: int, ended: bool = False) -> None:
        """Account a verify step and drop the rejected guesses from the KV cache. When the turn
        ended on the way, the guesses after it were never judged: they count as neither."""
        if not draft:
            return
        judged = row if ended else len(draft)
        slot.spec.verified(judged, row)
        slot.turn.drafted += judged
        slot.turn.accepted += row
        self.stats.drafted += judged
        self.stats.accepted += row
        rejected = len(draft) - row
        if rejected:
            slot.n_past -= rejected
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, slot.n_past, -1)
            if self._prefix is None:
                del self._kept[slot.n_past:]

    def _end_verify(self, slot: _Slot, draft: Sequence[int], row: int, ended_by: str | None) -> None:
        self._verified(slot, draft, row, ended=True)
        self._finish(slot, ended_by)

    def _offer_prefix(self, slot: _Slot) -> None:
        """After a prompt is in the KV cache, refresh the cached prefix from it if it is better."""
        n = self._prefix.offer(slot.prompt) if self._prefix is not None else 0
        if n > 0:
            self._copy_kv(slot.seq, PREFIX_SEQ, n)

    def _copy_kv(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold ``src``'s first ``n`` positions. Across KV streams llama.cpp copies
        whole streams only (the copy runs on the device at the next decode), so copy, then trim."""
        llama_cpp.llama_memory_seq_rm(self._mem, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, dst, n, -1)

    # --------------------------------------------------------------- ending a slot
    def _finish(self, slot: _Slot, ended_by: str | None = None) -> None:
        slot.turn.end(ended_by)
        self._free_slot(slot, keep_kv=True)  # first: when a client sees its end, the slot is free again
        slot.stream._end(slot.turn.events)

    def _drop(self, slot: _Slot, error: BaseException) -> None:
        self._free_slot(slot, keep_kv=False)
        slot.stream._end(slot.turn.events, error=error)

    def _free_slot(self, slot: _Slot, keep_kv: bool) -> None:
        slot.turn.release()
        if slot.spec is not None:
            slot.spec.release()
        self._active.remove(slot)
        if self._prefix is None:  # one slot: what it evaluated is the next turn's prompt cache
            if not keep_kv:
                llama_cpp.llama_memory_clear(self._mem, True)
                self._kept = []
            self._free.append(slot.seq)
            return
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        self._compact(slot.seq)

    def _compact(self, hole: int) -> None:
        """Keep the busy sequence ids 1..k, so one ubatch can hold every slot (see _fill_batch):
        the slot with the highest id moves into the hole. Its KV stream is copied on the device
        at the next decode (a whole stream: a few ms at 40k cells on a GPU), once per ended
        request, instead of every later step paying an extra pass over the weights."""
        last = max(self._active, key=lambda s: s.seq, default=None)
        if last is None or last.seq < hole or self._closing:
            self._free.append(hole)
            return
        self._copy_kv(last.seq, hole, last.n_past)
        llama_cpp.llama_memory_seq_rm(self._mem, last.seq, -1, -1)
        self.set_backend_topk(hole, last.turn.backend_k())
        self._free.append(last.seq)
        last.seq = hole
        self.stats.moves += 1


def load_engine(settings: LoadSettings) -> Engine:
    """The engine for these settings (one code path whatever ``settings.n_slots`` is)."""
    return Engine(settings)


__all__ = ["Engine", "EngineStats", "Stream", "load_engine"]
