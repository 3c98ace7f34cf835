"""Regenerates the Python stubs from the .proto files (run from anywhere).

    python -m protos.generate          # write stubs next to the .proto files
    python -m protos.generate --check  # exit 1 if the committed stubs differ from fresh ones

Stubs are made with grpcio-tools 1.84.x so that they import under grpcio >= 1.84 and
protobuf >= 6.31 (the GPU machine has grpcio 1.84.0). Never edit the generated files by hand.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "pdserve" / "v1"
REQUIRED_TOOLS = "1.84."


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    import importlib.metadata

    from grpc_tools import protoc

    version = importlib.metadata.version("grpcio-tools")
    if not version.startswith(REQUIRED_TOOLS):
        raise SystemExit(f"grpcio-tools {REQUIRED_TOOLS}x is required to generate stubs, found {version} "
                         f"(pip install 'grpcio-tools=={REQUIRED_TOOLS}*')")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rel = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *rel]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "protos" / "pdserve" / "v1").glob("*_pb2*.py*"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        stale = []
        for path in fresh:
            target = PROTO_DIR / path.name
            if args.check:
                if not target.exists() or target.read_bytes() != path.read_bytes():
                    stale.append(path.name)
            else:
                shutil.copyfile(path, target)
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run python -m protos.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
