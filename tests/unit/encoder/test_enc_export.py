"""The export on a tiny BERT: graph contract, manifest, INT8 schemes, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from services.common.registry import ModelRegistry
from services.encoder import export
from services.encoder.export import INT8_SCHEMES, Int8Scheme, quantize_int8, weight_matmuls
from services.encoder.runtime import FP32_FILE, INT8_FILE, OnnxTextModel, file_sha256
from tests.unit.encoder.tiny_model import TINY_DIMENSION, TINY_MAX_POSITIONS


def test_graph_inputs_outputs_axes_and_opset(tiny_export: Path) -> None:
    model = onnx.load(str(tiny_export / FP32_FILE))
    onnx.checker.check_model(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for tensor in inputs.values():
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = tensor.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]  # both axes dynamic
    (output,) = model.graph.output
    assert output.name == "embeddings"
    dims = output.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == TINY_DIMENSION
    # Pooling and normalisation live inside the graph.
    ops = {n.op_type for n in model.graph.node}
    assert {"ReduceSum", "ReduceL2"} <= ops


def test_manifest_describes_the_export(tiny_export: Path) -> None:
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["dimension"] == TINY_DIMENSION
    assert manifest["max_length"] == TINY_MAX_POSITIONS  # read from the config
    assert manifest["opset"] >= 17
    assert manifest["files"][FP32_FILE] == file_sha256(tiny_export / FP32_FILE)
    assert manifest["files"][INT8_FILE] == file_sha256(tiny_export / INT8_FILE)
    assert len(manifest["content_hash"]) == 64
    assert manifest["checks"]["fp32_min_cosine"] >= 0.9999
    assert manifest["int8"]["scheme"] == "per-channel"
    assert (tiny_export / "tokenizer" / "tokenizer.json").is_file()


def test_onnx_matches_torch_with_dynamic_batch_and_length(tiny_export: Path) -> None:
    from services.encoder.hf_model import TorchTextModel

    source = tiny_export.parent / "hf"
    torch_model = TorchTextModel(source)
    texts = ["a", "two words", "a much longer sentence " * 5, "Toy Story " * 100]
    expected = torch_model.encode(texts)
    model = OnnxTextModel(tiny_export, provider="cpu")
    for batch_size in (1, 3, 8):
        got = model.embed(texts, batch_size)
        cos = (got * expected).sum(axis=1)
        assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("scheme_name", sorted(INT8_SCHEMES))
def test_int8_schemes_quantise_the_nodes_they_name(
    tiny_export: Path, tmp_path: Path, scheme_name: str
) -> None:
    scheme = INT8_SCHEMES[scheme_name]
    target = tmp_path / "q.onnx"
    report = quantize_int8(tiny_export / FP32_FILE, target, scheme)
    all_weights = weight_matmuls(tiny_export / FP32_FILE)
    left = weight_matmuls(target)  # still fp32 MatMuls with weights
    assert sorted(left) == sorted(report["fp32_nodes"])
    assert report["per_tensor_nodes"] + report["per_channel_nodes"] + len(left) == len(all_weights)
    for name in report["fp32_nodes"]:
        assert any(re.search(p, name) for p in scheme.keep_fp32)


def test_a_scheme_that_quantises_nothing_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    scheme = Int8Scheme("none", "", keep_fp32=(".",))
    with pytest.raises(export.ExportError, match="no MatMul"):
        quantize_int8(tiny_export / FP32_FILE, tmp_path / "q.onnx", scheme)


def test_cli_publishes_a_registry_version(tiny_export: Path, tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    code = export.main(
        ["--model-dir", str(tiny_export.parent / "hf"), "--registry-dir", str(registry_dir)]
    )
    assert code == 0
    registry = ModelRegistry(registry_dir)
    version = registry.current()
    assert version is not None
    manifest = registry.manifest(version)
    assert manifest["version"] == version
    assert manifest["int8"] is None
    assert (registry.path(version) / FP32_FILE).is_file()
    assert not (registry.path(version) / INT8_FILE).exists()


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    code = export.main(["--model-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err
