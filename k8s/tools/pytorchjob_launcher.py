"""Run one retraining run as a PyTorchJob and wait for it (the trainer's
``train_command`` on Kubernetes).

The trainer fills its placeholders and runs this in its pod, as it runs
``coldstart train`` on one machine: exit 0 when the job succeeded (the
candidate is then in ``--registry``, and the trainer evaluates, gates and
publishes it), non-zero otherwise. The job is made from a template
(``retrain-pytorchjob.yaml`` in the settings ConfigMap): ``{run_id}``,
``{workers}``, ``{data}``, ``{registry}`` and ``{device}`` are filled in every
string, the job is named after the run, Master + Workers = ``--workers`` ranks,
and every container runs the trainer pod's own image. SIGTERM (the trainer
giving up) deletes the job.

Only the standard library and PyYAML: it talks to the API server with the pod's
service-account token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP_PATH = "/apis/kubeflow.org/v1"
PLACEHOLDERS = ("run_id", "workers", "data", "registry", "device")


class LaunchError(RuntimeError):
    """The job could not be made, submitted or followed. The message is one line."""


class Api(Protocol):
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any: ...


class InClusterApi:
    """The Kubernetes API from inside a pod (service-account token and CA)."""

    def __init__(self, root: Path = SERVICE_ACCOUNT, timeout_s: float = 30.0) -> None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise LaunchError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset)")
        self.base = f"https://{host}:{port}"
        self.token_file = root / "token"
        self.context = ssl.create_default_context(cafile=str(root / "ca.crt"))
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        # Re-read each time: the kubelet rotates projected tokens.
        request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(
                request, context=self.context, timeout=self.timeout_s
            ) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise LaunchError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError) as exc:
            raise LaunchError(f"{method} {path}: {exc}") from None


def job_name(run_id: str) -> str:
    """A valid, unique-per-run object name (DNS label, at most 63 characters)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    return f"coldstart-retrain-{slug}"[:63].rstrip("-")


def _fill(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in values.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value


def build_job(
    template: dict[str, Any],
    *,
    run_id: str,
    workers: int,
    data: str,
    registry: str,
    device: str,
    namespace: str,
    image: str,
) -> dict[str, Any]:
    """The PyTorchJob of one run, from ``template``."""
    if workers < 1:
        raise LaunchError(f"--workers must be >= 1, got {workers}")
    if template.get("kind") != "PyTorchJob":
        raise LaunchError("the template is not a PyTorchJob")
    values = {
        "run_id": run_id,
        "workers": str(workers),
        "data": data,
        "registry": registry,
        "device": device,
    }
    # A JSON round trip unshares what YAML anchors share (template: *pod).
    job: dict[str, Any] = _fill(json.loads(json.dumps(template)), values)
    job["metadata"]["name"] = job_name(run_id)
    job["metadata"]["namespace"] = namespace
    specs = job["spec"]["pytorchReplicaSpecs"]
    if "Master" not in specs:
        raise LaunchError("the template has no Master replica spec")
    specs["Master"]["replicas"] = 1
    if workers > 1:
        if "Worker" not in specs:
            raise LaunchError("--workers > 1 but the template has no Worker replica spec")
        specs["Worker"]["replicas"] = workers - 1
    else:
        specs.pop("Worker", None)
    for spec in specs.values():
        for container in spec["template"]["spec"].get("containers", []):
            container["image"] = image
    leftover = re.findall(r"{(" + "|".join(PLACEHOLDERS) + r")}", json.dumps(job))
    if leftover:
        raise LaunchError(f"placeholders left unfilled: {sorted(set(leftover))}")
    return job


def own_image(api: Api, namespace: str, pod: str, container: str = "trainer") -> str:
    """The image the trainer pod runs (so a run trains with the same build)."""
    document = api.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
    containers = document.get("spec", {}).get("containers", [])
    for item in containers:
        if item.get("name") == container:
            return str(item["image"])
    if containers:
        return str(containers[0]["image"])
    raise LaunchError(f"pod {namespace}/{pod} has no containers")


def job_state(job: dict[str, Any]) -> str:
    """'Succeeded', 'Failed' or 'Running' (anything not final)."""
    for condition in job.get("status", {}).get("conditions", []) or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") in {"Succeeded", "Failed"}:
            return str(condition["type"])
    return "Running"


def run(
    api: Api,
    job: dict[str, Any],
    *,
    timeout_s: float,
    poll_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Submit ``job``, wait for its end; 0 = Succeeded. Deletes it on timeout."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    path = f"{GROUP_PATH}/namespaces/{namespace}/pytorchjobs"
    api.request("POST", path, job)
    log(f"pytorchjob {namespace}/{name}: submitted")
    deadline = clock() + timeout_s
    while True:
        state = job_state(api.request("GET", f"{path}/{name}"))
        if state == "Succeeded":
            log(f"pytorchjob {namespace}/{name}: succeeded")
            return 0
        if state == "Failed":
            log(f"pytorchjob {namespace}/{name}: failed (kubectl describe pytorchjob {name})")
            return 1
        if clock() >= deadline:
            log(f"pytorchjob {namespace}/{name}: no result after {timeout_s:.0f}s, deleting it")
            delete(api, namespace, name)
            return 1
        sleep(poll_s)


def delete(api: Api, namespace: str, name: str) -> None:
    try:
        api.request(
            "DELETE",
            f"{GROUP_PATH}/namespaces/{namespace}/pytorchjobs/{name}",
            {"propagationPolicy": "Background"},
        )
    except LaunchError as exc:
        print(f"pytorchjob {namespace}/{name}: delete failed: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None, api: Api | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.tools.pytorchjob_launcher")
    parser.add_argument("--template", required=True, type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--workers", required=True, type=int)
    parser.add_argument("--data", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", ""))
    parser.add_argument("--image", default=os.environ.get("COLDSTART_IMAGE", ""))
    parser.add_argument(
        "--shared-root",
        default="/var/lib/coldstart/shared",
        help="the volume the training pods mount; --data and --registry must be under it",
    )
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--poll", type=float, default=10.0)
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        for flag, value in (("--data", args.data), ("--registry", args.registry)):
            if not Path(value).is_relative_to(args.shared_root):
                raise LaunchError(
                    f"{flag} {value} is not on the shared volume {args.shared_root}, "
                    "so the training pods cannot see it"
                )
        if not args.namespace:
            namespace_file = SERVICE_ACCOUNT / "namespace"
            if not namespace_file.is_file():
                raise LaunchError("no --namespace and no service-account namespace file")
            args.namespace = namespace_file.read_text().strip()
        api = api or InClusterApi()
        image = args.image or own_image(api, args.namespace, os.environ.get("POD_NAME", ""))
        template = yaml.safe_load(args.template.read_text())
        job = build_job(
            template,
            run_id=args.run_id,
            workers=args.workers,
            data=args.data,
            registry=args.registry,
            device=args.device,
            namespace=args.namespace,
            image=image,
        )

        def on_term(_signum: int, _frame: object) -> None:
            delete(api, job["metadata"]["namespace"], job["metadata"]["name"])
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, on_term)
        return run(api, job, timeout_s=args.timeout, poll_s=args.poll)
    except (LaunchError, OSError, yaml.YAMLError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
