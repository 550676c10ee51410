"""Generate the Python code of the gRPC contracts from ``protos/``.

Run as ``python -m cms.protogen`` (the bootstrap script does) or from
``setup.py`` when a wheel is built. Generation is skipped when every output is
newer than every ``.proto`` file, so calling it on each start is cheap.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(proto_root.glob("cms/v1/*.proto"))


def _outputs(proto: Path, proto_root: Path, out_root: Path) -> list[Path]:
    rel = proto.relative_to(proto_root).with_suffix("")
    base = out_root / rel
    return [
        base.with_name(base.name + "_pb2.py"),
        base.with_name(base.name + "_pb2_grpc.py"),
        base.with_name(base.name + "_pb2.pyi"),
    ]


def is_stale(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> bool:
    protos = proto_files(proto_root)
    newest_input = max((p.stat().st_mtime for p in protos), default=0.0)
    for proto in protos:
        for out in _outputs(proto, proto_root, out_root):
            if not out.exists() or out.stat().st_mtime < newest_input:
                return True
    return False


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT, force: bool = False) -> int:
    """Run grpc_tools.protoc over every contract; returns protoc's exit status."""
    if not force and not is_stale(proto_root, out_root):
        return 0
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    if not files:
        print(f"no .proto files under {proto_root}", file=sys.stderr)
        return 1
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    return protoc.main(args)


def main() -> int:
    force = "--force" in sys.argv[1:]
    status = generate(force=force)
    if status != 0:
        print("protoc failed", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
