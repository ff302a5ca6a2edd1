"""A small, offline renderer for the subset of kustomize that k8s/ uses.

``kubectl kustomize`` renders the same trees (tests compare the two when kubectl
is installed); this module exists so that tests and users without kubectl can
render the manifests too. Supported kustomization fields, with kustomize's
meaning:

- ``resources``: YAML files (one or more documents) and directories holding a
  ``kustomization.yaml``, rendered recursively.
- ``namespace``: set on every namespaced resource (and on the namespace of
  ServiceAccount subjects of RoleBindings that name a ServiceAccount of the
  same render, as kustomize does).
- ``images``: ``name`` -> ``newName`` / ``newTag`` / ``digest`` for every
  ``containers`` and ``initContainers`` entry of the known pod-carrying kinds.
- ``configMapGenerator``: ``name``, ``files`` (``key=path`` or ``path``),
  ``literals``, ``behavior`` (create / merge / replace), and the name suffix
  hash (computed exactly as kustomize v5 computes it), with references from pod
  templates (volumes, projected volumes, env, envFrom) rewritten to the suffixed
  name. ``generatorOptions.disableNameSuffixHash`` is honoured.
- ``patches``: strategic-merge patches from ``path`` or inline ``patch``,
  matched by kind and name (or by ``target``), with kustomize's merge keys for
  the lists they touch (containers, volumes, env, ports, volumeMounts...).

Anything else in a kustomization is an error, so the renderer never silently
drops a field that kustomize would apply.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

SUPPORTED_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "images",
        "configMapGenerator",
        "generatorOptions",
        "patches",
    }
)
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
    }
)
# Where each kind keeps its pod spec (kustomize's built-in field specs).
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# Strategic-merge keys of the lists our patches touch (from the Kubernetes API).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
# Kustomize's legacy output order (kinds not listed follow, then these last).
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or is wrong."""


def _order_key(resource: Resource) -> tuple[int, str, str, str]:
    kind = resource.get("kind", "")
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = resource.get("metadata", {})
    return (rank, kind, meta.get("namespace", ""), meta.get("name", ""))


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = directory / name
        if path.is_file():
            document = yaml.safe_load(path.read_text()) or {}
            if not isinstance(document, dict):
                raise KustomizeError(f"{path}: not a mapping")
            unknown = set(document) - SUPPORTED_FIELDS
            if unknown:
                raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
            return document
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _read_documents(path: Path) -> Iterator[Resource]:
    for document in yaml.safe_load_all(path.read_text()):
        if document is None:
            continue
        if not isinstance(document, dict) or "kind" not in document:
            raise KustomizeError(f"{path}: every document must be a resource with a kind")
        # A JSON round trip unshares what YAML anchors share (labels: *labels).
        yield json.loads(json.dumps(document))


