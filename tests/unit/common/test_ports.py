"""One set of default ports (services/common/ports.py), and nothing that names
another one for a service: settings defaults, `coldstart up`, README, docs, the
k8s manifests and settings, the Dockerfiles. Files are read as text / YAML /
TOML; nothing runs."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.paths import REPO_ROOT
from services.common.ports import DEFAULT_PORTS, ECHO_PORT, ServicePorts
from services.echo.main import EchoSettings
from services.encoder.settings import EncoderSettings
from services.fusion.settings import FusionSettings
from services.gateway.settings import GatewaySettings
from services.trainer.settings import TrainerSettings
from services.up import Ports

SETTINGS: dict[str, type[Any]] = {
    "gateway": GatewaySettings,
    "encoder": EncoderSettings,
    "fusion": FusionSettings,
    "trainer": TrainerSettings,
}
ALL = {**DEFAULT_PORTS, "echo": ServicePorts(grpc=ECHO_PORT, metrics=0)}
KNOWN = {p for ports in ALL.values() for p in (ports.grpc, ports.metrics) if p}
# Numbers in these ranges are read as ports of ours wherever they appear.
BANDS = (range(50050, 50070), range(9100, 9110))
SERVICE_WORD = re.compile("|".join(ALL), re.IGNORECASE)
# Not part of a longer word or a decimal ("50053." ends a sentence).
NUMBER = re.compile(r"(?<![\w.])(\d{4,5})(?!\w|\.\d)")


def default(settings_type: type[Any], name: str) -> Any:
    (found,) = [f for f in dataclasses.fields(settings_type) if f.name == name]
    return found.default


def in_band(number: int) -> bool:
    return any(number in band for band in BANDS)


def line_problems(text: str, source: str) -> Iterator[str]:
    """A port of ours must be known, and the service named last before it on the
    line (if any) must own it: "trainer (50053)", "coldstart-encoder:50051"."""
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in NUMBER.finditer(line):
            number = int(match.group(1))
            if not in_band(number):
                continue
            where = f"{source}:{lineno}: {line.strip()}"
            if number not in KNOWN:
                yield f"{where}: {number} is no service's port"
                continue
            named = SERVICE_WORD.findall(line[: match.start()])
            if named:
                owner = ALL[named[-1].lower()]
                if number not in (owner.grpc, owner.metrics):
                    yield f"{where}: {number} is not {named[-1].lower()}'s port"


def text_files() -> list[Path]:
    roots = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    k8s = sorted((REPO_ROOT / "k8s").rglob("*"))
    roots += [p for p in k8s if p.suffix in {".yaml", ".toml", ".md"}]
    roots += sorted((REPO_ROOT / "docker").glob("Dockerfile*"))
    return roots


def test_settings_defaults_are_the_shared_ports() -> None:
    for name, settings_type in SETTINGS.items():
        assert default(settings_type, "port") == DEFAULT_PORTS[name].grpc, name
    assert default(EchoSettings, "port") == ECHO_PORT
    assert default(GatewaySettings, "fusion_address").endswith(f":{DEFAULT_PORTS['fusion'].grpc}")
    assert default(GatewaySettings, "encoder_address").endswith(f":{DEFAULT_PORTS['encoder'].grpc}")


def test_coldstart_up_uses_the_shared_ports() -> None:
    ports = Ports()
    for name, expected in DEFAULT_PORTS.items():
        assert getattr(ports, name) == expected.grpc
        assert ports.metrics(name) == expected.metrics


def test_ports_are_distinct() -> None:
    numbers = [p for ports in ALL.values() for p in (ports.grpc, ports.metrics) if p]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_text_names_each_service_by_its_own_port(path: Path) -> None:
    problems = list(line_problems(path.read_text(), str(path.relative_to(REPO_ROOT))))
    assert not problems, "\n".join(problems)


def test_the_line_check_catches_a_wrong_port() -> None:
    assert list(line_problems("the trainer (50054)", "x"))
    assert list(line_problems("the trainer listens on 50052.", "x"))
    assert list(line_problems("coldstart-trainer.coldstart:50052", "x"))
    assert list(line_problems("COLDSTART_ENCODER_PORT=50050", "x"))
    assert not list(line_problems("encoder (50051), fusion (50052), trainer (50053)", "x"))


def test_k8s_settings_use_the_shared_ports() -> None:
    document = tomllib.loads((REPO_ROOT / "k8s" / "base" / "config" / "coldstart.toml").read_text())
    for name, expected in DEFAULT_PORTS.items():
        assert document[name]["port"] == expected.grpc, name
        assert document[name]["metrics_port"] == expected.metrics, name
        for key, value in document[name].items():
            if key.endswith("_address"):
                host, _, port = str(value).rpartition(":")
                target = key.removesuffix("_address")
                assert target in host, (name, key, value)
                assert int(port) == DEFAULT_PORTS[target].grpc, (name, key, value)


def _ports_in(node: Any) -> Iterator[int]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"port", "containerPort", "targetPort", "endPort"} and isinstance(value, int):
                yield value
            else:
                yield from _ports_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _ports_in(item)


def test_k8s_manifests_give_each_service_its_own_ports() -> None:
    checked = 0
    for path in sorted((REPO_ROOT / "k8s").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not isinstance(document, dict) or "kind" not in document:
                continue
            name = str(document.get("metadata", {}).get("name", ""))
            owners = {s for s in DEFAULT_PORTS if s in name}
            for number in _ports_in(document.get("spec", {})):
                if not in_band(number):
                    continue
                assert number in KNOWN, f"{path}: {document['kind']}/{name}: {number}"
                if len(owners) == 1:
                    (owner,) = owners
                    own = DEFAULT_PORTS[owner]
                    assert number in (own.grpc, own.metrics), (
                        f"{path}: {document['kind']}/{name}: {number} is not {owner}'s port"
                    )
                    checked += 1
    assert checked >= 4 * 4  # each service's Deployment and Service name its ports
