"""Generate the Python gRPC stubs for ``protos/gradindex/v1/*.proto`` into ``server/_gen/``.

The stubs are build output: never edited, never committed (``server/_gen/`` is git-ignored). They
are (re)generated with grpcio-tools whenever they are missing or stale, that is when the hash of
the .proto files or the grpcio-tools version differs from the one recorded in ``_gen/STAMP``.
``import server.protos`` is enough to get them; CI runs ``python -m server.protos`` once up front.

Generated modules import each other as ``gradindex.v1.x_pb2``; those imports are rewritten to
``server._gen.gradindex.v1.x_pb2`` so nothing is added to ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "gradindex" / "v1"
GEN_DIR = Path(__file__).resolve().parent / "_gen"
_IMPORT_RE = re.compile(r"^from gradindex\.v1 import", re.MULTILINE)


def _stamp() -> str:
    """Hash of the proto sources and the generator version: the stubs are current iff it matches."""
    import grpc_tools

    h = hashlib.sha256()
    h.update(getattr(grpc_tools, "__version__", "") .encode())
    try:
        from importlib.metadata import version

        h.update(version("grpcio-tools").encode())
        h.update(version("protobuf").encode())
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    for p in sorted(PROTO_DIR.glob("*.proto")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def generate(force: bool = False) -> Path:
    """Run grpc_tools.protoc if the stubs are missing or stale; return the output directory.

    Output is written to a temporary directory and renamed into place, so concurrent importers
    (a test and a server subprocess) never see half-written modules.
    """
    stamp = _stamp()
    stamp_file = GEN_DIR / "STAMP"
    if not force and stamp_file.exists() and stamp_file.read_text() == stamp:
        return GEN_DIR
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {PROTO_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=GEN_DIR.parent))
    try:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        cwd = os.getcwd()
        os.chdir(PROTO_ROOT)
        try:
            rc = protoc.main(args)
        finally:
            os.chdir(cwd)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc} on {protos}")
        for py in tmp.rglob("*.py"):
            py.write_text(_IMPORT_RE.sub("from server._gen.gradindex.v1 import", py.read_text()))
        for d in (tmp, tmp / "gradindex", tmp / "gradindex" / "v1"):
            (d / "__init__.py").touch()
        (tmp / "STAMP").write_text(stamp)
        old = None
        if GEN_DIR.exists():
            old = GEN_DIR.with_name(f"_gen.old.{os.getpid()}")
            os.replace(GEN_DIR, old)
        os.replace(tmp, GEN_DIR)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    importlib.invalidate_caches()
    return GEN_DIR


def load() -> tuple[ModuleType, ModuleType, ModuleType]:
    """Return ``(types_pb2, service_pb2, service_pb2_grpc)``, generating them first if needed."""
    generate()
    types_pb2 = importlib.import_module("server._gen.gradindex.v1.types_pb2")
    service_pb2 = importlib.import_module("server._gen.gradindex.v1.service_pb2")
    service_pb2_grpc = importlib.import_module("server._gen.gradindex.v1.service_pb2_grpc")
    return types_pb2, service_pb2, service_pb2_grpc


types_pb2, service_pb2, service_pb2_grpc = load()

if __name__ == "__main__":
    print(generate(force="--force" in sys.argv))
