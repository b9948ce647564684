"""Generate loader/csi's Python modules from loader/csi/csi.proto (grpcio-tools' protoc, mypy-protobuf's stubs).

The modules are committed so the node agent needs only grpcio and protobuf at run time. Run from the repository
root after editing the proto: ``.venv/bin/python -m tests.support.csi_codegen``. tests/test_csi.py calls
``generate`` into a scratch directory and compares, so a proto edit without regenerating fails there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "loader/csi/csi.proto"
OUTPUTS = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi")
HEADER = ("# Generated from loader/csi/csi.proto by `python -m tests.support.csi_codegen` (grpcio-tools, mypy-protobuf);"
          " do not edit.\n# ruff: noqa\n")


def generate(out: Path) -> dict[str, bytes]:
    """Run protoc on the proto and return {file name: bytes} as they are committed (with the header)."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/wrappers.proto ships with grpcio-tools
    bindir = Path(sys.executable).parent  # protoc-gen-mypy and protoc-gen-mypy_grpc (mypy-protobuf) live here
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}",
           f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}", PROTO]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return {name: HEADER.encode() + (out / "loader/csi" / name).read_bytes() for name in OUTPUTS}


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="csi-codegen-"))
    try:
        for name, data in generate(scratch).items():
            (ROOT / "loader/csi" / name).write_bytes(data)
            print(f"wrote loader/csi/{name}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
