"""Tokenizer parity on the multilingual corpus: edge-magistral's tokenizer and llama.cpp's own,
each against mistral-common's Tekken encoding (the reference the model was trained with).

    python benchmarks/tokenizer_parity.py                      # builds a tiny Magistral GGUF first
    python benchmarks/tokenizer_parity.py --gguf Magistral-Small-2507-Q4_K_M.gguf

Writes benchmarks/out/tokenizer_parity.json and prints one row per corpus category: the share of
texts whose ids differ from mistral-common's, and token counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_magistral.tekken import TekkenTokenizer, write_magistral_tekken  # noqa: E402

Encode = Callable[[str], list[int]]


@dataclass
class CategoryResult:
    """One corpus category: how often, and by how many tokens, each tokenizer departs from the reference."""

    texts: int
    ours_differ: int
    llama_cpp_differ: int
    llama_cpp_divergence: float  # fraction of texts whose llama.cpp ids differ
    tokens_reference: int
    tokens_ours: int
    tokens_llama_cpp: int
    llama_cpp_ids_spell_text: bool  # llama.cpp's ids, read through the shared vocabulary, spell each text
    llama_cpp_python_detokenize_round_trips: bool  # Llama.detokenize gives back every text
    first_divergence: dict[str, Any] | None  # the first differing text, where, and both tokenizations there


def load_corpus(directory: Path) -> dict[str, list[str]]:
    return {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line]
            for f in sorted(directory.glob("*.jsonl"))}


def tiny_gguf(workdir: Path) -> Path:
    """A tiny Magistral (real Tekken vocabulary) converted to GGUF by edge-magistral's own build."""
    from edge_magistral.build.checkpoint import open_checkpoint
    from edge_magistral.build.convert import convert
    from edge_magistral.build.tiny import make_tiny_checkpoint

    checkpoint = open_checkpoint(make_tiny_checkpoint(workdir / "tiny"))
    return convert(checkpoint, workdir / "tiny-BF16.gguf", "BF16")


def divergence(text: str, ref: list[int], got: list[int], piece: Callable[[int], bytes]) -> dict[str, Any]:
    """Where two tokenizations of ``text`` part, with a few tokens of each from there."""
    at = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    show = lambda ids: [piece(t).decode("utf-8", "backslashreplace") for t in ids[at:at + 4]]  # noqa: E731
    return {"text": text[:80], "token_index": at, "reference": show(ref), "llama_cpp": show(got)}


def measure(texts: list[str], ref: Encode, ours: Encode, llama: Encode, detok: Callable[[list[int]], bytes],
            piece: Callable[[int], bytes]) -> CategoryResult:
    ours_differ = llama_differ = n_ref = n_ours = n_llama = 0
    spells, round_trips, first = True, True, None
    for text in texts:
        r, o, ll = ref(text), ours(text), llama(text)
        ours_differ += o != r
        if ll != r:
            llama_differ += 1
            first = first or divergence(text, r, ll, piece)
        spells &= b"".join(map(piece, ll)) == text.encode("utf-8")
        round_trips &= detok(ll) == text.encode("utf-8")
        n_ref, n_ours, n_llama = n_ref + len(r), n_ours + len(o), n_llama + len(ll)
    return CategoryResult(len(texts), ours_differ, llama_differ, round(llama_differ / len(texts), 4), n_ref,
                          n_ours, n_llama, spells, round_trips, first)


def compare_vocab(llm: Any, ours: TekkenTokenizer) -> dict[str, Any]:
    """Every id's bytes in llama.cpp (read with a large enough buffer) against our rebuilt vocabulary."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(1024)

    def piece(i: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
        return buf.raw[:n] if 0 <= n <= len(buf) else b"<too long>"

    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return {
        "tokens": n,
        "ids_with_different_bytes": sum(piece(i) != ours.token_bytes(i) for i in range(n)),
        # llama-cpp-python's Llama.detokenize reads each piece into a 32-byte buffer: longer tokens vanish.
        "tokens_longer_than_32_bytes": sum(len(ours.token_bytes(i)) > 32 for i in range(n)),
    }


def print_table(results: dict[str, CategoryResult]) -> None:
    print(f"{'category':<12}{'texts':>6}{'ours≠ref':>10}{'llama≠ref':>11}{'diverge':>9}"
          f"{'tok ref':>9}{'tok llama':>11}{'Δ tok':>8}  detokenize round-trip")
    for name, r in results.items():
        delta = (r.tokens_llama_cpp - r.tokens_reference) / max(r.tokens_reference, 1)
        print(f"{name:<12}{r.texts:>6}{r.ours_differ:>10}{r.llama_cpp_differ:>11}"
              f"{r.llama_cpp_divergence:>9.0%}"
              f"{r.tokens_reference:>9}{r.tokens_llama_cpp:>11}{delta:>+8.1%}  "
              f"{'yes' if r.llama_cpp_python_detokenize_round_trips else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="a Magistral GGUF (default: build a tiny one)")
    ap.add_argument("--tekken", type=Path, help="reference tekken.json (default: Magistral 1.1's)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "tests" / "data" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "tokenizer_parity.json")
    args = ap.parse_args()

    import llama_cpp
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.gguf or tiny_gguf(work)
        tekken_json = args.tekken
        if tekken_json is None:
            tekken_json = work / "tekken.json"
            write_magistral_tekken(tekken_json)
        reference = MistralTokenizer.from_file(str(tekken_json)).instruct_tokenizer.tokenizer
        ours = TekkenTokenizer.from_gguf(model)
        llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
        results = {
            name: measure(texts,
                          ref=lambda t: reference.encode(t, bos=False, eos=False),
                          ours=ours.encode,
                          llama=lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False),
                          detok=llm.detokenize, piece=ours.token_bytes)
            for name, texts in load_corpus(args.corpus).items()
        }
        vocab = compare_vocab(llm, ours)
    print_table(results)
    total = {k: sum(getattr(r, k) for r in results.values())
             for k in ("texts", "ours_differ", "llama_cpp_differ", "tokens_reference", "tokens_ours",
                       "tokens_llama_cpp")}
    report = {
        "model": str(args.gguf or "tiny Magistral GGUF (built by edge-magistral, real Tekken vocabulary)"),
        "llama_cpp_python": llama_cpp.__version__,
        "reference": "mistral-common Tekkenizer.encode(text, bos=False, eos=False)",
        "llama_cpp_call": "Llama(vocab_only=True).tokenize(text.encode(), add_bos=False, special=False)",
        "total": total,
        "vocabulary": vocab,
        "categories": {name: asdict(r) for name, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\ntotal: ours differ on {total['ours_differ']}/{total['texts']} texts, llama.cpp on "
          f"{total['llama_cpp_differ']}/{total['texts']}; vocabulary {vocab}; written to {args.out}")


if __name__ == "__main__":
    main()
