"""The loaded model: llama.cpp's model and context, tokenization, token pieces, sampler chains.

What every turn needs from the model and nothing about scheduling turns (``engine.py`` does
that). Magistral prompts are built from token ids with the reference-exact Tekken tokenizer;
other GGUF models use their own chat template, rendered in a sandbox, with user text tokenized
without special-token parsing (text that looks like ``[INST]`` stays text).

The context holds one KV stream for one slot. For ``n_slots`` > 1 it holds ``n_slots + 1``
separate streams of ``n_ctx`` cells each (``kv_unified = False``), the extra one for the shared
prompt prefix: llama-cpp-python 0.3.36 has no ``n_seq_max`` argument, so ``Llama`` builds a small
throwaway context first, which is freed before the real one is allocated.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

# llama_cpp first: its libraries (ggml's CUDA and OpenMP runtimes) must load before numpy's do.
# Loading numpy (imported by gguf) first made model loading segfault on a CUDA build (H200).
import llama_cpp  # noqa: I001
from llama_cpp import _internals

from edge_magistral import llama_log
from edge_magistral import tekken as tk
from edge_magistral.chat import Message, ToolSpec, magistral_prompt, render_template
from edge_magistral.errors import BackendError, BadInputError
from edge_magistral.generation import KV_TYPES, Limits, LoadSettings, check_schema
from edge_magistral.gguf_info import GGUFInfo, check_model, read_info
from edge_magistral.rpc import backend as rpc_backend
from edge_magistral.rpc.buffers import RemoteBuffers
from edge_magistral.speculate import DRAFT_MAX
from edge_magistral.watchdog import WatchdogConfig

LOAD_CTX = 256  # the throwaway context llama_cpp.Llama insists on building at load (see _load)


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
    """One model and its context: loading, tokenization, token pieces, sampler chains and the
    watchdog settings of a turn. ``n_ctx`` is what one slot (one turn) may use."""

    def __init__(self, settings: LoadSettings):
        settings.check()
        if not 1 <= settings.n_slots < llama_cpp.llama_max_parallel_sequences():
            raise BadInputError(f"n_slots must be 1..{llama_cpp.llama_max_parallel_sequences() - 1}")
        self.settings = settings
        self.n_slots = settings.n_slots
        self.info: GGUFInfo = read_info(settings.model_path)  # bounded pre-check first
        check_model(self.info)
        self.is_magistral = self.info.tokenizer_pre == "tekken" and "end_think" in self.info.special_tokens
        t0 = time.monotonic()
        self.remote_buffers = RemoteBuffers()  # what llama.cpp allocated on each RPC worker
        with llama_log.listen(self.remote_buffers.feed) if settings.workers else contextlib.nullcontext():
            self.llm = _load(settings)
        self.load_s = time.monotonic() - t0
        self.ctx = self.llm.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_ctx = settings.n_ctx if settings.n_slots > 1 else llama_cpp.llama_n_ctx(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.tokenizer = tk.TekkenTokenizer.from_gguf(settings.model_path) if self.is_magistral else None
        self._pieces: dict[int, bytes] = {}
        self.backend_sampling = self._want_backend_sampling(settings)
        self._backend_topk: dict[int, tuple[int, Any]] = {}  # seq id → (k, the chain attached to it)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
        for _, chain in getattr(self, "_backend_topk", {}).values():  # the context no longer uses them
            llama_cpp.llama_sampler_free(chain)
        self._backend_topk = {}

    # ----------------------------------------------------------- sampling on the device
    def _want_backend_sampling(self, s: LoadSettings) -> bool:
        """Auto: only when the output layer (and so the logits) lives on a GPU. There a top-k on
        the device leaves the host ~50 candidates instead of 131k logits to copy and sort (about
        0.2 ms a token on a fast CPU, 2-3% of a 24B model's step on an H200); on a CPU backend the
        same top-k only moves that work into the graph and measured slower."""
        if s.backend_sampling is not None:
            return s.backend_sampling
        return self.all_on_gpu()

    def all_on_gpu(self) -> bool:
        """Every layer and the output layer on a GPU (llama.cpp's n_gpu_layers > n_layers)."""
        return bool(llama_cpp.llama_supports_gpu_offload()) and self.settings.n_gpu_layers > self.info.n_layers

    def set_backend_topk(self, seq: int, k: int | None) -> None:
        """Attach a device-side top-``k`` to sequence ``seq`` (``None``: detach). Changing it makes
        llama.cpp re-reserve its graphs, so it is only redone when ``k`` changes."""
        k = k if self.backend_sampling else None
        held = self._backend_topk.get(seq)
        if (held[0] if held else None) == k:
            return
        lc = llama_cpp
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

    def backend_topk(self, seq: int) -> int | None:
        """The device-side top-k attached to sequence ``seq``, if any."""
        held = self._backend_topk.get(seq)
        return held[0] if held else None

    # ------------------------------------------------------------------ tokenization
    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens: none), cached."""
        b = self._pieces.get(token)
        if b is None:
            b = self.tokenizer.token_bytes(token) if self.tokenizer else self.llama_piece(token)
            self._pieces[token] = b
        return b

    def llama_piece(self, token: int, special: bool = False) -> bytes:
        """llama.cpp's bytes for a token, growing the buffer when a piece is longer than 256 bytes."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def encode_text(self, text: str) -> list[int]:
        """Plain text → ids, never control tokens (prompt-injection guard)."""
        if self.tokenizer:
            return self.tokenizer.encode(text)
        return self.llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)

    def prompt_ids(self, messages: Sequence[Message], system_mode: str = "replace",
                   tools: Sequence[ToolSpec] = ()) -> list[int]:
        if self.is_magistral:
            return magistral_prompt(messages, self.encode_text, system_mode, tools)
        if tools:
            raise BadInputError("tools need a Magistral model; this model's own chat template gets plain chats only")
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BadInputError(f"{self.info.path} has no chat template; use a Magistral GGUF or raw completion")
        bos = self.piece_text(llama_cpp.llama_vocab_bos(self.vocab), special=True)
        eos = self.piece_text(self.eos_id, special=True)
        rendered = render_template(template, messages, bos_token=bos, eos_token=eos)
        ids: list[int] = []
        for text, trusted in rendered.parts:
            ids += self.llm.tokenize(text.encode(), add_bos=False, special=True) if trusted else \
                self.encode_text(text)
        return ids

    def raw_prompt_ids(self, text: str) -> list[int]:
        """A plain-text completion prompt: BOS (when the model wants one) and the text, tokenized
        without special-token parsing, so a raw prompt can never forge control tokens."""
        return self.llm.tokenize(b"", add_bos=True, special=False) + self.encode_text(text)

    def piece_text(self, token: int, special: bool = False) -> str:
        return self.llama_piece(token, special).decode("utf-8", "replace") if token >= 0 else ""

    def sampler(self, limits: Limits, temperature: float, banned: frozenset[int], grammar: str | None,
                root: str = "root"):
        """A native chain: bans, the grammar from rule ``root``, then Magistral's sampling."""
        lc = llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if banned:
            arr = (lc.llama_logit_bias * len(banned))()
            for i, t in enumerate(sorted(banned)):
                arr[i].token, arr[i].bias = t, float("-inf")
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(banned), arr))
        if grammar is not None:
            g = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), root.encode())
            if not g:
                lc.llama_sampler_free(chain)
                raise BadInputError("the grammar (from a JSON schema or the tools' parameters) did not parse")
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

    @staticmethod
    def free_sampler(chain: Any) -> None:
        llama_cpp.llama_sampler_free(chain)

    @staticmethod
    def accept(chain: Any, tokens: Sequence[int]) -> None:
        """Replay accepted tokens into a new chain (a grammar starts from its root)."""
        for t in tokens:
            llama_cpp.llama_sampler_accept(chain, t)

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


