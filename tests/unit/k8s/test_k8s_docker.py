"""Static checks of the Dockerfiles (no Docker engine here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from services.common.paths import REPO_ROOT

DOCKERFILES = ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match.group(1), match.group(2) or ""))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_is_multi_stage_non_root_and_generates_protos(path: str) -> None:
    args, stages = parse((REPO_ROOT / path).read_text())
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert runtime.name == "runtime"
    runs = " ".join(rest for keyword, rest in build.instructions if keyword == "RUN")
    assert "python -m services.common.protogen" in runs
    assert "pip install --no-deps ." in runs
    copies = [rest for keyword, rest in runtime.instructions if keyword == "COPY"]
    assert any(c.startswith(f"--from={build.name} /opt/venv") for c in copies)
    users = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "a numeric non-root uid (runAsNonRoot checks it)"
    entrypoint = [rest for keyword, rest in runtime.instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["coldstart"]']
    # Models and state are mounted, never copied in.
    for stage in stages:
        for keyword, rest in stage.instructions:
            if keyword in {"COPY", "ADD"}:
                sources = [s for s in rest.split() if not s.startswith("--")][:-1]
                for source in sources:
                    assert not re.match(
                        r"(\./)?(\.run|\.cache|registry|gen|models?)(/|$)", source
                    ), rest
                    assert not source.endswith((".onnx", ".faiss", ".pt", ".safetensors")), rest
    if path.endswith("gpu"):
        assert "cuda" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
        assert "cudnn" in args["CUDA_IMAGE"]
        assert all(s.base == "${CUDA_IMAGE}" for s in stages)
        assert "onnxruntime==" not in runs, "the GPU image keeps onnxruntime-gpu"
    else:
        assert "s/^onnxruntime-gpu==/onnxruntime==/" in runs


def test_dockerfiles_install_the_pinned_requirements() -> None:
    pins = (REPO_ROOT / "requirements" / "requirements.txt").read_text()
    assert "\n# test and lint\n" in pins, "the Dockerfiles cut the runtime pins at this line"
    runtime = pins.split("\n# test and lint\n")[0]
    for package in ("torch==", "onnxruntime-gpu==", "grpcio==", "prometheus-client=="):
        assert f"\n{package}" in runtime
    assert "\nmypy-protobuf==" in pins


def test_dockerignore_keeps_state_and_models_out_of_the_context() -> None:
    lines = set((REPO_ROOT / ".dockerignore").read_text().splitlines())
    assert {".git", ".venv", ".cache", ".run", "gen", "registry", "*.onnx"} <= lines


def test_images_used_by_the_overlays_are_the_dockerfiles_tags() -> None:
    for flavour in ("cpu", "gpu"):
        text = (REPO_ROOT / f"k8s/overlays/{flavour}/kustomization.yaml").read_text()
        assert f"newTag: 0.1.0-{flavour}" in text
        assert (
            f"coldstart:0.1.0-{flavour}" in (REPO_ROOT / f"docker/Dockerfile.{flavour}").read_text()
        )
