"""libattnd_c.so through ctypes: the structs and prototypes of client/capi/attnd_c.h, and where
the library is found.

Nothing here loads the library at import: `library()` does, on first use, so importing
attnd_client works without it. The library is looked for, in order:

1. $ATTND_NATIVE_LIB (a path; when set, nothing else is tried);
2. attnd_client/_lib/libattnd_c.so inside the installed package;
3. the repository's build folders: <repo>/$ATTND_BUILD_DIR/client/capi/ (when the variable is
   set), then <repo>/build/client/capi/. <repo> is the checkout this package sits in, or the
   one `pip install ./client/python` was run from (recorded in _build_info.py at build time).

ctypes.CDLL (unlike PyDLL) releases the GIL for the whole of every foreign call, so a thread
blocked in attnd_stream_receive lets the others run.
"""

import ctypes
import os
import pathlib
import threading

ABI_VERSION = 2  # attnd_abi_version() this binding is written for
LIB_NAME = "libattnd_c.so"
ERR_LEN = 1024  # bytes of each error-message buffer

_PKG_DIR = pathlib.Path(__file__).resolve().parent

# ---- attnd_c.h's types (x86-64 / aarch64 LP64: the sizes client/capi/call.cc asserts) ----

c_u32, c_u64, c_i32, c_size = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_size_t


class Tensor(ctypes.Structure):
    """attnd_tensor: region NULL or "" means "not given"."""
    _fields_ = [("region", ctypes.c_char_p), ("offset", c_u64), ("dtype", c_i32),
                ("ndim", c_i32), ("shape", c_u64 * 4)]


class Item(ctypes.Structure):
    """attnd_item."""
    _fields_ = [("seq_id", c_u64), ("num_new_tokens", c_u32)]


class Call(ctypes.Structure):
    """attnd_call: one data call."""
    _fields_ = [("op", c_i32), ("device", c_u32), ("layer", c_u32),
                ("items", ctypes.POINTER(Item)), ("num_items", c_size),
                ("q", Tensor), ("k_new", Tensor), ("v_new", Tensor), ("out", Tensor),
                ("lse", Tensor), ("deterministic", c_i32),
                ("wait_event", ctypes.c_char_p), ("signal_event", ctypes.c_char_p)]


assert ctypes.sizeof(Tensor) == 56 and ctypes.sizeof(Item) == 16
assert ctypes.sizeof(Call) == 336 and Call.q.offset == 32 and Call.deterministic.offset == 312

_P = ctypes.c_void_p  # opaque attnd_client* / attnd_stream*
_ERR = (ctypes.c_char_p, c_size)
_u64p, _sizep = ctypes.POINTER(c_u64), ctypes.POINTER(c_size)

# name -> (restype, argtypes); every int function returns 0 or a gRPC status code.
_PROTOTYPES = {
    "attnd_abi_version": (ctypes.c_int, ()),
    "attnd_connect": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_double, ctypes.POINTER(_P))
                      + _ERR),
    "attnd_connect_as": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_double, ctypes.c_char_p,
                                        ctypes.c_char_p, ctypes.POINTER(_P)) + _ERR),
    "attnd_client_free": (None, (_P,)),
    "attnd_server_info": (ctypes.c_int, (_P, ctypes.c_char_p, c_size, _sizep) + _ERR),
    "attnd_register_host_region": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_char_p, c_u64,
                                                  c_u64) + _ERR),
    "attnd_register_cuda_region": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_char_p, c_u32,
                                                  c_u64) + _ERR),
    "attnd_unregister_region": (ctypes.c_int, (_P, ctypes.c_char_p) + _ERR),
    "attnd_register_cuda_event": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_char_p, c_u32)
                                  + _ERR),
    "attnd_unregister_cuda_event": (ctypes.c_int, (_P, ctypes.c_char_p) + _ERR),
    "attnd_create_sequence": (ctypes.c_int, (_P, c_u32, c_u64) + _ERR),
    "attnd_fork_sequence": (ctypes.c_int, (_P, c_u32, c_u64, c_u64) + _ERR),
    "attnd_truncate_sequence": (ctypes.c_int, (_P, c_u32, c_u64, c_u64) + _ERR),
    "attnd_release_sequence": (ctypes.c_int, (_P, c_u32, c_u64, _u64p) + _ERR),
    "attnd_get_sequence": (ctypes.c_int, (_P, c_u32, c_u64, _u64p, c_size, _sizep) + _ERR),
    "attnd_call_unary": (ctypes.c_int, (_P, ctypes.POINTER(Call), _u64p, c_size) + _ERR),
    "attnd_stream_open": (ctypes.c_int, (_P, ctypes.POINTER(_P)) + _ERR),
    "attnd_stream_send": (ctypes.c_int, (_P, ctypes.POINTER(Call), _u64p) + _ERR),
    "attnd_stream_receive": (ctypes.c_int, (_P, _u64p, _u64p, c_size, _sizep) + _ERR),
    "attnd_stream_pending": (c_size, (_P,)),
    "attnd_stream_close": (ctypes.c_int, (_P,) + _ERR),
}


