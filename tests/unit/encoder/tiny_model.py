"""A tiny randomly initialised BERT folder (real MiniLM tokenizer, 2 layers of
width 32): exports in a couple of seconds, so tests can exercise the whole
export path, and it proves that "any BERT-family folder" works."""

from __future__ import annotations

from pathlib import Path

TINY_DIMENSION = 32
TINY_MAX_POSITIONS = 64


def make_tiny_bert(folder: Path) -> Path:
    from services.encoder.hf_model import default_model_dir, offline

    offline()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TINY_DIMENSION,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_POSITIONS,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_tiny_export(root: Path, *, int8: bool = True, scheme: str = "per-channel") -> Path:
    """A tiny model folder and its export (``root/export``)."""
    from services.encoder.export import export_encoder

    source = make_tiny_bert(root / "hf")
    export_encoder(root / "export", model_dir=source, int8=int8, int8_scheme=scheme)
    return root / "export"
