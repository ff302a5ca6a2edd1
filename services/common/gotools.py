"""The Go-built tools the project uses (grpcurl, ghz, kustomize), found on the
PATH or built once from the Go module proxy into ``.cache/bin``.

One place pins their versions, so `coldstart up`, the tests and the benchmarks
run the same binaries. Without Go (and without the tool on the PATH) callers get
``None`` and say so: the tools are conveniences and test subjects, never needed
to serve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from services.common.paths import cache_dir

# name -> module@version for `go install`. ghz: the module proxy's version list
# (and so `@latest`) stops at v0.93.0, yet the v0.120.0 tag resolves and builds.
GO_TOOLS: dict[str, str] = {
    "grpcurl": "github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3",
    "ghz": "github.com/bojand/ghz/cmd/ghz@v0.120.0",
    "kustomize": "sigs.k8s.io/kustomize/kustomize/v5@v5.6.0",
}


class GoToolError(RuntimeError):
    """A tool could not be built: the message says why (Go missing, build failed)."""


def tools_dir() -> Path:
    return cache_dir() / "bin"


def go_tool(name: str, *, use_path: bool = True) -> Path:
    """The tool's binary, building it once when it is neither cached nor on the PATH.

    ``use_path=False`` ignores a binary on the PATH (a test that needs the
    pinned version). Raises GoToolError when it cannot be had.
    """
    if name not in GO_TOOLS:
        raise GoToolError(f"{name}: not a known Go tool (known: {', '.join(sorted(GO_TOOLS))})")
    local = tools_dir() / name
    if local.exists():
        return local
    if use_path:
        found = shutil.which(name)
        if found:
            return Path(found)
    if shutil.which("go") is None:
        raise GoToolError(f"{name}: not on the PATH and Go is not installed to build it")
    local.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(local.parent), "GOFLAGS": "-mod=mod"}
    result = subprocess.run(
        ["go", "install", GO_TOOLS[name]],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not local.exists():
        tail = " ".join(result.stderr.strip().splitlines()[-3:])
        raise GoToolError(f"{name}: go install {GO_TOOLS[name]} failed: {tail}")
    return local


def find_go_tool(name: str) -> Path | None:
    """``go_tool`` for callers that carry on without the tool."""
    try:
        return go_tool(name)
    except GoToolError:
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m services.common.gotools NAME``: print the tool's path, building it
    once, e.g. ``$(python -m services.common.gotools kustomize) build k8s/overlays/cpu``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m services.common.gotools")
    parser.add_argument("name", choices=sorted(GO_TOOLS))
    args = parser.parse_args(argv)
    try:
        print(go_tool(args.name))
    except GoToolError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
