"""The native client: attnd's C ABI (libattnd_c.so, client/capi/attnd_c.h) through ctypes.

Unlike Client (grpcio), nothing here builds a protobuf in Python: a data call is a C struct
(`Call`) built once per batch, of which only the layer (and, where buffers move, the tensor
offsets) change from one call to the next; the library fills the request in C++ and writes it.
Every foreign call releases the GIL (ctypes.CDLL), waiting for an answer included.

    from attnd_client.native import NativeClient, Call, OP_DECODE
    client = NativeClient.connect("unix:///tmp/attnd.sock")
    info = client.server_info()                       # attnd.v1.ServerInfo
    client.register_host_region("bufs", shm.key, 0, shm.size)
    client.create_sequence(0, 7)
    call = Call(OP_DECODE, 0, [(7, 1)], q=("bufs", 0, DTYPE_BFLOAT16, (1, 8, 64)), ...)
    stream = client.open_stream()
    for layer in range(num_layers):
        call.layer = layer
        stream.send(call)                              # pipelined: answers come in order
    for _ in range(num_layers):
        tag, lengths = stream.receive()

Failed calls raise AttndError (code: a grpc.StatusCode, message: the server's, naming the
field). Importing this module does not load the library; the first NativeClient does, and
raises NativeLibraryError saying how to get it when it is missing.
"""

import array
import ctypes
import itertools
import sys

import grpc

from . import _cabi
from ._cabi import ERR_LEN, NativeLibraryError, find_library
from .client import AttndError, pb

OP_APPEND, OP_PREFILL, OP_DECODE = 1, 2, 3
_OPS = {"append": OP_APPEND, "prefill": OP_PREFILL, "decode": OP_DECODE}
_TENSORS = ("q", "k_new", "v_new", "out", "lse")
_RESOURCE_EXHAUSTED = 8

__all__ = ["NativeClient", "NativeStream", "Call", "NativeLibraryError", "find_library",
           "OP_APPEND", "OP_PREFILL", "OP_DECODE", "op_code"]


def op_code(op):
    """"append" / "prefill" / "decode" (or OP_*) -> the ATTND_OP_* value."""
    if isinstance(op, str):
        try:
            return _OPS[op.lower()]
        except KeyError:
            raise ValueError(f"op must be append, prefill or decode, got {op!r}") from None
    if op in (OP_APPEND, OP_PREFILL, OP_DECODE):
        return int(op)
    raise ValueError(f"op must be OP_APPEND, OP_PREFILL or OP_DECODE, got {op!r}")


def _raise(rc, err, tag=None):
    message = err.value.decode("utf-8", "replace")
    raise AttndError.from_code(rc, message, tag) from None


def _closed(what):
    return AttndError(grpc.StatusCode.FAILED_PRECONDITION, f"{what} is closed")


def _name(value):
    """str/bytes/None -> bytes or None (None and "" both mean "not given")."""
    if value is None or isinstance(value, bytes):
        return value or None
    return str(value).encode() or None


