"""The PyTorchJob launcher the trainer runs as its train_command on Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s.tools import pytorchjob_launcher as launcher
from k8s.tools.validate import validate_resource
from services.common.paths import REPO_ROOT

TEMPLATE = REPO_ROOT / "k8s" / "base" / "config" / "retrain-pytorchjob.yaml"


class FakeApi:
    def __init__(self, states: list[str], image: str = "reg/coldstart:7") -> None:
        self.states = states
        self.image = image
        self.calls: list[tuple[str, str, dict[str, Any] | None]] = []

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self.calls.append((method, path, body))
        if path.startswith("/api/v1/") and method == "GET":
            return {"spec": {"containers": [{"name": "trainer", "image": self.image}]}}
        if method == "GET":
            state = self.states.pop(0)
            if state == "Running":
                return {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
            return {
                "status": {
                    "conditions": [
                        {"type": "Running", "status": "False"},
                        {"type": state, "status": "True"},
                    ]
                }
            }
        return {}


def template() -> dict[str, Any]:
    # The file kustomize puts in the ConfigMap as it is (the rendered one is
    # checked in tests/integration/k8s/test_k8s_manifests.py).
    loaded: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    return loaded


def build(workers: int = 3, run_id: str = "Run_2026-01-01T00:00") -> dict[str, Any]:
    return launcher.build_job(
        template(),
        run_id=run_id,
        workers=workers,
        data="/var/lib/coldstart/shared/runs/x/data",
        registry="/var/lib/coldstart/shared/runs/x/registry",
        device="cpu",
        namespace="coldstart",
        image="reg/coldstart:7",
    )


def test_build_job_fills_the_template() -> None:
    job = build()
    assert job["metadata"]["name"] == "coldstart-retrain-run-2026-01-01t00-00"
    assert job["metadata"]["namespace"] == "coldstart"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    for spec in specs.values():
        (main,) = spec["template"]["spec"]["containers"]
        assert main["image"] == "reg/coldstart:7"
        assert "/var/lib/coldstart/shared/runs/x/registry" in main["args"]
        assert "Run_2026-01-01T00:00" in main["args"]
    assert "{" not in yaml.safe_dump(job).replace("{}", "")
    assert not validate_resource(job)
    # Master and Worker were one YAML anchor: filling one must not alias the other.
    specs["Master"]["template"]["spec"]["containers"][0]["image"] = "changed"
    assert specs["Worker"]["template"]["spec"]["containers"][0]["image"] == "reg/coldstart:7"


def test_one_worker_is_a_master_alone_and_names_stay_valid() -> None:
    job = build(workers=1, run_id="x" * 100)
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert len(job["metadata"]["name"]) <= 63
    assert not validate_resource(job)
    with pytest.raises(launcher.LaunchError):
        build(workers=0)


@pytest.mark.parametrize(("states", "code"), [(["Running", "Succeeded"], 0), (["Failed"], 1)])
def test_run_follows_the_job_to_its_end(states: list[str], code: int) -> None:
    api = FakeApi(list(states))
    job = build()
    assert launcher.run(api, job, timeout_s=100, sleep=lambda _s: None, log=lambda _l: None) == code
    method, path, body = api.calls[0]
    assert (method, path) == ("POST", "/apis/kubeflow.org/v1/namespaces/coldstart/pytorchjobs")
    assert body == job
    assert not [c for c in api.calls if c[0] == "DELETE"]


def test_run_deletes_the_job_on_timeout() -> None:
    api = FakeApi(["Running"] * 10)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    code = launcher.run(
        api,
        build(),
        timeout_s=25,
        poll_s=10,
        clock=lambda: now[0],
        sleep=sleep,
        log=lambda _l: None,
    )
    assert code == 1
    assert api.calls[-1][0] == "DELETE"


def test_main_takes_the_image_of_its_own_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template()))
    monkeypatch.setenv("POD_NAME", "coldstart-trainer-abc")
    monkeypatch.delenv("COLDSTART_IMAGE", raising=False)
    api = FakeApi(["Succeeded"], image="reg/coldstart:own")
    argv = [
        "--template", str(path), "--run-id", "r1", "--workers", "2", "--namespace", "coldstart",
        "--data", "/var/lib/coldstart/shared/d", "--registry", "/var/lib/coldstart/shared/r",
        "--poll", "0",
    ]  # fmt: skip
    assert launcher.main(argv, api=api) == 0
    assert api.calls[0][1] == "/api/v1/namespaces/coldstart/pods/coldstart-trainer-abc"
    submitted = api.calls[1][2]
    assert submitted is not None
    image = submitted["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image == "reg/coldstart:own"


def test_main_refuses_paths_the_training_pods_cannot_see(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template()))
    argv = [
        "--template", str(path), "--run-id", "r1", "--workers", "2", "--namespace", "coldstart",
        "--data", "/var/lib/coldstart/trainer/d", "--registry", "/var/lib/coldstart/shared/r",
    ]  # fmt: skip
    assert launcher.main(argv, api=FakeApi([])) == 2
    assert "not on the shared volume" in capsys.readouterr().err
