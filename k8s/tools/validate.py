"""Offline validation of rendered manifests.

Kubernetes' own kinds are checked against the OpenAPI schemas that the
``kubernetes-validate`` package ships (its *strict* variant: unknown fields are
errors, as with ``kubectl apply``'s default server-side field validation);
custom resources against the CRD schemas kept in ``k8s/schemas/`` (see the
README there), converted to JSON Schema the way the API server reads them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
# The oldest Kubernetes we support and the newest the schema package knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
_REF_KEY = "x-coldstart-k8s-ref"


class SchemaNotFound(LookupError):
    """No schema for this apiVersion/kind: an unknown kind is an error, not a pass."""


@dataclass(frozen=True)
class Problem:
    resource: str
    version: str
    path: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.resource} (Kubernetes {self.version}): {self.path or '<root>'}: {self.message}"
        )


def _schema_root(version: str) -> Path:
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or spec.origin is None:
        raise SchemaNotFound("the kubernetes-validate package is not installed")
    root = Path(spec.origin).parent / "kubernetes-json-schema"
    folder = root / f"v{version}.0-local-strict"
    if not folder.is_dir():
        raise SchemaNotFound(f"kubernetes-validate has no schemas for Kubernetes {version}")
    return folder


@functools.cache
def _definitions(version: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((_schema_root(version) / "_definitions.json").read_text())
    return document


@functools.cache
def _registry(version: str) -> Registry[Any]:
    definitions = Resource.from_contents(_definitions(version))
    return Registry().with_resource(_DEFINITIONS_ID, definitions)


def _core_schema_file(api_version: str, kind: str, version: str) -> Path:
    # kubernetes-validate's naming: apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1.
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return _schema_root(version) / f"{kind.lower()}-{api}.json"


@functools.cache
def _crd_documents() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(SCHEMA_DIR.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        api_version = f"{document['group']}/{document['version']}"
        found[(api_version, document["kind"])] = document
    return found


def crd_kinds() -> set[tuple[str, str]]:
    """(apiVersion, kind) of the custom resources with a schema in k8s/schemas/."""
    return set(_crd_documents())


def crd_to_json_schema(schema: Any, *, top: bool = True) -> Any:
    """A CRD ``openAPIV3Schema`` as JSON Schema, read as the API server reads it."""
    if isinstance(schema, list):
        return [crd_to_json_schema(s, top=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if _REF_KEY in schema:
        return {"$ref": f"{_DEFINITIONS_ID}#/$defs/{schema[_REF_KEY]}"}
    converted: dict[str, Any] = {}
    for key, value in schema.items():
        if key in {"properties", "patternProperties"}:
            converted[key] = {k: crd_to_json_schema(v, top=False) for k, v in value.items()}
        elif key in {"anyOf", "allOf", "oneOf"} or (
            key in {"items", "additionalProperties", "not"} and isinstance(value, dict)
        ):
            converted[key] = crd_to_json_schema(value, top=False)
        elif key.startswith("x-kubernetes-") or key in {"description", "default", "nullable"}:
            continue
        else:
            converted[key] = value
    if schema.get("nullable") and "type" in converted:
        converted["type"] = [converted["type"], "null"]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in converted:
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in converted and "additionalProperties" not in converted and not preserve:
        converted["additionalProperties"] = False
    if top:
        properties = converted.setdefault("properties", {})
        properties["metadata"] = {
            "$ref": f"{_DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        }
        converted["required"] = sorted({*converted.get("required", []), "apiVersion", "kind"})
    return converted


def _schema_for(resource: dict[str, Any], version: str) -> dict[str, Any]:
    api_version, kind = resource.get("apiVersion", ""), resource.get("kind", "")
    crd = _crd_documents().get((api_version, kind))
    if crd is not None:
        converted: dict[str, Any] = crd_to_json_schema(crd["openAPIV3Schema"])
        return converted
    path = _core_schema_file(api_version, kind, version)
    if not path.is_file():
        raise SchemaNotFound(f"no schema for {api_version} {kind} (Kubernetes {version})")
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def _name(resource: dict[str, Any]) -> str:
    meta = resource.get("metadata") or {}
    return f"{resource.get('kind', '?')}/{meta.get('name', '?')}"


def validate_resource(
    resource: dict[str, Any], versions: Iterable[str] = KUBERNETES_VERSIONS
) -> list[Problem]:
    """Schema problems of one resource, for each Kubernetes version (empty = valid)."""
    problems: list[Problem] = []
    for version in versions:
        schema = _schema_for(resource, version)
        validator = jsonschema.Draft202012Validator(schema, registry=_registry(version))
        for error in sorted(validator.iter_errors(resource), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in error.absolute_path)
            problems.append(Problem(_name(resource), version, path, error.message[:300]))
    return problems


def validate_all(
    resources: Iterable[dict[str, Any]], versions: Iterable[str] = KUBERNETES_VERSIONS
) -> list[Problem]:
    versions = tuple(versions)
    return [p for r in resources for p in validate_resource(r, versions)]


def _documents(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    for path in paths:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        yield from (d for d in yaml.safe_load_all(text) if d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.tools.validate", description=__doc__)
    parser.add_argument("files", nargs="+", help="YAML files of rendered manifests (- = stdin)")
    args = parser.parse_args(argv)
    try:
        problems = validate_all(_documents(args.files))
    except SchemaNotFound as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
