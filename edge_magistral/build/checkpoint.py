"""Open a source checkpoint: Mistral-native (``params.json``) or HF-format (``config.json``).

Only headers are read here; tensors stay on disk as :class:`TensorRef` until conversion streams
them. Errors name the missing or broken file and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_magistral.build.safetensors_io import TensorRef, read_header
from edge_magistral.errors import BadInputError, CorruptModelError, ModelNotFoundError


@dataclass(frozen=True)
class ModelParams:
    """Architecture hyper-parameters, in Mistral's own names."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    rope_theta: float
    norm_eps: float
    vocab_size: int
    max_seq_len: int = 131072
    tied_embeddings: bool = False

    def to_params_json(self) -> dict[str, Any]:
        """The dict Mistral's ``params.json`` holds."""
        return {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "rope_theta": self.rope_theta, "norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
            "max_seq_len": self.max_seq_len,
        }


@dataclass
class Checkpoint:
    """A checkpoint directory, its parameters and where each tensor lies."""

    kind: str  # "mistral" or "hf"
    path: Path
    params: ModelParams
    tensors: list[TensorRef]
    files: list[Path] = field(default_factory=list)  # every file that defines the model
    tokenizer_file: Path | None = None
    system_prompt: str | None = None

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path}: expected a JSON object")
    return data


def _need(d: dict[str, Any], key: str, where: Path, *alts: str) -> Any:
    for k in (key, *alts):
        if k in d and d[k] is not None:
            return d[k]
    raise BadInputError(f"{where}: missing field {key!r}; is this a llama/Mistral-architecture checkpoint?")


def _mistral_params(path: Path) -> ModelParams:
    p = _load_json(path)
    dim, n_heads = int(_need(p, "dim", path)), int(_need(p, "n_heads", path))
    return ModelParams(
        dim=dim,
        n_layers=int(_need(p, "n_layers", path)),
        head_dim=int(p.get("head_dim") or dim // n_heads),
        hidden_dim=int(_need(p, "hidden_dim", path)),
        n_heads=n_heads,
        n_kv_heads=int(p.get("n_kv_heads") or n_heads),
        rope_theta=float(p.get("rope_theta", 10000.0)),
        norm_eps=float(_need(p, "norm_eps", path)),
        vocab_size=int(_need(p, "vocab_size", path)),
        max_seq_len=int(p.get("max_seq_len") or p.get("max_position_embeddings") or 131072),
        tied_embeddings=bool(p.get("tied_embeddings", False)),
    )


def _hf_params(path: Path) -> ModelParams:
    c = _load_json(path)
    arch = (c.get("architectures") or ["?"])[0]
    if c.get("model_type") not in ("mistral", "llama") and arch not in ("MistralForCausalLM", "LlamaForCausalLM"):
        raise BadInputError(f"{path}: architecture {arch!r} is not llama/Mistral; edge-magistral builds Magistral "
                            "and its llama-architecture derivatives only")
    dim, n_heads = int(_need(c, "hidden_size", path)), int(_need(c, "num_attention_heads", path))
    return ModelParams(
        dim=dim,
        n_layers=int(_need(c, "num_hidden_layers", path)),
        head_dim=int(c.get("head_dim") or dim // n_heads),
        hidden_dim=int(_need(c, "intermediate_size", path)),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        rope_theta=float(c.get("rope_theta", 10000.0)),
        norm_eps=float(_need(c, "rms_norm_eps", path)),
        vocab_size=int(_need(c, "vocab_size", path)),
        max_seq_len=int(c.get("max_position_embeddings") or 131072),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _safetensors_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{d}: no *.safetensors weights found; download the full checkpoint")
    consolidated = [f for f in files if f.name.startswith("consolidated")]
    return consolidated or files


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Identify a checkpoint directory and read its headers (no tensor data)."""
    d = Path(path)
    if not d.exists():
        raise ModelNotFoundError(f"{d}: no such checkpoint directory; check the path")
    if not d.is_dir():
        raise BadInputError(f"{d}: expected a checkpoint directory or a .gguf file")
    if (d / "params.json").is_file():
        kind, params, cfg = "mistral", _mistral_params(d / "params.json"), d / "params.json"
    elif (d / "config.json").is_file():
        kind, params, cfg = "hf", _hf_params(d / "config.json"), d / "config.json"
    else:
        raise ModelNotFoundError(
            f"{d}: missing params.json (Mistral-native) or config.json (HF format); "
            "download the whole checkpoint repository, not just the weights")
    weights = _safetensors_files(d)
    tensors = [t for f in weights for t in read_header(f)]
    tok = d / "tekken.json"
    if not tok.is_file():
        raise ModelNotFoundError(f"{d}: missing tekken.json; copy it from the base Magistral/Mistral checkpoint")
    sp = d / "SYSTEM_PROMPT.txt"
    return Checkpoint(
        kind=kind, path=d, params=params, tensors=tensors,
        files=[cfg, *weights, tok] + ([sp] if sp.is_file() else []),
        tokenizer_file=tok,
        system_prompt=sp.read_text(encoding="utf-8") if sp.is_file() else None,
    )
