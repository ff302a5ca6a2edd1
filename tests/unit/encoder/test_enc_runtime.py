"""Loading an export: hashes, bad folders, provider choice, length ordering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import StartupError
from services.common.registry import ModelRegistry
from services.encoder.main import resolve_model_folder
from services.encoder.runtime import FP32_FILE, OnnxTextModel, gpu_present
from services.encoder.settings import EncoderSettings


def _copy(export: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(export, target)
    return target


def test_embed_keeps_request_order_whatever_the_lengths(tiny_export: Path) -> None:
    model = OnnxTextModel(tiny_export, provider="cpu", intra_op_threads=1)
    texts = ["a long text with many many words in it " * 3, "b", "medium length text", "c d"]
    together = model.embed(texts, batch_size=2)
    alone = np.concatenate([model.embed([t], 1) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert model.provider == "CPUExecutionProvider"
    assert model.model_id.startswith("hf@")
    assert model.embed([], 4).shape == (0, model.dimension)


def test_runs_respect_the_token_budget_without_changing_vectors(tiny_export: Path) -> None:
    model = OnnxTextModel(tiny_export, provider="cpu", intra_op_threads=1, max_tokens_per_run=0)
    texts = [("word " * n).strip() for n in (1, 3, 5, 9, 14, 20, 30, 40, 50, 60)]
    reference = model.embed(texts, batch_size=16)
    lengths = np.array(model.token_lengths(texts))
    order = np.argsort(lengths, kind="stable")
    model.max_tokens_per_run = 64
    chunks = model._chunks(order, lengths, batch_size=16)
    assert sorted(int(i) for chunk in chunks for i in chunk) == list(range(len(texts)))
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * lengths[chunk].max() <= 64
    assert len(chunks) > 1
    np.testing.assert_allclose(model.embed(texts, batch_size=16), reference, atol=1e-5)


def test_int8_variant_loads_and_is_named(tiny_export: Path) -> None:
    model = OnnxTextModel(tiny_export, int8=True, provider="cpu")
    assert model.variant == "int8"
    assert model.model_id.endswith("-int8")


def test_cuda_requested_without_a_gpu_is_a_clear_start_error(tiny_export: Path) -> None:
    if gpu_present():
        pytest.skip("a GPU is present")
    with pytest.raises(StartupError, match="provider cuda"):
        OnnxTextModel(tiny_export, provider="cuda")


def test_auto_provider_falls_back_to_cpu(tiny_export: Path) -> None:
    if gpu_present():
        pytest.skip("a GPU is present")
    assert OnnxTextModel(tiny_export, provider="auto").provider == "CPUExecutionProvider"


def test_missing_folder_and_files(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="folder not found"):
        OnnxTextModel(tmp_path / "nope")
    with pytest.raises(StartupError, match=r"no manifest\.json"):
        OnnxTextModel(tmp_path)
    copy = _copy(tiny_export, tmp_path)
    (copy / "model.int8.onnx").unlink()
    with pytest.raises(StartupError, match="export with --int8"):
        OnnxTextModel(copy, int8=True)


def test_corrupt_model_file_is_caught_by_its_hash(tiny_export: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_export, tmp_path)
    data = (copy / FP32_FILE).read_bytes()
    (copy / FP32_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StartupError, match="content hash differs"):
        OnnxTextModel(copy)
    with pytest.raises(StartupError, match="cannot load"):
        OnnxTextModel(copy, verify_hashes=False)


def test_bad_manifest(tiny_export: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_export, tmp_path)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(StartupError, match="unreadable"):
        OnnxTextModel(copy)
    (copy / "manifest.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(StartupError, match="bad manifest"):
        OnnxTextModel(copy)


def test_model_folder_from_settings_and_registry(tiny_export: Path, tmp_path: Path) -> None:
    assert resolve_model_folder(EncoderSettings(model_path=str(tiny_export))) == tiny_export
    root = tmp_path / "registry"
    with pytest.raises(StartupError, match="run `coldstart export encoder`"):
        resolve_model_folder(EncoderSettings(registry_dir=str(root)))
    registry = ModelRegistry(root)
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    with registry.stage(manifest) as folder:
        shutil.copytree(tiny_export, folder, dirs_exist_ok=True)
    version = str(manifest["version"])
    registry.set_current(version)
    assert resolve_model_folder(EncoderSettings(registry_dir=str(root))) == registry.path(version)
    assert OnnxTextModel(registry.path(version)).dimension == 32
    with pytest.raises(StartupError, match="not found"):
        resolve_model_folder(EncoderSettings(registry_dir=str(root), version="v0-nope"))
