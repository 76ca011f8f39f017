"""Magistral's Tekken tokenizer: special tokens, the split pattern, and its tekken.json.

Tekken is a tiktoken-style byte-level BPE: ids 0..999 are control tokens, ordinary tokens are
BPE rank + 1000. Magistral Small 1.1 uses tokenizer version v13 with ``[THINK]``=34 and
``[/THINK]``=35; mistral-common ships the same BPE vocabulary as ``tekken_240911.json`` but with
an older special-token table, so :func:`magistral_tekken` rewrites it with Magistral's table.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError, CorruptModelError

NUM_SPECIAL = 1000
VOCAB_SIZE = 131072

# The split pattern of every Tekken tokenizer so far (mistral-common's tekken_240911.json).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Magistral Small 1.1's named control tokens (mistral-common SpecialTokens, v13 layout).
SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]",
    11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 24: "[AUDIO]",
    25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]",
}
UNK, BOS, EOS, INST, END_INST = 0, 1, 2, 3, 4
AVAILABLE_TOOLS, END_AVAILABLE_TOOLS, TOOL_RESULTS, END_TOOL_RESULTS, TOOL_CALLS = 5, 6, 7, 8, 9
SYSTEM, END_SYSTEM, ARGS, THINK, END_THINK = 17, 18, 32, 34, 35

GGUF_PATTERN_KEY = "tokenizer.tekken.pattern"  # where the build records the split pattern


def special_token_table() -> list[dict[str, Any]]:
    """All 1000 control tokens as tekken.json lists them (unnamed ones are ``<SPECIAL_i>``)."""
    return [
        {"rank": i, "token_str": SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL)
    ]


def base_tekken_path() -> Path:
    """The Tekken vocabulary file mistral-common ships (the one Magistral's BPE ranks come from)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def magistral_tekken() -> dict[str, Any]:
    """A tekken.json equal to Magistral 1.1's in vocabulary, pattern and special tokens."""
    data = json.loads(base_tekken_path().read_text(encoding="utf-8"))
    data["config"] = {
        **data["config"],
        "version": "v13",
        "default_vocab_size": VOCAB_SIZE,
        "default_num_special_tokens": NUM_SPECIAL,
    }
    data["special_tokens"] = special_token_table()
    data.pop("image", None)  # Magistral Small 1.1 is text-only
    return data


def write_magistral_tekken(path: Path) -> None:
    path.write_text(json.dumps(magistral_tekken(), ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------- tokenizer from a GGUF
#
# llama.cpp's own pre-tokenizer does not split every script as Tekken does (combining marks), so the
# runtime tokenizes with tiktoken — the library mistral-common itself uses — over the vocabulary
# stored in the GGUF. Control tokens are never produced from text: callers insert them by id.

_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", GGUF_PATTERN_KEY)


def read_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The tokenizer keys of a GGUF's metadata (strings as str, the token list as list[bytes]),
    read through the bounded header parser."""
    from edge_magistral.gguf_info import read_header

    meta = read_header(path, keep_arrays=frozenset({"tokenizer.ggml.tokens"})).metadata
    return {k: meta[k] for k in _TOKENIZER_KEYS if k in meta}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which GGUF stores byte-level BPE tokens."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unicode_to_latin1() -> dict[int, int]:
    """str.translate table turning a GPT-2 token string into latin-1 characters (one per byte).

    Latin-1 characters that are *not* GPT-2 byte characters map to U+FFFF, so a malformed token
    fails the later ``.encode("latin-1")`` instead of passing through silently.
    """
    table = {ord(ch): b for b, ch in _bytes_to_unicode().items()}
    for b in range(256):
        table.setdefault(b, 0xFFFF)
    return table


def _mergeable_ranks(tokens: list[bytes], path: str) -> dict[bytes, int]:
    """tiktoken ranks from the GGUF token list: token ``NUM_SPECIAL + r`` has rank ``r``."""
    table = _unicode_to_latin1()
    ranks: dict[bytes, int] = {}
    for rank, tok in enumerate(tokens[NUM_SPECIAL:]):
        try:
            ranks[tok.decode("utf-8").translate(table).encode("latin-1")] = rank
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise CorruptModelError(f"{path}: token {rank + NUM_SPECIAL} is not a byte-level BPE token; "
                                    "re-download or rebuild the model") from None
    if len(ranks) != len(tokens) - NUM_SPECIAL:
        raise CorruptModelError(f"{path}: the token list has duplicate tokens; re-download or rebuild it")
    if any(ranks.get(bytes([b])) != b for b in range(256)):
        raise BadInputError(f"{path}: tokens {NUM_SPECIAL}..{NUM_SPECIAL + 255} are not the 256 single "
                            "bytes; this is not a Tekken vocabulary")
    return ranks


def _text(meta: dict[str, Any], key: str) -> str:
    v = meta.get(key)
    return v if isinstance(v, str) else ""


def _check_tekken(meta: dict[str, Any], path: str) -> str:
    """Refuse anything but a Tekken GGUF; return its split pattern."""
    model, pre = _text(meta, "tokenizer.ggml.model"), _text(meta, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "tekken":
        raise BadInputError(f"{path}: tokenizer is {model or '?'}/{pre or '?'}, not gpt2/tekken; "
                            "edge-magistral runs Magistral (Tekken) GGUFs only")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        tokens = []
    if not tokens or len(tokens) <= NUM_SPECIAL + 256:
        raise BadInputError(f"{path}: the GGUF has no usable token list ({len(tokens or [])} tokens)")
    return _text(meta, GGUF_PATTERN_KEY) or TEKKEN_PATTERN


def _well_formed(text: str) -> str:
    """Make ``text`` encodable as UTF-8 the way tiktoken (and so mistral-common) does.

    Surrogate pairs written as two code points are joined; lone surrogates (from a JSON ``\\ud800``
    escape or an undecodable command-line byte) become U+FFFD, one per surrogate.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# tiktoken's regex engine (fancy-regex) panics on a run of about a million blanks (spaces, tabs, not
# newlines) — mistral-common included. Runs this long are cut into chunks encoded one by one.
_BLANK_RUN_LIMIT = 500_000
_BLANKS = re.compile(r"[^\S\r\n]+")


def _pieces(text: str) -> list[str]:
    """``text`` as one piece, or cut inside runs of at least _BLANK_RUN_LIMIT blanks.

    Below the limit the result is exactly mistral-common's; above it mistral-common has no answer
    and the chunked encoding still decodes to the same text.
    """
    if len(text) < _BLANK_RUN_LIMIT:
        return [text]
    cuts = [0]
    for m in _BLANKS.finditer(text):
        if m.end() - m.start() >= _BLANK_RUN_LIMIT:
            cuts += range(m.start(), m.end(), _BLANK_RUN_LIMIT // 2)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if a < b]


class TekkenTokenizer:
    """Magistral's tokenizer rebuilt from a GGUF: a tiktoken encoding over the GGUF's own vocabulary.

    ``encode`` never yields control tokens (ids < 1000): text such as ``[INST]`` or ``</s>`` is
    tokenized as the plain characters it is, so user text cannot inject turns. Build prompts by
    inserting control-token ids around encoded text.
    """

    def __init__(self, encoding: Any, n_vocab: int, pattern: str, path: str):
        self.encoding = encoding
        self.n_vocab = n_vocab
        self.pattern = pattern
        self.path = path

    @classmethod
    def from_gguf(cls, path: str | Path) -> TekkenTokenizer:
        """Load (cached per file path, size and mtime) the tokenizer of a Tekken GGUF."""
        p = Path(path)
        try:
            st = p.resolve().stat()
        except OSError:
            return cls._build(str(p))  # raises the right error for a missing/unreadable file
        return _cached_tokenizer(str(p.resolve()), st.st_size, st.st_mtime_ns)

    @classmethod
    def _build(cls, path: str) -> TekkenTokenizer:
        import tiktoken

        meta = read_tokenizer_metadata(path)
        pattern = _check_tekken(meta, path)
        tokens = meta["tokenizer.ggml.tokens"]
        ranks = _mergeable_ranks(tokens, path)
        try:
            enc = tiktoken.Encoding(f"tekken:{Path(path).name}", pat_str=pattern, mergeable_ranks=ranks,
                                    special_tokens={})
        except ValueError as e:
            raise CorruptModelError(f"{path}: unusable tokenizer pattern ({e}); rebuild the model") from None
        return cls(enc, len(tokens), pattern, path)

    def encode(self, text: str) -> list[int]:
        """Token ids for plain text (no BOS/EOS, never a control token)."""
        enc = self.encoding
        return [t + NUM_SPECIAL for piece in _pieces(_well_formed(text)) for t in enc.encode_ordinary(piece)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for; b"" for control tokens (they are not text)."""
        if not 0 <= token_id < self.n_vocab:
            raise BadInputError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
        if token_id < NUM_SPECIAL:
            return b""
        return self.encoding.decode_single_token_bytes(token_id - NUM_SPECIAL)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with control tokens dropped; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", "replace")

    def text_with_specials(self, ids: list[int]) -> str:
        """Text of ``ids`` with each control token written as its name (``[INST]``, ``<SPECIAL_20>``).

        For people reading a prompt: text typed as ``[INST]`` looks the same as the control token."""
        out, run = [], bytearray()
        for t in ids:
            if NUM_SPECIAL <= t < self.n_vocab:
                run += self.token_bytes(t)
                continue
            self.token_bytes(t)  # refuses an id outside the vocabulary
            out += [run.decode("utf-8", "replace"), SPECIAL_TOKENS.get(t, f"<SPECIAL_{t}>")]
            run.clear()
        return "".join([*out, run.decode("utf-8", "replace")])


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, size: int, mtime_ns: int) -> TekkenTokenizer:
    """One tokenizer per file version; size and mtime in the key make a rebuilt file reload."""
    return TekkenTokenizer._build(path)