class Call:
    """One data call as the C struct attnd_call, with its item array: built once per batch
    (items and shapes fixed), then reused for every layer. Patching is cheap:

        call.layer = 5
        call.set_offsets(q=4096, out=8192)   # bytes from the region's start
        call.deterministic = True

    Tensors are (region, offset, dtype, shape) tuples (dtype a pb.DType / ATTND_DTYPE_*
    value; shape up to 4 dims) or pb.TensorRef; None leaves a tensor out (lse, or all but
    k_new/v_new for Append). Events are registered CUDA event names, None for none.
    """

    __slots__ = ("struct", "ref", "num_items", "num_tokens", "_items", "_keep")

    def __init__(self, op, device, items, *, layer=0, q=None, k_new=None, v_new=None, out=None,
                 lse=None, deterministic=False, wait_event=None, signal_event=None):
        self._items, self.num_tokens = _item_array(items)
        count = len(self._items)
        c = _cabi.Call()
        c.op = op_code(op)
        c.device = int(device)
        c.layer = int(layer)
        c.items = self._items
        c.num_items = count
        self.num_items = count
        self._keep = {}  # the bytes the struct's char* fields point at
        self.struct = c
        self.ref = ctypes.byref(c)
        for name, spec in zip(_TENSORS, (q, k_new, v_new, out, lse)):
            self.set_tensor(name, spec)
        c.deterministic = int(bool(deterministic))
        self.set_events(wait_event, signal_event)

    # ---- per-call patches ----
    @property
    def layer(self):
        return self.struct.layer

    @layer.setter
    def layer(self, value):
        self.struct.layer = value

    @property
    def deterministic(self):
        return bool(self.struct.deterministic)

    @deterministic.setter
    def deterministic(self, value):
        self.struct.deterministic = 1 if value else 0

    @property
    def op(self):
        return self.struct.op

    @op.setter
    def op(self, value):
        self.struct.op = op_code(value)

    def set_offsets(self, **offsets):
        """Moves tensors within their regions: name=byte offset (q, k_new, v_new, out, lse)."""
        for name, offset in offsets.items():
            if name not in _TENSORS:
                raise ValueError(f"no tensor {name!r}; tensors are {', '.join(_TENSORS)}")
            getattr(self.struct, name).offset = offset

    # ---- set-up ----
    def set_tensor(self, name, spec):
        """Sets (or, with None, clears) one tensor."""
        t = getattr(self.struct, name)
        if spec is None:
            self._keep.pop(name, None)
            t.region, t.offset, t.dtype, t.ndim = None, 0, 0, 0
            return
        if hasattr(spec, "region"):  # a pb.TensorRef
            spec = (spec.region, spec.offset, spec.dtype, tuple(spec.shape))
        region, offset, dtype, shape = spec
        shape = tuple(int(d) for d in shape)
        if len(shape) > 4:
            raise ValueError(f"{name}: at most 4 dims, got shape {shape}")
        region = _name(region)
        self._keep[name] = region
        t.region, t.offset, t.dtype, t.ndim = region, int(offset), int(dtype), len(shape)
        for i in range(4):
            t.shape[i] = shape[i] if i < len(shape) else 0

    def set_events(self, wait_event=None, signal_event=None):
        wait, signal = _name(wait_event), _name(signal_event)
        self._keep["wait_event"], self._keep["signal_event"] = wait, signal
        self.struct.wait_event, self.struct.signal_event = wait, signal

    def tensor(self, name):
        """(region, offset, dtype, shape) of one tensor, or None when it is not given."""
        t = getattr(self.struct, name)
        if not t.region:
            return None
        return t.region.decode(), t.offset, t.dtype, tuple(t.shape[:t.ndim])

    @property
    def items(self):
        return [(i.seq_id, i.num_new_tokens) for i in self._items]


def _item_array(items):
    """[(seq_id, num_new_tokens), ...] -> (an attnd_item array, total new tokens).

    attnd_item is two 64-bit words (seq_id; num_new_tokens in the low half of the second, then
    padding) on the little-endian LP64 machines attnd runs on, so the array is filled as 64-bit
    words at once: several times faster than building the structs one by one."""
    items = list(items)
    words = array.array("Q", itertools.chain.from_iterable(items))  # ints >= 0, or raises
    count = len(items)
    if count == 0 or len(words) != 2 * count:
        raise ValueError("a call needs at least one item, each (seq_id, num_new_tokens)")
    counts = words[1::2]
    if max(counts) >= 1 << 32:
        raise ValueError("num_new_tokens must fit in 32 bits")
    if sys.byteorder != "little":
        return (_cabi.Item * count)(*zip(words[0::2], counts)), sum(counts)
    return (_cabi.Item * count).from_buffer(words), sum(counts)  # keeps `words` alive


def _as_call(call, fields):
    """A Call, or one built from NativeClient.call / NativeStream.send's keyword form."""
    if isinstance(call, Call):
        if fields:
            raise TypeError("pass either a Call or op and fields, not both")
        return call
    return Call(call, fields.pop("device", 0), fields.pop("items"), **fields)


