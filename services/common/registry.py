"""The model registry: a directory of immutable versions and a pointer to the
current one, flipped atomically.

    <root>/versions/<version>/manifest.json (+ model files)
    <root>/CURRENT                          the current version's name
    <root>/.staging/<tmp>/                  versions being written

A version becomes visible only by a rename of its complete folder (manifest
written last, everything fsynced), so a crash while writing leaves at most a
staging folder that ``clean_staging`` removes; it never leaves a partial
version. CURRENT is replaced with ``os.replace``, so readers see the old or
the new name, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MANIFEST = "manifest.json"


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    manifest: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(folder)


def write_atomic(path: Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Fill ``path`` through ``write(handle)`` so that readers see the old or the new
    file, never half of one: a temporary file, fsync, one rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    write_atomic(
        path, lambda handle: json.dump(document, handle, indent=2, sort_keys=True, default=str)
    )


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.current_file = self.root / "CURRENT"

    # -- reading ---------------------------------------------------------
    def current(self) -> str | None:
        try:
            name = self.current_file.read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def path(self, version: str) -> Path:
        return self.versions_dir / version

    def manifest(self, version: str) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads((self.path(version) / MANIFEST).read_text())
        except FileNotFoundError:
            raise RegistryError(f"version {version!r} not found in {self.root}") from None
        return document

    def current_info(self) -> VersionInfo | None:
        version = self.current()
        if version is None:
            return None
        return VersionInfo(version, self.path(version), self.manifest(version))

    def versions(self) -> list[str]:
        """Complete versions, oldest first (names sort by creation time)."""
        if not self.versions_dir.exists():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if (p / MANIFEST).is_file())

    # -- writing ---------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, manifest: dict[str, Any], *, tag: str = "") -> Iterator[Path]:
        """Yield an empty folder to fill; on a clean exit it becomes a version.

        The version name and creation time are added to ``manifest`` (also
        readable after the block as ``manifest["version"]``).
        """
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        folder = self.staging_dir / uuid.uuid4().hex
        folder.mkdir()
        try:
            yield folder
            # Names sort by creation time (microseconds), which rollback relies on.
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}"
            suffix = f"-{tag}" if tag else ""
            version = f"v{stamp}-{uuid.uuid4().hex[:6]}{suffix}"
            manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            manifest["version"] = version
            manifest.setdefault("parent_version", self.current())
            write_json_atomic(folder / MANIFEST, manifest)
            _fsync_tree(folder)
            os.rename(folder, self.versions_dir / version)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def set_current(self, version: str) -> None:
        if not (self.path(version) / MANIFEST).is_file():
            raise RegistryError(f"version {version!r} not found in {self.root}")
        tmp = self.root / f".CURRENT.{uuid.uuid4().hex}.tmp"
        with tmp.open("w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.current_file)
        _fsync_dir(self.root)

    def rollback(self, version: str | None = None) -> tuple[str, str | None]:
        """Make ``version`` (default: the one before the current) current.

        Returns (new current, previous current).
        """
        previous = self.current()
        if version is None:
            kept = self.versions()
            if previous is None or previous not in kept or kept.index(previous) == 0:
                raise RegistryError("no earlier version to roll back to")
            version = kept[kept.index(previous) - 1]
        self.set_current(version)
        return version, previous

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; the current one always stays."""
        current = self.current()
        kept = self.versions()
        doomed = [v for v in kept[: max(0, len(kept) - keep)] if v != current]
        for version in doomed:
            # Move it out of versions/ in one rename first: a crash halfway
            # through the delete must not leave a listed but incomplete version.
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            trash = self.staging_dir / f"pruned-{version}-{uuid.uuid4().hex[:6]}"
            os.rename(self.path(version), trash)
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            _fsync_dir(self.versions_dir)
        return doomed

    def clean_staging(self) -> int:
        """Remove leftovers of writers that died mid-write."""
        if not self.staging_dir.exists():
            return 0
        leftovers = list(self.staging_dir.iterdir())
        for item in leftovers:
            shutil.rmtree(item, ignore_errors=True)
        return len(leftovers)
