"""Generate Python code (with .pyi stubs) from protos/ into gen/python.

The output package path matches the proto package (``coldstart.v1``), so the
generated imports work as written. ``make`` runs this; ``--check`` compares a
fresh generation with what is on disk and fails when it is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from services.common.paths import REPO_ROOT

PROTO_ROOT = REPO_ROOT / "protos"
GEN_ROOT = REPO_ROOT / "gen" / "python"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpc_tools) with the mypy plugins; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed (see messages above)")
    # Every directory on the way down is a regular package (mypy needs that).
    for package_dir in {p.parent for p in out_dir.rglob("*.py")}:
        current = package_dir
        while current != out_dir:
            marker = current / "__init__.py"
            if not marker.exists():
                marker.write_text("")
            current = current.parent
    (out_dir / "coldstart" / "py.typed").write_text("")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def stale_files(current: Path = GEN_ROOT) -> list[str]:
    """Relative paths that differ between a fresh generation and ``current``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = {p.relative_to(fresh_root) for p in fresh_root.rglob("*") if p.is_file()}
        existing = (
            {
                p.relative_to(current)
                for p in current.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            }
            if current.exists()
            else set()
        )
        differing = [str(p) for p in sorted(fresh ^ existing)]
        differing += [
            str(p)
            for p in sorted(fresh & existing)
            if not filecmp.cmp(fresh_root / p, current / p, shallow=False)
        ]
        return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protogen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/python is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"protogen: generated code is stale: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    if GEN_ROOT.exists():
        shutil.rmtree(GEN_ROOT)
    written = generate(GEN_ROOT)
    print(f"protogen: wrote {len(written)} files to {GEN_ROOT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
