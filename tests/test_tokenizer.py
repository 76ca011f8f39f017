"""Tokenizer parity: the ids edge-magistral feeds the model are mistral-common's Tekken ids.

The reference is mistral-common's own Tekkenizer over the tiny checkpoint's tekken.json (the real
Magistral vocabulary); ours is rebuilt from the converted GGUF alone. The corpus lives in
tests/data/corpus/<category>.jsonl, one JSON string per line.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError
from edge_magistral.tekken import (
    _BLANK_RUN_LIMIT,
    BOS,
    EOS,
    INST,
    NUM_SPECIAL,
    SPECIAL_TOKENS,
    TEKKEN_PATTERN,
    TekkenTokenizer,
    read_tokenizer_metadata,
)

CORPUS_DIR = Path(__file__).parent / "data" / "corpus"
REQUIRED = ("en", "fr", "de", "es", "it", "pt", "ru", "zh", "ja", "ko", "ar", "hi", "th", "code", "emoji",
            "whitespace", "mixed", "combining", "injection")
# Categories free of combining marks, where llama.cpp's pre-tokenizer was measured to agree.
LLAMA_CPP_AGREES = ("en", "fr", "de", "es", "it", "pt", "ru", "zh", "ja", "ko", "code", "emoji", "whitespace",
                    "injection")


def load_corpus() -> dict[str, list[str]]:
    return {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line]
            for f in sorted(CORPUS_DIR.glob("*.jsonl"))}


CORPUS = load_corpus()


@pytest.fixture(scope="module")
def tekken(tiny_gguf_f32: Path) -> TekkenTokenizer:
    return TekkenTokenizer.from_gguf(tiny_gguf_f32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    """mistral-common's Tekkenizer for the same tekken.json the GGUF was built from."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json")).instruct_tokenizer.tokenizer


def ref_ids(reference, text: str) -> list[int]:
    return reference.encode(text, bos=False, eos=False)


def write_vocab_gguf(path: Path, tokens: list[bytes], pre: str = "tekken", model: str = "gpt2",
                     pattern: str | None = None) -> Path:
    """A GGUF holding only tokenizer metadata (no tensors): a stand-in for GGUFs made elsewhere."""
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if pattern is not None:
        w.add_string("tokenizer.tekken.pattern", pattern)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_tokens(tiny_gguf_f32: Path) -> list[bytes]:
    return read_tokenizer_metadata(tiny_gguf_f32)["tokenizer.ggml.tokens"]


# ------------------------------------------------------------------------------------ the corpus

def test_corpus_covers_every_required_category() -> None:
    missing = [c for c in REQUIRED if len(CORPUS.get(c, [])) < 4]
    assert not missing, f"corpus categories missing or with fewer than 4 texts: {missing}"


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_ids_equal_mistral_common(category: str, tekken: TekkenTokenizer, reference) -> None:
    for text in CORPUS[category]:
        ids = tekken.encode(text)
        assert ids == ref_ids(reference, text), f"{category}: {text[:60]!r}"
        assert all(NUM_SPECIAL <= i < tekken.n_vocab for i in ids)


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_detokenization_round_trips(category: str, tekken: TekkenTokenizer) -> None:
    for text in CORPUS[category]:
        ids = tekken.encode(text)
        assert tekken.decode(ids) == text
        # Streaming: one token's bytes at a time through an incremental UTF-8 decoder, as the engine does.
        dec = codecs.getincrementaldecoder("utf-8")()
        assert "".join(dec.decode(tekken.token_bytes(i)) for i in ids) + dec.decode(b"", final=True) == text


def test_combining_marks_stay_with_their_letters(tekken: TekkenTokenizer, reference) -> None:
    """The case llama.cpp gets wrong: Devanagari's virama/matra and Thai vowels join the letter's piece."""
    ids = tekken.encode("नमस्ते")
    pieces = [tekken.token_bytes(i).decode("utf-8") for i in ids]
    assert "स्त" in pieces and ids == ref_ids(reference, "नमस्ते")
    assert tekken.encode("สวัสดี") == ref_ids(reference, "สวัสดี")


# --------------------------------------------------------------------------- no turn injection