class NativeClient:
    """A connection to one attnd through libattnd_c.so. May be shared between threads."""

    def __init__(self, target="unix:///tmp/attnd.sock", connect_timeout=5.0, *, token=None,
                 client_name=None):
        """token: a --token_file token (sent as a bearer token); client_name: this client's
        instance name (`attnd-client`), with its own lease and namespace."""
        self._h = None  # set last, so __del__ of a half-made object frees nothing
        lib = _cabi.library()
        handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(ERR_LEN)
        rc = lib.attnd_connect_as(str(target).encode(), float(connect_timeout),
                                  token.encode() if token else None,
                                  client_name.encode() if client_name else None,
                                  ctypes.byref(handle), err, ERR_LEN)
        if rc:
            _raise(rc, err)
        self.target = target
        self._lib = lib
        self._h = handle

    @classmethod
    def connect(cls, target="unix:///tmp/attnd.sock", connect_timeout=5.0, **identity):
        """Connects, waiting up to connect_timeout seconds for the server; `identity`: token,
        client_name (see __init__)."""
        return cls(target, connect_timeout, **identity)

    def close(self):
        handle, self._h = self._h, None
        if handle is not None:
            self._lib.attnd_client_free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            self.close()

    def _invoke(self, name, *args):
        if self._h is None:
            raise _closed("client")
        err = ctypes.create_string_buffer(ERR_LEN)
        rc = getattr(self._lib, name)(self._h, *args, err, ERR_LEN)
        if rc:
            _raise(rc, err)

    # ---- server ----
    def server_info(self):
        """The attnd.v1.ServerInfo message (model, devices, limits, features)."""
        if self._h is None:
            raise _closed("client")
        cap = 4096
        while True:
            buf = ctypes.create_string_buffer(cap)
            size = ctypes.c_size_t()
            err = ctypes.create_string_buffer(ERR_LEN)
            rc = self._lib.attnd_server_info(self._h, buf, cap, ctypes.byref(size), err, ERR_LEN)
            if rc == _RESOURCE_EXHAUSTED and size.value > cap:
                cap = size.value
                continue
            if rc:
                _raise(rc, err)
            return pb.ServerInfo.FromString(buf.raw[:size.value])

    # ---- regions and events ----
    def register_host_region(self, name, shm_key, offset, byte_size):
        """A POSIX shared-memory object ("/key") as region `name`."""
        self._invoke("attnd_register_host_region", _name(name), _name(shm_key), int(offset),
                     int(byte_size))

    def register_cuda_region(self, name, handle64, device, byte_size):
        """A cudaMalloc block (its 64-byte cudaIpcMemHandle_t) as region `name`: offsets in
        requests count from the block's base, byte_size bytes of it are usable."""
        self._invoke("attnd_register_cuda_region", _name(name), _handle64(handle64),
                     int(device), int(byte_size))

    def unregister_region(self, name):
        self._invoke("attnd_unregister_region", _name(name))

    def register_cuda_event(self, name, handle64, device):
        """An interprocess CUDA event (its 64-byte cudaIpcEventHandle_t) as event `name`."""
        self._invoke("attnd_register_cuda_event", _name(name), _handle64(handle64),
                     int(device))

    def unregister_cuda_event(self, name):
        self._invoke("attnd_unregister_cuda_event", _name(name))

    # ---- sequences ----
    def create_sequence(self, device, seq_id):
        self._invoke("attnd_create_sequence", int(device), int(seq_id))

    def fork_sequence(self, device, parent_id, child_id):
        self._invoke("attnd_fork_sequence", int(device), int(parent_id), int(child_id))

    def truncate_sequence(self, device, seq_id, length):
        self._invoke("attnd_truncate_sequence", int(device), int(seq_id), int(length))

    def release_sequence(self, device, seq_id):
        """Returns the number of pages freed."""
        freed = ctypes.c_uint64()
        self._invoke("attnd_release_sequence", int(device), int(seq_id), ctypes.byref(freed))
        return freed.value

    def get_sequence(self, device, seq_id):
        """The sequence's length at each layer."""
        cap = 128
        while True:
            lengths = (ctypes.c_uint64 * cap)()
            count = ctypes.c_size_t()
            self._invoke("attnd_get_sequence", int(device), int(seq_id), lengths, cap,
                         ctypes.byref(count))
            if count.value <= cap:
                return lengths[:count.value]
            cap = count.value

    # ---- data ----
    def call(self, call, **fields):
        """One unary Append/Prefill/Decode; waits for it. `call` is a Call, or an op followed
        by Call's arguments as keywords (device=, items=, layer=, q=, ...). Returns each
        item's length after the call."""
        call = _as_call(call, fields)
        if self._h is None:
            raise _closed("client")
        lengths = (ctypes.c_uint64 * call.num_items)()
        err = ctypes.create_string_buffer(ERR_LEN)
        rc = self._lib.attnd_call_unary(self._h, call.ref, lengths, call.num_items, err,
                                        ERR_LEN)
        if rc:
            _raise(rc, err)
        return lengths[:]

    def open_stream(self):
        """A NativeStream for pipelined data calls."""
        return NativeStream(self)


