"""The encoder as a real process over a socket: answers, bad input and its
status codes, batching, cache, deadlines, metrics, start-up failures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from coldstart.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.paths import REPO_ROOT
from services.common.registry import ModelRegistry
from services.encoder.export import DEFAULT_INT8_SCHEME, cached_export
from services.encoder.runtime import FP32_FILE, OnnxTextModel
from tests.support.processes import ServiceProcess, coldstart_command, running_service
from tests.unit.encoder.tiny_model import make_tiny_export

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TEXTS = 64
MAX_BYTES = 2048


@pytest.fixture(scope="module")
def minilm_export() -> Path:
    return cached_export(int8=True, int8_scheme=DEFAULT_INT8_SCHEME)


@pytest.fixture(scope="module")
def encoder(
    minilm_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    settings = {
        "model_path": minilm_export,
        "max_texts_per_request": MAX_TEXTS,
        "max_text_bytes": MAX_BYTES,
        "max_wait_ms": 5,
        "intra_op_threads": 2,
    }
    with running_service(
        "encoder", tmp_path_factory.mktemp("encoder-logs"), settings=settings, timeout_s=180
    ) as service:
        yield service


@pytest.fixture(scope="module")
def stub(encoder: ServiceProcess) -> Iterator[encoder_pb2_grpc.EncoderServiceStub]:
    with grpc.insecure_channel(encoder.address) as channel:
        yield encoder_pb2_grpc.EncoderServiceStub(channel)


def _metrics(service: ServiceProcess) -> str:
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def _metric(body: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _embed(stub: encoder_pb2_grpc.EncoderServiceStub, texts: list[str], timeout: float = 60):
    return stub.Embed(encoder_pb2.EmbedRequest(texts=texts), timeout=timeout)


def test_embed_returns_the_models_vectors(
    stub: encoder_pb2_grpc.EncoderServiceStub, minilm_export: Path
) -> None:
    texts = ["Toy Story (1995) | Animation, Children's, Comedy", "GoldenEye (1995) | Action"]
    reply = _embed(stub, texts)
    assert reply.dimension == 384
    assert re.fullmatch(r"all-MiniLM-L6-v2@[0-9a-f]{8}", reply.model)
    got = np.array([v.values for v in reply.vectors], dtype=np.float32)
    expected = OnnxTextModel(minilm_export, provider="cpu").embed(texts)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("texts", "words"),
    [
        ([], "texts: must hold at least 1 text"),
        (["a"] * (MAX_TEXTS + 1), f"at most {MAX_TEXTS} texts per request"),
        (["ok", "x" * (MAX_BYTES + 1)], f"texts[1]: is {MAX_BYTES + 1} bytes; the limit is"),
        (["ok", ""], "texts[1]: is empty"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_limit(
    stub: encoder_pb2_grpc.EncoderServiceStub, texts: list[str], words: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _embed(stub, texts)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (raised.value.details() or "")


def test_concurrent_single_text_callers_are_batched_and_repeats_cached(
    encoder: ServiceProcess, stub: encoder_pb2_grpc.EncoderServiceStub
) -> None:
    before = _metrics(encoder)
    texts = [f"concurrent caller number {i}" for i in range(32)]
    results: dict[int, list[float]] = {}
    errors: list[Exception] = []

    def call(i: int) -> None:
        try:
            results[i] = list(_embed(stub, [texts[i]]).vectors[0].values)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    after = _metrics(encoder)
    runs = _metric(after, "coldstart_encoder_batch_requests_count") - _metric(
        before, "coldstart_encoder_batch_requests_count"
    )
    requests = _metric(after, "coldstart_encoder_batch_requests_sum") - _metric(
        before, "coldstart_encoder_batch_requests_sum"
    )
    assert requests == 32
    assert runs < 32  # some requests shared a model run

    hits_before = _metric(after, "coldstart_encoder_cache_hits_total")
    again = _embed(stub, [texts[3], texts[7]])
    np.testing.assert_allclose(again.vectors[0].values, results[3], atol=1e-6)
    assert _metric(_metrics(encoder), "coldstart_encoder_cache_hits_total") == hits_before + 2


def test_request_whose_deadline_expires_while_queued_is_not_computed(
    encoder: ServiceProcess, stub: encoder_pb2_grpc.EncoderServiceStub
) -> None:
    before = _metrics(encoder)
    # A run long enough (64 long texts) to keep the worker busy for a while.
    big = [
        f"request {i} " + "a long sentence about films and their genres " * 20 for i in range(64)
    ]
    worker = threading.Thread(target=lambda: _embed(stub, big, timeout=300))
    worker.start()
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as raised:
        _embed(stub, ["this one is late"], timeout=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    worker.join(300)
    time.sleep(0.2)
    after = _metrics(encoder)
    computed = _metric(after, "coldstart_encoder_texts_total") - _metric(
        before, "coldstart_encoder_texts_total"
    )
    dropped = sum(
        _metric(after, "coldstart_encoder_dropped_requests_total", f'reason="{r}"')
        - _metric(before, "coldstart_encoder_dropped_requests_total", f'reason="{r}"')
        for r in ("deadline", "cancelled")
    )
    assert computed == len(big)  # the late text never reached the model
    assert dropped == 1


def test_metrics_show_model_and_execution_provider(encoder: ServiceProcess) -> None:
    body = _metrics(encoder)
    assert 'coldstart_encoder_execution_provider{provider="CPUExecutionProvider"} 1.0' in body
    assert re.search(r'coldstart_encoder_model_info\{.*provider="CPUExecutionProvider"', body)
    assert 'coldstart_service_ready{service="encoder"} 1.0' in body
    logs = [json.loads(line) for line in encoder.logs().splitlines() if line.startswith("{")]
    loaded = [entry for entry in logs if entry["msg"] == "encoder model loaded"]
    assert loaded and loaded[0]["provider"] == "CPUExecutionProvider"


# -- start-up ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("tiny"), int8=False)


def _serve(*settings: str) -> subprocess.CompletedProcess[str]:
    args = ["serve", "encoder", "--set", "port=0"]
    for item in settings:
        args += ["--set", item]
    return subprocess.run(
        coldstart_command(*args),
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    plain = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return plain[0]


def test_missing_model_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = _serve(f"model_path={tmp_path / 'missing'}")
    assert result.returncode == 2
    assert "folder not found" in _one_line(result)
    result = _serve(f"registry_dir={tmp_path / 'empty-registry'}")
    assert result.returncode == 2
    assert "run `coldstart export encoder`" in _one_line(result)


def test_corrupt_model_exits_with_one_clear_line(tiny_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_export, copy)
    (copy / FP32_FILE).write_bytes(b"not an onnx model")
    result = _serve(f"model_path={copy}")
    assert result.returncode == 2
    assert "content hash differs" in _one_line(result)


def test_serves_the_registry_current_version_and_stops_cleanly(
    tiny_export: Path, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    # The registry writes this manifest (plus the version) last, over the copied one.
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    with registry.stage(manifest) as folder:
        shutil.copytree(tiny_export, folder, dirs_exist_ok=True)
    registry.set_current(str(manifest["version"]))
    settings = {"registry_dir": registry.root, "provider": "auto"}
    with (
        running_service("encoder", tmp_path / "logs", settings=settings, timeout_s=120) as service,
        grpc.insecure_channel(service.address) as channel,
    ):
        reply = encoder_pb2_grpc.EncoderServiceStub(channel).Embed(
            encoder_pb2.EmbedRequest(texts=["hello"]), timeout=30
        )
        assert reply.dimension == 32
        assert reply.model.startswith("hf@")
        assert service.terminate() == 0