class NativeLibraryError(RuntimeError):
    """libattnd_c.so is missing, does not load, or speaks another ABI version."""


# ---- finding it ----

def _repo_roots():
    """Checkouts whose build folders may hold the library: the one recorded when the package
    was built, then the one this file sits in (when used from the source tree)."""
    roots = []
    try:
        from ._build_info import REPO_ROOT
        roots.append(pathlib.Path(REPO_ROOT))
    except ImportError:
        pass
    if len(_PKG_DIR.parents) > 2:
        roots.append(_PKG_DIR.parents[2])
    seen, unique = set(), []
    for root in roots:
        if (root / "client" / "capi" / "attnd_c.h").is_file() and root not in seen:
            seen.add(root)
            unique.append(root)
    return unique


def candidates():
    """Every path looked at, in order."""
    env = os.environ.get("ATTND_NATIVE_LIB")
    if env:
        return [pathlib.Path(env)]
    paths = [_PKG_DIR / "_lib" / LIB_NAME]
    build_dirs = [d for d in (os.environ.get("ATTND_BUILD_DIR"), "build") if d]
    for root in _repo_roots():
        for build in build_dirs:
            path = root / build / "client" / "capi" / LIB_NAME
            if path not in paths:
                paths.append(path)
    return paths


def find_library():
    """The path of the library that would be loaded, or None when there is none."""
    for path in candidates():
        if path.is_file():
            return str(path)
    return None


def missing_message():
    looked = "\n  ".join(str(p) for p in candidates())
    return (f"attnd's native library {LIB_NAME} was not found; looked at:\n  {looked}\n"
            "Build it in the attnd repository with `scripts/build.sh attnd_c` (it lands in "
            "build/client/capi/), or point ATTND_NATIVE_LIB at a libattnd_c.so.")


def open_library(path=None):
    """Loads the library (path, or find_library()) and declares its prototypes."""
    path = path or find_library()
    if path is None:
        raise NativeLibraryError(missing_message())
    try:
        lib = ctypes.CDLL(path)
    except OSError as error:
        raise NativeLibraryError(f"cannot load {path}: {error}") from None
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeLibraryError(f"{path} has no {name}: rebuild it "
                                     "(`scripts/build.sh attnd_c`)") from None
        fn.restype = restype
        fn.argtypes = argtypes
    version = lib.attnd_abi_version()
    if version != ABI_VERSION:
        raise NativeLibraryError(f"{path} speaks C ABI version {version}; this attnd_client "
                                 f"is written for version {ABI_VERSION}: rebuild one or the "
                                 "other from the same tree")
    return lib


_lock = threading.Lock()
_lib = None


def library():
    """The loaded library, loaded once per process."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = open_library()
    return _lib