def _handle64(handle):
    handle = bytes(handle)
    if len(handle) != 64:
        raise ValueError(f"an IPC handle is 64 bytes, got {len(handle)}")
    return handle


class NativeStream:
    """One open Stream: send() returns once the request is written (with a signal event,
    attnd answers once its work is enqueued); receive() returns the answers in order. A
    refused request raises AttndError (its tag in .tag) and leaves the stream usable; a
    transport error breaks it for good. One thread at a time drives a stream."""

    def __init__(self, client):
        if client._h is None:
            raise _closed("client")
        lib = client._lib
        handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(ERR_LEN)
        self._h = None
        rc = lib.attnd_stream_open(client._h, ctypes.byref(handle), err, ERR_LEN)
        if rc:
            _raise(rc, err)
        self._lib = lib
        self._send_fn = lib.attnd_stream_send
        self._receive_fn = lib.attnd_stream_receive
        self._err = ctypes.create_string_buffer(ERR_LEN)
        self._tag = ctypes.c_uint64()
        self._tag_ref = ctypes.byref(self._tag)
        self._answer_tag = ctypes.c_uint64()
        self._answer_tag_ref = ctypes.byref(self._answer_tag)
        self._count = ctypes.c_size_t()
        self._count_ref = ctypes.byref(self._count)
        self._cap = 0
        self._lengths = None
        self._grow(256)
        self._h = handle

    def _grow(self, cap):
        self._cap = cap
        self._lengths = (ctypes.c_uint64 * cap)()

    def send(self, call, **fields):
        """Writes one request (a Call, or an op and Call's keywords); returns its tag."""
        if type(call) is not Call:
            call = _as_call(call, fields)
        if call.num_items > self._cap:
            self._grow(call.num_items)
        h = self._h
        if h is None:
            raise _closed("stream")
        rc = self._send_fn(h, call.ref, self._tag_ref, self._err, ERR_LEN)
        if rc:
            _raise(rc, self._err)
        return self._tag.value

    def receive(self, lengths=True):
        """Blocks (GIL released) for the oldest answer not yet received: (tag, each item's
        length after the call), or (tag, None) with lengths=False."""
        h = self._h
        if h is None:
            raise _closed("stream")
        rc = self._receive_fn(h, self._answer_tag_ref, self._lengths, self._cap,
                              self._count_ref, self._err, ERR_LEN)
        if rc:
            _raise(rc, self._err, self._answer_tag.value)
        if not lengths:
            return self._answer_tag.value, None
        return self._answer_tag.value, self._lengths[:min(self._count.value, self._cap)]

    @property
    def pending(self):
        """Requests sent whose answers have not been received."""
        return 0 if self._h is None else self._lib.attnd_stream_pending(self._h)

    def close(self):
        """Receives (and drops) what is pending, half-closes and frees the stream; raises
        AttndError if the stream ended with an error."""
        handle, self._h = self._h, None
        if handle is None:
            return
        err = ctypes.create_string_buffer(ERR_LEN)
        rc = self._lib.attnd_stream_close(handle, err, ERR_LEN)
        if rc:
            _raise(rc, err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            try:
                self.close()
            except Exception:  # nowhere to report it from a finalizer
                pass