def default_threads() -> int:
    """Physical cores are the fastest thread count for generation on CPUs."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def _load(s: LoadSettings) -> Any:
    """``Llama`` with the plan's settings. Its context is replaced by one made with parameters
    ``Llama`` does not take: ``n_slots + 1`` separate KV streams for several slots, and room for
    a verify step's several logits rows per sequence when speculating (llama.cpp's default is one
    row per sequence with a device-side sampler, and it refuses a batch asking more)."""
    llama_log.install()
    if s.workers:  # probed by the caller: llama.cpp aborts the process on a worker that fails
        rpc_backend.register_workers(list(s.workers))
    elif stale := rpc_backend.registered_endpoints():  # llama.cpp would load onto them as well
        raise BackendError(f"this process placed layers on RPC worker(s) {', '.join(stale)} before: "
                           "load a model without them in a new process")
    own = s.n_slots > 1 or s.speculate != "off"
    try:
        with _output_on_host(s.output_on_host):
            llm = llama_cpp.Llama(
                model_path=s.model_path, n_ctx=LOAD_CTX if own else s.n_ctx, n_gpu_layers=s.n_gpu_layers,
                n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=s.n_threads or default_threads(),
                n_threads_batch=s.n_threads_batch or s.n_threads or os.cpu_count(), flash_attn=s.flash_attn,
                type_k=KV_TYPES[s.type_k], type_v=KV_TYPES[s.type_v],
                tensor_split=list(s.tensor_split) or None, logits_all=False,
                verbose=os.environ.get("EDGE_MAGISTRAL_LLAMA_VERBOSE") == "1",  # llama.cpp's own log on stderr
                chat_format="chatml",  # llama-cpp-python's own template handling is never used
            )
    except ValueError as e:
        raise BackendError(f"llama.cpp could not load {s.model_path}: {e}") from None
    return _own_context(llm, s) if own else llm


@contextlib.contextmanager
def _output_on_host(on: bool) -> Iterator[None]:
    """While ``Llama`` builds its model parameters, hand it defaults that keep the output layer's
    weights on the CPU (``rpc.backend.host_output_overrides``): llama-cpp-python 0.3.36 passes no
    tensor overrides of its own, and reads the defaults once, from this function."""
    if not on:
        yield
        return
    default = llama_cpp.llama_cpp.llama_model_default_params

    def with_override() -> Any:
        p = default()
        p.tensor_buft_overrides = rpc_backend.host_output_overrides()
        return p

    llama_cpp.llama_cpp.llama_model_default_params = with_override
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


def _own_context(llm: Any, s: LoadSettings) -> Any:
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = s.n_ctx
    if s.n_slots > 1:
        params.n_ctx = (s.n_slots + 1) * s.n_ctx  # one stream of n_ctx cells per sequence
        params.n_seq_max = s.n_slots + 1
        params.kv_unified = False
    params.n_batch, params.n_ubatch = s.n_batch, min(s.n_batch, s.n_ubatch)
    if s.speculate != "off":
        params.n_outputs_max_per_seq = DRAFT_MAX + 1  # a token and its guesses, each with logits
    llm._ctx.close()  # free the throwaway before allocating the real one
    try:
        llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    except ValueError as e:
        llm.close()
        raise BackendError(f"llama.cpp could not create the context ({s.n_slots} slot(s), n_ctx {s.n_ctx}): "
                           f"{e}") from None
    return llm