@pytest.mark.parametrize("marker", ["[INST]", "[/INST]", "<s>", "</s>", "[THINK]", "[/THINK]",
                                    "[SYSTEM_PROMPT]", "[TOOL_CALLS]", "<unk>", "<SPECIAL_999>"])
def test_control_token_text_is_plain_text(marker: str, tekken: TekkenTokenizer, reference) -> None:
    text = f"ok {marker} then{marker}"
    ids = tekken.encode(text)
    assert all(i >= NUM_SPECIAL for i in ids), ids
    assert ids == ref_ids(reference, text)
    assert tekken.decode(ids) == text


def test_control_tokens_have_no_text(tekken: TekkenTokenizer) -> None:
    assert SPECIAL_TOKENS[INST] == "[INST]"
    assert all(tekken.token_bytes(i) == b"" for i in (0, BOS, EOS, INST, 999))
    assert tekken.token_bytes(NUM_SPECIAL) == b"\x00"  # rank 0 is the byte 0x00
    body = tekken.encode("hello")
    assert tekken.decode([BOS, INST, *body, EOS]) == "hello"
    for bad in (-1, tekken.n_vocab):
        with pytest.raises(BadInputError):
            tekken.token_bytes(bad)


# ---------------------------------------------------------------------------- awkward input

def test_lone_surrogates_become_replacement_characters(tekken: TekkenTokenizer, reference) -> None:
    """Lone surrogates (a JSON "\\ud800", an undecodable argv byte) encode as U+FFFD, as in
    mistral-common; a pair written as two code points is joined into its character."""
    assert tekken.encode("a\ud800b") == tekken.encode("a\ufffdb") == ref_ids(reference, "a\ud800b")
    assert tekken.encode("x\udcff\udcfe") == tekken.encode("x\ufffd\ufffd")
    assert tekken.encode("\ud83d\ude00") == tekken.encode("😀")


def test_partial_utf8_tokens_decode_with_replacement(tekken: TekkenTokenizer) -> None:
    ids = tekken.encode("สวัสดี")
    partial = next(i for i in range(NUM_SPECIAL, tekken.n_vocab) if tekken.token_bytes(i) == b"\xe0")
    assert tekken.decode([partial]) == "\ufffd"
    assert tekken.decode([*ids, partial]) == "สวัสดี\ufffd"


def test_blank_runs_just_below_the_chunking_limit_match_mistral_common(tekken: TekkenTokenizer,
                                                                       reference) -> None:
    text = "a" + " " * (_BLANK_RUN_LIMIT - 1) + "b\t"
    assert tekken.encode(text) == ref_ids(reference, text)


def test_blank_runs_past_tiktokens_limit_encode_and_round_trip(tekken: TekkenTokenizer) -> None:
    """About a million blanks make tiktoken's regex engine panic (mistral-common too); we chunk."""
    text = "start" + " " * 1_100_000 + "end\n" + "\t" * 1_000_001
    ids = tekken.encode(text)
    assert tekken.decode(ids) == text
    assert len(ids) < len(text) // 10  # still long blank tokens, not one token per character


def test_empty_text(tekken: TekkenTokenizer) -> None:
    assert tekken.encode("") == []
    assert tekken.decode([]) == ""


# ----------------------------------------------------------------- where the pattern comes from

def test_pattern_key_written_by_the_build_is_used(tekken: TekkenTokenizer, tiny_gguf_f32: Path) -> None:
    meta = read_tokenizer_metadata(tiny_gguf_f32)
    assert meta["tokenizer.ggml.pre"] == "tekken"
    assert tekken.pattern == meta["tokenizer.tekken.pattern"] == TEKKEN_PATTERN


def test_gguf_without_pattern_key_uses_the_known_tekken_pattern(tmp_path: Path, gguf_tokens: list[bytes],
                                                                reference) -> None:
    """Official GGUFs carry no pattern key and no merges are needed: pre 'tekken' is enough."""
    tok = TekkenTokenizer.from_gguf(write_vocab_gguf(tmp_path / "official-like.gguf", gguf_tokens))
    assert tok.pattern == TEKKEN_PATTERN
    for category in ("hi", "th", "en", "code"):
        for text in CORPUS[category]:
            assert tok.encode(text) == ref_ids(reference, text)


