"""`coldstart bench encoder`: texts per second of the encoder.

1. Offline, one process, the same texts for every backend, tokenisation
   included, at batch sizes 1, 8, 32 and 128:
   (a) sentence-transformers ``SentenceTransformer(default_model_dir()).encode``,
   (b) ours, ONNX Runtime fp32, (c) ours, ONNX Runtime INT8.
   Each cell is the best of ``--rounds`` runs, the backends interleaved
   round by round (the machine is shared: interleaving keeps the ratios
   fair when its load changes). Targets on a 2-core CPU at batch 32:
   (b)/(a) >= 1.5, (c)/(a) >= 3.
2. Over gRPC: a real `coldstart serve encoder` process, 1 and 32 concurrent
   clients each sending single-text requests, batching on and off (cache
   off, so every text is computed). Target: batching >= 3x no batching with
   32 clients.
3. Peak RSS of this process and of each server.

Writes bench/results/encoder.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.runner import write_results
from services.common.metrics import free_port
from services.common.paths import REPO_ROOT
from services.encoder.export import DEFAULT_INT8_SCHEME, INT8_SCHEMES, cached_export, cosines
from services.encoder.hf_model import default_model_dir, offline
from services.encoder.runtime import OnnxTextModel
from services.encoder.texts import sample_texts

Encode = Callable[[list[str], int], np.ndarray]


def _peak_rss_mb(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _time(
    encode: Encode, texts: list[str], batch: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, np.ndarray]:
    started = clock()
    vectors = encode(texts, batch)
    return clock() - started, vectors


def offline_rows(
    backends: dict[str, Encode],
    texts: list[str],
    batch_sizes: Sequence[int],
    batch1_texts: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    quality: dict[str, Any] = {}
    for encode in backends.values():  # warm-up: first runs allocate
        encode(texts[:64], 32)
    for batch in batch_sizes:
        subset = texts[: batch1_texts if batch == 1 else len(texts)]
        best = {name: float("inf") for name in backends}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(rounds):
            for name, encode in backends.items():
                seconds, vectors[name] = _time(encode, subset, batch, clock)
                best[name] = min(best[name], seconds)
        base = best.get("sentence-transformers")
        for name in backends:
            rows.append(
                {
                    "part": "offline",
                    "backend": name,
                    "batch": batch,
                    "texts": len(subset),
                    "texts_per_s": round(len(subset) / best[name], 1),
                    "vs_st": round(base / best[name], 2) if base else None,
                }
            )
        if batch == 32 and "sentence-transformers" in vectors:
            reference = vectors["sentence-transformers"]
            for name, got in vectors.items():
                if name != "sentence-transformers":
                    cos = cosines(got, reference)
                    quality[name] = {
                        "mean_cosine_to_st": round(float(cos.mean()), 6),
                        "min_cosine_to_st": round(float(cos.min()), 6),
                    }
    return rows, quality


# -- gRPC -------------------------------------------------------------------------


def start_server(
    folder: Path, log_path: Path, settings: dict[str, Any], timeout_s: float = 120.0
) -> tuple[subprocess.Popen[bytes], str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    args = [sys.executable, "-m", "services.cli", "serve", "encoder"]
    for key, value in {"port": port, "model_path": folder, **settings}.items():
        args += ["--set", f"{key}={value}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}
        )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"encoder exited: {log_path.read_text()[-2000:]}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError(f"encoder not SERVING within {timeout_s}s")


async def _drive(address: str, texts: list[str], clients: int) -> tuple[float, list[float]]:
    """``clients`` closed-loop callers share ``texts``; one text per request."""
    import grpc
    from coldstart.v1 import encoder_pb2, encoder_pb2_grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        await stub.Embed(encoder_pb2.EmbedRequest(texts=["warm"]), timeout=30)
        shares = [texts[i::clients] for i in range(clients)]

        async def client(share: list[str]) -> None:
            for text in share:
                sent = time.perf_counter()
                reply = await stub.Embed(encoder_pb2.EmbedRequest(texts=[text]), timeout=60)
                latencies.append(time.perf_counter() - sent)
                assert len(reply.vectors) == 1

        started = time.perf_counter()
        await asyncio.gather(*(client(s) for s in shares))
        return time.perf_counter() - started, latencies


def grpc_rows(
    folder: Path,
    texts: list[str],
    client_counts: Sequence[int],
    threads: int,
    int8: bool,
    provider: str,
    max_wait_ms: float,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as scratch:
        for batching in (True, False):
            settings = {
                "batching": str(batching).lower(),
                "cache_size": 0,
                "int8": str(int8).lower(),
                "provider": provider,
                "intra_op_threads": threads,
                "max_batch": 32,
                "max_wait_ms": max_wait_ms,
                "log_level": "WARNING",
                **dict(item.split("=", 1) for item in extra),
            }
            log_path = Path(scratch) / f"encoder-{batching}.log"
            process, address = start_server(folder, log_path, settings)
            try:
                for clients in client_counts:
                    count = min(len(texts), 128 if clients == 1 else len(texts))
                    seconds, latencies = asyncio.run(_drive(address, texts[:count], clients))
                    lat = np.array(latencies) * 1000
                    rows.append(
                        {
                            "part": "grpc",
                            "backend": f"server {'int8' if int8 else 'fp32'}",
                            "batching": "on" if batching else "off",
                            "clients": clients,
                            "texts": count,
                            "texts_per_s": round(count / seconds, 1),
                            "p50_ms": round(float(np.percentile(lat, 50)), 2),
                            "p99_ms": round(float(np.percentile(lat, 99)), 2),
                            "server_peak_rss_mb": round(_peak_rss_mb(process.pid), 1),
                        }
                    )
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coldstart bench encoder", description=__doc__)
    parser.add_argument("--texts", type=int, default=1000, help="texts per offline run")
    parser.add_argument("--batch1-texts", type=int, default=200, help="texts at batch size 1")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--rounds", type=int, default=2, help="best of N runs per cell")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (both sides)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--int8-scheme", choices=sorted(INT8_SCHEMES), default=DEFAULT_INT8_SCHEME)
    parser.add_argument("--clients", default="1,32", help="concurrent gRPC clients")
    parser.add_argument("--grpc-texts", type=int, default=640, help="texts per gRPC run")
    parser.add_argument("--grpc-int8", action="store_true", help="serve INT8 in the gRPC part")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--server-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra encoder setting for the gRPC part (repeatable)",
    )
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="offline part on 1 thread timed by the thread's CPU time: ratios that hold on a "
        "busy shared machine (the gRPC part stays wall time)",
    )
    parser.add_argument("--skip-grpc", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    offline()
    offline_threads = 1 if args.cpu_clock else args.threads
    started = time.perf_counter()
    texts, source = sample_texts(args.texts)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    print("exporting (cached under .cache/encoder-export) ...", flush=True)
    folder = cached_export(int8=True, int8_scheme=args.int8_scheme)
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "texts_source": source,
        "threads": args.threads,
        "offline_threads": offline_threads,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "export": str(folder),
        "int8_scheme": args.int8_scheme,
        "server_settings": args.server_set,
    }

    if not args.skip_offline:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(offline_threads)
        ours_fp32 = OnnxTextModel(folder, provider=args.provider, intra_op_threads=offline_threads)
        device = "cuda" if ours_fp32.provider == "CUDAExecutionProvider" else "cpu"
        st = SentenceTransformer(str(default_model_dir()), device=device)
        backends: dict[str, Encode] = {
            "sentence-transformers": lambda t, b: np.asarray(st.encode(t, batch_size=b)),
            "ours fp32": ours_fp32.embed,
        }
        if device == "cpu":
            ours_int8 = OnnxTextModel(
                folder, int8=True, provider="cpu", intra_op_threads=offline_threads
            )
            backends["ours int8"] = ours_int8.embed
        meta["provider"] = ours_fp32.provider
        meta["st_max_seq_length"] = st.max_seq_length
        meta["our_max_length"] = ours_fp32.max_length
        clock = time.thread_time if args.cpu_clock else time.perf_counter
        meta["clock"] = "thread CPU time, 1 thread" if args.cpu_clock else "wall"
        offline_result, quality = offline_rows(
            backends, texts, batch_sizes, args.batch1_texts, args.rounds, clock
        )
        rows += offline_result
        meta["quality_at_batch_32"] = quality
        meta["bench_process_peak_rss_mb"] = round(_peak_rss_mb(), 1)
        print(f"offline part done in {time.perf_counter() - started:.0f}s", flush=True)

    if not args.skip_grpc:
        clients = [int(c) for c in args.clients.split(",") if c]
        grpc_texts = texts[: args.grpc_texts]
        rows += grpc_rows(
            folder,
            grpc_texts,
            clients,
            args.threads,
            args.grpc_int8,
            args.provider,
            args.max_wait_ms,
            args.server_set,
        )

    meta["targets"] = _targets(rows)
    meta["load_average_end"] = os.getloadavg()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    write_results("encoder", rows, meta)
    for name, target in meta["targets"].items():
        print(f"target {name}: {target}")
    return 0


def _targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    def rate(**match: Any) -> float | None:
        for row in rows:
            if all(row.get(k) == v for k, v in match.items()):
                return float(row["texts_per_s"])
        return None

    out: dict[str, str] = {}
    st = rate(part="offline", backend="sentence-transformers", batch=32)
    for name, goal in (("ours fp32", 1.5), ("ours int8", 3.0)):
        ours = rate(part="offline", backend=name, batch=32)
        if st and ours:
            ratio = ours / st
            out[f"{name} / st at batch 32 >= {goal}"] = (
                f"{ratio:.2f} {'met' if ratio >= goal else 'NOT met'}"
            )
    on = next((r for r in rows if r.get("batching") == "on" and r.get("clients") == 32), None)
    off = next((r for r in rows if r.get("batching") == "off" and r.get("clients") == 32), None)
    if on and off:
        ratio = on["texts_per_s"] / off["texts_per_s"]
        out["batching / no batching, 32 clients >= 3"] = (
            f"{ratio:.2f} {'met' if ratio >= 3 else 'NOT met'}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
