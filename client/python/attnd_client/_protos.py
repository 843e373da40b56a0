"""Generated stubs of proto/, made on first import and kept out of git.

The stubs are generated from the repository's .proto files with grpcio-tools into
attnd_client/attnd/ (git-ignored) and regenerated whenever a .proto file or the grpcio-tools
version changes, so they can never drift from the contract. `python3 client/python/gen_protos.py`
generates them ahead of time (e.g. in a container build).

Set ATTND_PROTO_DIR to the folder holding attnd/v1/attention.proto when the package is used
outside the repository.
"""

import fcntl
import hashlib
import importlib
import os
import pathlib
import shutil
import tempfile

_PKG_DIR = pathlib.Path(__file__).resolve().parent
_GEN_DIR = _PKG_DIR / "attnd"
_DEFAULT_PROTO_DIR = _PKG_DIR.parents[2] / "proto"

# proto file (relative to the proto root) -> (subpackage under attnd_client/attnd, the absolute
# import protoc writes in the *_grpc module, which we make relative so the stubs live inside
# this package and never shadow the real `grpc` package).
_SOURCES = {
    "attnd/v1/attention.proto": ("v1", "from attnd.v1 import"),
    "grpc/health/v1/health.proto": ("health_v1", "from grpc.health.v1 import"),
}


def _proto_dir():
    return pathlib.Path(os.environ.get("ATTND_PROTO_DIR", _DEFAULT_PROTO_DIR))


def _stamp(proto_dir):
    import grpc_tools

    digest = hashlib.sha256()
    digest.update(getattr(grpc_tools, "__version__", "").encode())
    try:
        from importlib.metadata import version

        digest.update(version("grpcio-tools").encode())
    except Exception:  # metadata is optional; the proto contents are what matter most
        pass
    for rel in sorted(_SOURCES):
        digest.update(rel.encode())
        digest.update((proto_dir / rel).read_bytes())
    return digest.hexdigest()


def generate(proto_dir=None, force=False):
    """Generates the stubs into attnd_client/attnd/ unless they are up to date."""
    proto_dir = pathlib.Path(proto_dir) if proto_dir else _proto_dir()
    have_protos = all((proto_dir / rel).is_file() for rel in _SOURCES)
    stamp_file = _GEN_DIR / "STAMP"
    if not have_protos:
        if stamp_file.is_file():
            return  # installed without the sources: use what was generated before
        raise FileNotFoundError(
            f"attnd .proto files not found under {proto_dir}; set ATTND_PROTO_DIR")

    _GEN_DIR.mkdir(exist_ok=True)
    # Several processes may import at once (e.g. pytest -n); one generates, the rest wait.
    with open(_GEN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _stamp(proto_dir)
        if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
            return
        from grpc_tools import protoc
        import importlib.resources

        include = str(importlib.resources.files("grpc_tools") / "_proto")
        with tempfile.TemporaryDirectory() as tmp:
            for rel in _SOURCES:
                args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
                        f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(proto_dir / rel)]
                if protoc.main(args) != 0:
                    raise RuntimeError(f"protoc failed on {proto_dir / rel}")
            (_GEN_DIR / "__init__.py").write_text("")
            for rel, (subpackage, absolute_import) in _SOURCES.items():
                src_dir = pathlib.Path(tmp) / pathlib.Path(rel).parent
                dst_dir = _GEN_DIR / subpackage
                dst_dir.mkdir(exist_ok=True)
                (dst_dir / "__init__.py").write_text("")
                for src in src_dir.glob("*.py"):
                    text = src.read_text().replace(absolute_import, "from . import")
                    staged = dst_dir / (src.name + ".tmp")
                    staged.write_text(text)
                    os.replace(staged, dst_dir / src.name)
        stamp_file.write_text(stamp)


def load():
    """Returns (attention_pb2, attention_pb2_grpc, health_pb2, health_pb2_grpc)."""
    generate()
    names = ("v1.attention_pb2", "v1.attention_pb2_grpc", "health_v1.health_pb2",
             "health_v1.health_pb2_grpc")
    return tuple(importlib.import_module(f"attnd_client.attnd.{name}") for name in names)


def clean():
    """Removes the generated stubs."""
    shutil.rmtree(_GEN_DIR, ignore_errors=True)
