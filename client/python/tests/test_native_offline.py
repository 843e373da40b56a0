"""The native binding without a server and without the library: the C structs, how the library
is looked for, the error that says how to get it, and attnd_client.torch without torch.

    PYTHONPATH=client/python python3 -m pytest client/python/tests
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import grpc
import pytest

import attnd_client as ac
from attnd_client import _cabi, native


def test_struct_layout_matches_the_header():
    # client/capi/call.cc asserts the same sizes and offsets on the C side.
    assert _cabi.ctypes.sizeof(_cabi.Tensor) == 56
    assert _cabi.ctypes.sizeof(_cabi.Item) == 16
    assert _cabi.ctypes.sizeof(_cabi.Call) == 336
    assert _cabi.Call.items.offset == 16 and _cabi.Call.q.offset == 32
    assert _cabi.Call.deterministic.offset == 312 and _cabi.Call.signal_event.offset == 328


def test_call_is_built_once_and_patched():
    bf16 = ac.DTYPE_BFLOAT16
    call = native.Call("prefill", 1, [(7, 3), (9, 1)], layer=2,
                       q=("bufs", 256, bf16, (4, 8, 64)),
                       k_new=ac.tensor_ref("bufs", 512, bf16, [4, 2, 64]),
                       v_new=("bufs", 768, bf16, [4, 2, 64]), out=("bufs", 1024, bf16, (4, 8, 64)),
                       wait_event="w", signal_event="s")
    c = call.struct
    assert (c.op, c.device, c.layer, c.num_items) == (native.OP_PREFILL, 1, 2, 2)
    assert call.items == [(7, 3), (9, 1)] and call.num_tokens == 4
    assert call.tensor("k_new") == ("bufs", 512, bf16, (4, 2, 64))
    assert call.tensor("lse") is None and c.lse.region is None
    assert (c.wait_event, c.signal_event) == (b"w", b"s")
    call.layer = 5
    call.deterministic = True
    call.set_offsets(q=4096, out=8192)
    assert (c.layer, c.deterministic) == (5, 1)
    assert call.tensor("q") == ("bufs", 4096, bf16, (4, 8, 64))
    assert call.tensor("out")[1] == 8192 and call.tensor("v_new")[1] == 768
    call.set_tensor("lse", ("bufs", 0, ac.DTYPE_FLOAT32, (4, 8)))
    assert call.tensor("lse") == ("bufs", 0, ac.DTYPE_FLOAT32, (4, 8))
    call.set_tensor("lse", None)
    assert call.tensor("lse") is None
    call.set_events(None, "")
    assert c.wait_event is None and c.signal_event is None
    call.op = "decode"
    assert c.op == native.OP_DECODE


def test_call_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op must be"):
        native.Call("attend", 0, [(1, 1)])
    with pytest.raises(ValueError, match="at least one"):
        native.Call("decode", 0, [])
    with pytest.raises(ValueError, match="at most 4 dims"):
        native.Call("decode", 0, [(1, 1)], q=("r", 0, 2, (1, 1, 1, 1, 1)))
    call = native.Call(native.OP_APPEND, 0, [(1, 1)])
    with pytest.raises(ValueError, match="no tensor"):
        call.set_offsets(k=0)


def test_missing_library_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTND_NATIVE_LIB", str(tmp_path / "libattnd_c.so"))
    assert native.find_library() is None
    assert _cabi.candidates() == [tmp_path / "libattnd_c.so"]  # set: nothing else is tried
    with pytest.raises(native.NativeLibraryError) as error:
        _cabi.open_library()
    message = str(error.value)
    assert "scripts/build.sh attnd_c" in message and "ATTND_NATIVE_LIB" in message
    assert str(tmp_path / "libattnd_c.so") in message


def test_library_search_order(monkeypatch):
    monkeypatch.delenv("ATTND_NATIVE_LIB", raising=False)
    monkeypatch.setenv("ATTND_BUILD_DIR", "build-elsewhere")
    paths = _cabi.candidates()
    pkg = pathlib.Path(ac.__file__).resolve().parent
    assert paths[0] == pkg / "_lib" / "libattnd_c.so"
    roots = _cabi._repo_roots()
    if roots:  # in a checkout, or installed from one
        tail = pathlib.Path("client", "capi", "libattnd_c.so")
        assert paths[1] == roots[0] / "build-elsewhere" / tail
        assert paths[2] == roots[0] / "build" / tail


def test_import_loads_no_library():
    # Importing the package (native and torch modules aside) must work with no library at all.
    code = ("import attnd_client, attnd_client.native as n, attnd_client._cabi as c\n"
            "assert c._lib is None and n.find_library() is None\n")
    env = dict(os.environ, ATTND_NATIVE_LIB="/nonexistent/libattnd_c.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_module_without_torch_says_what_is_missing():
    with pytest.raises(ImportError, match="needs PyTorch"):
        import attnd_client.torch  # noqa: F401


def test_attnd_error_from_code():
    error = ac.AttndError.from_code(5, "items[0].seq_id: no sequence 3", tag=9)
    assert error.code == grpc.StatusCode.NOT_FOUND and error.tag == 9
    assert str(error) == "NOT_FOUND: items[0].seq_id: no sequence 3"
    assert ac.AttndError.from_code(999, "?").code == grpc.StatusCode.UNKNOWN
