"""Generates the gRPC stubs from protos/ at build time (they are never committed or hand-edited)."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
OUT = ROOT / "server"


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    (OUT / "sam2serve" / "v1" / "__init__.py").write_text('"""Generated from protos/sam2serve/v1 at build time."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        # Package discovery ran before the stubs existed; a clean wheel build must still ship them.
        if self.packages is not None and "sam2serve.v1" not in self.packages:
            self.packages.append("sam2serve.v1")
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
