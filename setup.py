"""Generates the gRPC code from proto/ at build time (also for editable installs); nothing
generated is committed."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "pegaflow_core" / "_proto"


def generate_proto() -> None:
    from grpc_tools import protoc

    import grpc_tools

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


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_proto()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