def test_a_different_pattern_key_changes_the_split(tmp_path: Path, gguf_tokens: list[bytes]) -> None:
    """The key is really read: a pattern that never merges across spaces and letters splits differently."""
    tok = TekkenTokenizer.from_gguf(write_vocab_gguf(tmp_path / "p.gguf", gguf_tokens, pattern=r"\S|\s"))
    assert tok.pattern == r"\S|\s"
    assert len(tok.encode("hello world")) == len("hello world")


def test_an_unusable_pattern_key_is_refused(tmp_path: Path, gguf_tokens: list[bytes]) -> None:
    with pytest.raises(CorruptModelError, match="unusable tokenizer pattern"):
        TekkenTokenizer.from_gguf(write_vocab_gguf(tmp_path / "p.gguf", gguf_tokens, pattern="(\\p{L}"))


def test_cache_reloads_a_rewritten_file(tmp_path: Path, gguf_tokens: list[bytes]) -> None:
    path = write_vocab_gguf(tmp_path / "v.gguf", gguf_tokens, pattern=r"\S+|\s+")
    first = TekkenTokenizer.from_gguf(path)
    assert TekkenTokenizer.from_gguf(path) is first
    write_vocab_gguf(path, gguf_tokens)
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse-clock filesystems
    assert TekkenTokenizer.from_gguf(path).pattern == TEKKEN_PATTERN


# ------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("model", "pre"), [("gpt2", "llama-bpe"), ("gpt2", "default"), ("llama", "tekken")])
def test_non_tekken_tokenizers_are_refused(tmp_path: Path, gguf_tokens: list[bytes], model: str,
                                           pre: str) -> None:
    path = write_vocab_gguf(tmp_path / "other.gguf", gguf_tokens, pre=pre, model=model)
    with pytest.raises(BadInputError, match="not gpt2/tekken"):
        TekkenTokenizer.from_gguf(path)


def test_a_vocabulary_without_the_256_bytes_is_refused(tmp_path: Path, gguf_tokens: list[bytes]) -> None:
    byte_0 = gguf_tokens[NUM_SPECIAL]
    shuffled = [*gguf_tokens[:NUM_SPECIAL], *gguf_tokens[NUM_SPECIAL + 1:], byte_0]  # byte 0x00 moved last
    with pytest.raises(BadInputError, match="not a Tekken vocabulary"):
        TekkenTokenizer.from_gguf(write_vocab_gguf(tmp_path / "shuffled.gguf", shuffled))


def test_a_token_that_is_not_byte_level_is_refused(tmp_path: Path, gguf_tokens: list[bytes]) -> None:
    broken = [*gguf_tokens[:-1], b"a b"]  # a raw space is not a GPT-2 byte character
    with pytest.raises(CorruptModelError, match="not a byte-level BPE token"):
        TekkenTokenizer.from_gguf(write_vocab_gguf(tmp_path / "broken.gguf", broken))


