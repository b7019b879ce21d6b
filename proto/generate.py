"""Generates the Python stubs for worker.proto (`make proto`); the freshness test calls it too."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "worker.proto"


def generate(out_dir: Path) -> list[Path]:
    """Writes worker_pb2.py, worker_pb2.pyi and worker_pb2_grpc.py into out_dir; returns them."""
    from grpc_tools import protoc  # dev dependency; imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    grpc_file = out_dir / "worker_pb2_grpc.py"
    # protoc emits an absolute import; the stubs live inside the loraxpy.proto package.
    text = re.sub(r"^import worker_pb2 as", "from . import worker_pb2 as", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    return [out_dir / "worker_pb2.py", out_dir / "worker_pb2.pyi", grpc_file]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    for path in generate(parser.parse_args().out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