def _identity(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource.get("metadata", {}).get("name", "")


def _build(directory: Path) -> list[Resource]:
    kustomization = _load_kustomization(directory)
    resources: list[Resource] = []

    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(_build(target))
        elif target.is_file():
            resources.extend(_read_documents(target))
        else:
            raise KustomizeError(f"{directory}: resource not found: {entry}")
        _check_unique(resources, directory)

    options = kustomization.get("generatorOptions", {}) or {}
    for generator in kustomization.get("configMapGenerator", []) or []:
        _apply_generator(resources, generator, directory, options)

    for patch in kustomization.get("patches", []) or []:
        _apply_patch(resources, patch, directory)

    namespace = kustomization.get("namespace")
    if namespace:
        _set_namespace(resources, namespace)

    for image in kustomization.get("images", []) or []:
        _apply_image(resources, image)
    return resources


# Generators mark what they made; names get their hash suffix once, at the top
# of the build (after overlays merged into them), as kustomize does.
_HASH_ANNOTATION = "internal.coldstart/needs-hash"
_GENERATED_ANNOTATION = "internal.coldstart/generated"


def _check_unique(resources: list[Resource], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        kind, name = _identity(resource)
        key = (kind, resource.get("metadata", {}).get("namespace", ""), name)
        if key in seen:
            raise KustomizeError(f"{directory}: duplicate resource {kind}/{name}")
        seen.add(key)


def _generator_data(generator: dict[str, Any], directory: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for item in generator.get("files", []) or []:
        key, sep, path = str(item).partition("=")
        if not sep:
            path, key = key, Path(key).name
        file = (directory / path).resolve()
        if not file.is_file():
            raise KustomizeError(f"{directory}: configMapGenerator file not found: {path}")
        if key in data:
            raise KustomizeError(f"{directory}: configMapGenerator key {key!r} twice")
        data[key] = file.read_text()
    for item in generator.get("literals", []) or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise KustomizeError(f"{directory}: literal {item!r} is not key=value")
        data[key] = value
    return data


def _apply_generator(
    resources: list[Resource],
    generator: dict[str, Any],
    directory: Path,
    options: dict[str, Any],
) -> None:
    unknown = set(generator) - {"name", "files", "literals", "behavior", "options"}
    if unknown:
        raise KustomizeError(f"{directory}: unsupported configMapGenerator fields {unknown}")
    name = generator["name"]
    behavior = generator.get("behavior", "create")
    data = _generator_data(generator, directory)
    merged_options = {**options, **(generator.get("options") or {})}
    existing = [r for r in resources if _identity(r) == ("ConfigMap", name)]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{directory}: ConfigMap {name} exists; use behavior merge")
        config_map: Resource = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": data,
        }
        labels = merged_options.get("labels")
        if labels:
            config_map["metadata"]["labels"] = dict(labels)
        config_map["metadata"]["annotations"] = {
            _GENERATED_ANNOTATION: "true",
            _HASH_ANNOTATION: "false" if merged_options.get("disableNameSuffixHash") else "true",
        }
        resources.append(config_map)
        return
    if behavior not in {"merge", "replace"}:
        raise KustomizeError(f"{directory}: unknown configMapGenerator behavior {behavior!r}")
    if not existing:
        raise KustomizeError(f"{directory}: ConfigMap {name} to {behavior} is not in resources")
    target = existing[0]
    if behavior == "replace":
        target["data"] = data
    else:
        target.setdefault("data", {}).update(data)


def _target_matches(resource: Resource, target: dict[str, Any]) -> bool:
    kind, name = _identity(resource)
    if "kind" in target and target["kind"] != kind:
        return False
    if "name" in target and target["name"] != name:
        return False
    labels = resource.get("metadata", {}).get("labels", {})
    selector = target.get("labelSelector")
    if selector:
        for term in str(selector).split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _apply_patch(resources: list[Resource], patch: dict[str, Any], directory: Path) -> None:
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{directory}: unsupported patch fields {unknown}")
    if "path" in patch:
        text = (directory / patch["path"]).read_text()
    elif "patch" in patch:
        text = str(patch["patch"])
    else:
        raise KustomizeError(f"{directory}: a patch needs path or patch")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise KustomizeError(f"{directory}: patch {patch.get('path', '')} is not a mapping")
    if isinstance(documents[0], dict) and documents[0].get("op"):
        raise KustomizeError(f"{directory}: JSON 6902 patches are not supported")
    for document in documents:
        target = patch.get("target") or {
            "kind": document.get("kind"),
            "name": document.get("metadata", {}).get("name"),
        }
        matched = [r for r in resources if _target_matches(r, target)]
        if not matched:
            raise KustomizeError(f"{directory}: patch target {target} matches no resource")
        for resource in matched:
            body = copy.deepcopy(document)
            if "target" in patch:
                # A targeted patch does not rename what it patches.
                body.setdefault("metadata", {})["name"] = resource["metadata"]["name"]
            merged = strategic_merge(resource, body)
            resource.clear()
            resource.update(merged)


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into ``original`` the way a strategic-merge patch does.

    Maps merge recursively; ``null`` deletes a key; lists with a known merge key
    merge element by element (``$patch: delete`` removes one); other lists are
    replaced, as in the Kubernetes API.
    """
    if isinstance(original, dict) and isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        result = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = strategic_merge(result[key], value, key)
            else:
                result[key] = _strip_directives(copy.deepcopy(value))
        return result
    if isinstance(original, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        result_list = copy.deepcopy(original)
        # kustomize (kyaml) puts the entries that only the patch has first.
        added: list[Any] = []
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"{field}: patch entries need the merge key {key!r}")
            index = next(
                (
                    i
                    for i, o in enumerate(result_list)
                    if isinstance(o, dict) and o.get(key) == item[key]
                ),
                None,
            )
            if item.get("$patch") == "delete":
                if index is not None:
                    del result_list[index]
            elif index is None:
                added.append(_strip_directives(copy.deepcopy(item)))
            else:
                result_list[index] = strategic_merge(result_list[index], item, field)
        return added + result_list
    return _strip_directives(copy.deepcopy(patch))


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if k != "$patch"}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    old_namespaces: dict[str, str] = {}
    for resource in resources:
        if resource["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        meta = resource.setdefault("metadata", {})
        if resource["kind"] == "ServiceAccount":
            old_namespaces[meta["name"]] = meta.get("namespace", "")
        meta["namespace"] = namespace
    for resource in resources:
        if resource["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        for subject in resource.get("subjects", []) or []:
            name = subject.get("name")
            if (
                subject.get("kind") == "ServiceAccount"
                and name in old_namespaces
                and subject.get("namespace", "") in {old_namespaces[name], "", "default"}
            ):
                subject["namespace"] = namespace


def pod_specs(resource: Resource) -> Iterator[dict[str, Any]]:
    """The pod specs a resource of a known kind carries (none for other kinds)."""
    path = POD_SPEC_PATHS.get(resource.get("kind", ""))
    if path is None:
        return
    node: Any = resource
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        yield node


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for field in ("initContainers", "containers"):
        yield from spec.get(field, []) or []


def _apply_image(resources: list[Resource], image: dict[str, Any]) -> None:
    name = image["name"]
    for resource in resources:
        for spec in pod_specs(resource):
            for container in _containers(spec):
                current = str(container.get("image", ""))
                base, tag, digest = _split_image(current)
                if base != name:
                    continue
                new_base = image.get("newName", base)
                if "digest" in image:
                    container["image"] = f"{new_base}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{new_base}:{image['newTag']}"
                else:
                    suffix = f"@{digest}" if digest else (f":{tag}" if tag else "")
                    container["image"] = f"{new_base}{suffix}"


def _split_image(image: str) -> tuple[str, str, str]:
    base, _, digest = image.partition("@")
    slash = base.rfind("/")
    colon = base.rfind(":")
    if colon > slash:
        return base[:colon], base[colon + 1 :], digest
    return base, "", digest


def config_map_hash(config_map: Resource) -> str:
    """Kustomize v5's name-suffix hash of a ConfigMap (api/hasher).

    kustomize v5 looks the name up as one key called ``metadata/name``, which
    never exists, so the name takes part as an empty string; kind and data
    (and binaryData when present) are hashed as Go's encoding/json writes them.
    """
    document: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": config_map.get("data")}
    if isinstance(config_map.get("binaryData"), dict):
        document["binaryData"] = config_map["binaryData"]
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    swap = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(swap.get(c, c) for c in digest)


def _finalize(resources: list[Resource]) -> list[Resource]:
    """Suffix generated ConfigMaps and point references at the new names."""
    renamed: dict[tuple[str, str], str] = {}
    for resource in resources:
        meta = resource.get("metadata", {})
        annotations = meta.get("annotations", {})
        if _GENERATED_ANNOTATION not in annotations:
            continue
        needs_hash = annotations.pop(_HASH_ANNOTATION) == "true"
        annotations.pop(_GENERATED_ANNOTATION)
        if not annotations:
            meta.pop("annotations")
        if needs_hash:
            new_name = f"{meta['name']}-{config_map_hash(resource)}"
            renamed[(meta.get("namespace", ""), meta["name"])] = new_name
            meta["name"] = new_name
    for resource in resources:
        namespace = resource.get("metadata", {}).get("namespace", "")
        for spec in pod_specs(resource):
            for ref in _config_map_refs(spec):
                new = renamed.get((namespace, ref["name"]))
                if new:
                    ref["name"] = new
    return resources


def _config_map_refs(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for volume in spec.get("volumes", []) or []:
        if "configMap" in volume:
            yield volume["configMap"]
        for source in (volume.get("projected") or {}).get("sources", []) or []:
            if "configMap" in source:
                yield source["configMap"]
    for container in _containers(spec):
        for env in container.get("env", []) or []:
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                yield ref
        for env_from in container.get("envFrom", []) or []:
            if "configMapRef" in env_from:
                yield env_from["configMapRef"]


def render(directory: str | Path) -> list[Resource]:
    """Render the kustomization in ``directory`` as ``kubectl kustomize`` would."""
    return sorted(_finalize(_build(Path(directory).resolve())), key=_order_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m k8s.tools.kustomize",
        description="Render a kustomization offline (the subset k8s/ uses).",
    )
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        resources = render(args.directory)
    except KustomizeError as exc:
        print(f"kustomize: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(
        yaml.safe_dump_all(resources, sort_keys=True, default_flow_style=False, allow_unicode=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