def test_missing_empty_foreign_and_truncated_files(tmp_path: Path, tiny_gguf_f32: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        TekkenTokenizer.from_gguf(tmp_path / "absent.gguf")
    with pytest.raises(BadInputError, match="directory"):
        TekkenTokenizer.from_gguf(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CorruptModelError, match="empty"):
        TekkenTokenizer.from_gguf(tmp_path / "empty.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(CorruptModelError, match="bad magic"):
        TekkenTokenizer.from_gguf(tmp_path / "text.gguf")
    with open(tiny_gguf_f32, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1_000_000))  # ends inside the token list
    with pytest.raises(CorruptModelError, match="truncated"):
        TekkenTokenizer.from_gguf(tmp_path / "cut.gguf")


# ------------------------------------------------------------------------------------ the CLI

def run_cli(*args: str, stdin: bytes | None = None):
    import edge_magistral.cli.tokenize_cmds  # noqa: F401  (registers `tokenize`)
    from edge_magistral.cli import cli

    return CliRunner().invoke(cli, ["tokenize", *args], input=stdin)


def test_cli_json_prints_the_engine_ids(tiny_gguf_f32: Path, reference) -> None:
    text = "Bonjour [INST]</s> नमस्ते 👨\u200d👩\u200d👧"
    r = run_cli(str(tiny_gguf_f32), text, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"ids": ref_ids(reference, text)}


def test_cli_reads_stdin(tiny_gguf_f32: Path, reference) -> None:
    text = CORPUS["code"][0] + "\n" + CORPUS["th"][0]
    r = run_cli(str(tiny_gguf_f32), "-", "--json", stdin=text.encode())
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ids"] == ref_ids(reference, text)


def test_cli_stdin_invalid_utf8_becomes_replacement_characters(tiny_gguf_f32: Path,
                                                               tekken: TekkenTokenizer) -> None:
    r = run_cli(str(tiny_gguf_f32), "-", "--json", stdin=b"caf\xe9 ok")
    assert json.loads(r.stdout)["ids"] == tekken.encode("caf\ufffd ok")


def test_cli_readable_output(tiny_gguf_f32: Path, tekken: TekkenTokenizer) -> None:
    r = run_cli(str(tiny_gguf_f32), "Hello world")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == "2 tokens"
    assert [int(line.split()[0]) for line in lines[:-1]] == tekken.encode("Hello world")
    assert "' world'" in lines[1]


@pytest.mark.parametrize(("name", "code"), [
    ("absent.gguf", ModelNotFoundError.exit_code),
    (".", BadInputError.exit_code),
    ("v9.gguf", CorruptModelError.exit_code),
])
def test_cli_errors_are_one_line(tmp_path: Path, name: str, code: int) -> None:
    (tmp_path / "v9.gguf").write_bytes(b"GGUF\x09\x00\x00\x00")  # a GGUF version that does not exist
    r = run_cli(str(tmp_path / name), "hi")
    assert r.exit_code == code
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output


# ------------------------------------------------------------------- llama.cpp's own tokenizer

@pytest.fixture(scope="module")
def llama_vocab(tiny_gguf_f32: Path):
    """llama.cpp with the GGUF's vocabulary only (no weights)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(tiny_gguf_f32), vocab_only=True, verbose=False)


def test_llama_cpp_has_the_same_bytes_for_every_id(llama_vocab, tekken: TekkenTokenizer) -> None:
    """Our vocabulary, rebuilt from the GGUF, is llama.cpp's: every id means the same bytes."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama_vocab.model)
    buf = ctypes.create_string_buffer(1024)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == tekken.n_vocab
    for i in range(tekken.n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
        assert buf.raw[:n] == tekken.token_bytes(i), i


def test_llama_cpp_python_detokenize_drops_long_tokens(llama_vocab, tekken: TekkenTokenizer) -> None:
    """Llama.detokenize reads each piece into a 32-byte buffer, so the vocabulary's 33+ byte tokens
    (runs of spaces, '-----…' rules, long Telugu words) vanish: stream text with token_bytes instead."""
    spaces = tekken.encode(" " * 64 + "x")[0]
    assert len(tekken.token_bytes(spaces)) > 32
    assert llama_vocab.detokenize([spaces]) == b"", "llama-cpp-python fixed detokenize: update the notes"


def test_llama_cpp_tokenizer_divergence(llama_vocab, reference, tekken: TekkenTokenizer,
                                        record_property) -> None:
    """llama.cpp's pre-tokenizer splits combining marks off their letters (Devanagari, Thai): why the
    runtime tokenizes with tiktoken. Its ids still spell the same text, just segmented differently."""
    diverging: dict[str, int] = {}
    for category, texts in CORPUS.items():
        for text in texts:
            ids = llama_vocab.tokenize(text.encode(), add_bos=False, special=False)
            assert tekken.decode(ids) == text, f"llama.cpp ids do not spell {text[:40]!r}"
            diverging[category] = diverging.get(category, 0) + (ids != ref_ids(reference, text))
    record_property("llama_cpp_diverging_texts", diverging)
    assert {c: diverging[c] for c in LLAMA_CPP_AGREES if diverging[c]} == {}
    assert diverging["hi"] > 0 and diverging["th"] > 0, (
        f"llama.cpp now matches mistral-common on Hindi/Thai ({diverging}); re-measure with "
        "benchmarks/tokenizer_parity.py and update the notes")
