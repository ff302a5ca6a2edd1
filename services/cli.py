"""The `coldstart` command. Subcommands import their modules lazily so that
`coldstart kafka status` does not load torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

SERVICES = {
    "encoder": "services.encoder.main",
    "fusion": "services.fusion.main",
    "trainer": "services.trainer.main",
    "gateway": "services.gateway.main",
    "echo": "services.echo.main",
}

# Subcommands that hand their remaining arguments to a module's main(argv).
DELEGATED = {
    "eval": ("services.trainer.eval_cli", "evaluate models on cold-start splits"),
    "train": ("services.trainer.model.train_cli", "train the cold-start model (torchrun for N>1)"),
    "demo": ("services.gateway.demo", "drive the running system through the gateway"),
    "up": ("services.up", "start Kafka, train a first model, start the four services"),
    "down": ("services.up", "stop what `coldstart up` started"),
}
EXPORTS = {
    "encoder": "services.encoder.export",
    "model": "services.trainer.model.export",
}
BENCHMARKS = {
    "encoder": "bench.encoder",
    "retrieval": "bench.retrieval",
    "fusion": "bench.fusion",
    "training": "bench.training",
    "ingest": "bench.ingest",
    "gateway": "bench.gateway",
    "snapshot": "bench.snapshot",
    "scale": "bench.scale",
}


def _load(module: str, attribute: str = "main") -> Callable[..., Any]:
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise SystemExit(f"coldstart: {module} is not part of this build yet") from None
        raise
    target: Callable[..., Any] = getattr(loaded, attribute)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="coldstart", description="Cold-start recommendations over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service", add_help=False)
    serve.add_argument("service", choices=sorted(SERVICES))
    kafka = commands.add_parser("kafka", help="the local single-node Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    export = commands.add_parser(
        "export", help="export a model to ONNX into the registry", add_help=False
    )
    export.add_argument("what", choices=sorted(EXPORTS))
    bench = commands.add_parser(
        "bench", help="run benchmarks (results in bench/results/)", add_help=False
    )
    bench.add_argument("name", choices=[*sorted(BENCHMARKS), "all"])
    for name, (_module, summary) in DELEGATED.items():
        commands.add_parser(name, help=summary, add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        from services.common.server import run_service

        return run_service(_load(SERVICES[args.service], "APP"), rest)  # type: ignore[arg-type]
    if args.command == "kafka":
        from services.common.kafka import local_broker as kafka_local

        return kafka_local.cli(args.action, rest)
    if args.command == "export":
        return int(_load(EXPORTS[args.what])(rest))
    if args.command == "bench":
        from bench import runner

        return runner.run(list(BENCHMARKS.items()), args.name, rest)
    module, _summary = DELEGATED[args.command]
    entry = "main_down" if args.command == "down" else "main"
    return int(_load(module, entry)(rest))


if __name__ == "__main__":
    sys.exit(main())
