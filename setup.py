"""Generates the gRPC code from proto/ at build time (also for editable installs); nothing
generated is committed."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "pegaflow_core" / "_proto"


def generate_proto() -> None:
    try:
        from grpc_tools import protoc

        import grpc_tools
    except ImportError:
        # Machines without grpcio-tools (an offline GPU box) can build from a tree that already
        # holds the generated code, e.g. one generated elsewhere and copied in.
        if (OUT / "pegaflow_pb2.py").exists():
            print("warning: grpcio-tools is not installed; using the generated code already in pegaflow_core/_proto")
            return
        raise SystemExit("building pegaflow-core from source needs grpcio-tools (pip install grpcio-tools)") from None

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return
    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated from proto/ at build time; do not edit."""\n')
    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in protos:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    # protoc writes imports relative to the proto root ("from pegaflow.v1 import ..."); flatten
    # them into this package so the generated code never depends on sys.path.
    for generated in OUT.rglob("*_pb2*.py"):
        flat = OUT / generated.name
        text = generated.read_text().replace("from pegaflow.v1 import", "from . import")
        flat.write_text(text)
        if generated != flat:
            generated.unlink()
    for pyi in OUT.rglob("*.pyi"):
        if pyi.parent != OUT:
            pyi.replace(OUT / pyi.name)
    for leftover in sorted(OUT.rglob("*"), reverse=True):
        if leftover.is_dir():
            leftover.rmdir()


def build_native() -> None:
    """Compile the host copy routine (pegaflow_core/native/*.c) into a plain shared library.
    Optional: without a C compiler the daemon falls back to numpy copies (slower, same results)."""
    import os
    import subprocess

    out = ROOT / "pegaflow_core" / "_native"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Built at install time from pegaflow_core/native; do not edit."""\n')
    for source in sorted((ROOT / "pegaflow_core" / "native").glob("*.c")):
        target = out / f"lib{source.stem}.so"
        cmd = [os.environ.get("CC", "cc"), "-O3", "-shared", "-fPIC", "-o", str(target), str(source)]
        try:
            subprocess.run(cmd, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"warning: could not build {source.name} ({exc}); the daemon will use numpy copies")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_proto()
        build_native()
        super().run()


# Generate before setuptools discovers packages, so pegaflow_core._proto and ._native are found
# and shipped in wheels too (build_py alone runs after discovery); build_py refreshes them.
generate_proto()
build_native()
setup(cmdclass={"build_py": BuildPyWithProto})
