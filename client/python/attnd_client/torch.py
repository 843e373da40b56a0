"""attnd from PyTorch: attention of a model runner's layers computed by attnd, on torch CUDA
tensors, ordered with torch's streams by CUDA IPC events, with no host synchronisation.

    from attnd_client.torch import AttndTorch
    with AttndTorch.connect("unix:///tmp/attnd.sock", device=0) as attn:
        attn.create_sequence(7)
        attn.set_batch([7], [len(prompt)])                 # once per step
        for layer in range(attn.model["num_layers"]):
            out = attn.attention(layer, q, k_new, v_new)    # [T, qo, d], on the current stream

attnd must run the CUDA backend on this machine. Run attnd and the client under MPS
(`nvidia-cuda-mps-control -d`): without it every call pays a GPU context switch (README).

Needs PyTorch (`pip install 'attnd-client[torch]'`); the rest of attnd_client does not.
"""

import math
import os
import secrets

try:
    import torch
except ImportError as _error:  # the package works without torch; this module does not
    raise ImportError(
        "attnd_client.torch needs PyTorch with CUDA: pip install 'attnd-client[torch]' (or "
        "torch from https://pytorch.org). The rest of attnd_client (Client, NativeClient) "
        "works without it.") from _error

from . import tensors
from .native import OP_APPEND, OP_DECODE, OP_PREFILL, Call, NativeClient

__all__ = ["AttndTorch", "share_cuda_tensor", "ALIGNMENT"]

ALIGNMENT = 256  # bytes; every carved buffer starts on this boundary of the region

_TORCH_DTYPES = {tensors.DTYPE_FLOAT16: torch.float16, tensors.DTYPE_BFLOAT16: torch.bfloat16,
                 tensors.DTYPE_FLOAT32: torch.float32}
_IPC_HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t)
# Several copies in one multi-tensor launch (torch >= 2.1); plain copy_ where it is missing.
_foreach_copy = getattr(torch, "_foreach_copy_", None)


def share_cuda_tensor(t):
    """(handle, offset, byte_size) to register a CUDA tensor's memory with attnd:
    handle: the 64-byte cudaIpcMemHandle_t of the cudaMalloc block holding t's storage;
    offset: bytes from that block's base to t's first element (what requests name);
    byte_size: bytes from the block's base to the end of t's storage (RegisterCudaRegion's
    byte_size: the region spans at least all of t's storage).

    Uses the caching allocator's own sharing, t.untyped_storage()._share_cuda_(), which in
    torch 2.x (torch/csrc/StorageSharing.cpp, THPStorage_shareCuda) returns the 8-tuple
        (device, handle, storage_size_bytes, storage_offset_bytes,
         ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
    where storage_size_bytes is the storage's nbytes() and storage_offset_bytes is the
    storage's start minus the base of the cudaMalloc block it was carved from
    (CUDACachingAllocator::shareIpcHandle). Since torch 2.2 `handle` is 66 bytes: a version
    byte, a kind byte (b"c": a cudaMalloc block, followed by its 64-byte cudaIpcMemHandle_t;
    b"e": an expandable segment, which cudaIpcOpenMemHandle cannot open), before that it is
    the 64 bytes alone. Side effect: torch keeps the storage's memory behind its IPC
    reference count (CudaIPCSentData); attnd never drops that reference, so the memory is
    not reused before the process exits: share long-lived allocations only.
    """
    if not t.is_cuda:
        raise ValueError(f"share_cuda_tensor needs a CUDA tensor, got one on {t.device}")
    if t.untyped_storage().nbytes() == 0:
        raise ValueError("share_cuda_tensor: the tensor has no storage (0 bytes)")
    shared = t.untyped_storage()._share_cuda_()
    handle, storage_size, storage_offset = bytes(shared[1]), int(shared[2]), int(shared[3])
    if len(handle) == _IPC_HANDLE_SIZE + 2:
        kind = handle[1:2]
        if kind == b"e":
            raise RuntimeError(
                "the tensor lives in an expandable segment, which CUDA IPC cannot share: "
                "unset expandable_segments in PYTORCH_CUDA_ALLOC_CONF (or allocate it with "
                "torch.cuda.memory._set_allocator_settings('expandable_segments:False'))")
        if kind != b"c":
            raise RuntimeError(f"unknown torch IPC handle kind {kind!r} (version {handle[0]})")
        handle = handle[2:]
    elif len(handle) != _IPC_HANDLE_SIZE:
        raise RuntimeError(f"unexpected torch IPC handle of {len(handle)} bytes")
    offset = storage_offset + t.storage_offset() * t.element_size()
    return handle, offset, storage_offset + storage_size


def _model(info):
    m = info.model
    if m.dtype not in _TORCH_DTYPES:
        raise RuntimeError(f"attnd serves dtype {m.dtype}, which torch has no name for")
    return {"num_layers": m.num_layers, "num_qo_heads": m.num_qo_heads,
            "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
            "dtype": _TORCH_DTYPES[m.dtype], "page_size": m.page_size,
            # not needed to drive attnd; what a reference (SDPA) needs to match it
            "sm_scale": float(tensors.model_sm_scale(m)),
            "logits_soft_cap": float(m.logits_soft_cap), "window_left": int(m.window_left)}


class AttndTorch:
    """One model runner's attention through attnd, on one CUDA device.

    Holds one torch.uint8 CUDA buffer carved into q, k_new, v_new, out [max_tokens, heads,
    head_dim] (model dtype) and lse [max_tokens, qo_heads] (fp32), registered as a CUDA
    region; the attributes q, k_new, v_new, out and lse are those full-size views (write the
    first T rows of q/k_new/v_new in place and attention() copies nothing). Two interprocess
    events order attnd's work with torch's current stream; a native stream carries the calls.
    Each call is a host round trip to attnd, so attention() cannot be captured in a CUDA
    graph: capture the parts of a layer between attention calls. One thread drives it.
    """

    def __init__(self, client, device=0, max_tokens=8192, region_name=None):
        """Use connect(). Takes over `client` (closed by close())."""
        self._client = client
        self._closed = False
        self._native = None
        self._registered = []  # ("region" | "event", name), in registration order
        self._wait = self._signal = None
        self._buffer = None
        self._attn_call = self._append_call = None
        self.num_tokens = 0  # T of the batch set_batch() set
        try:
            self._start(client.server_info(), int(device), int(max_tokens), region_name)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, target, device=0, max_tokens=8192, region_name=None):
        """Connects to attnd at `target`, reads the model, allocates and registers the buffers
        on cuda:{device} and the events, and opens the stream."""
        return cls(NativeClient.connect(target), device, max_tokens, region_name)

    def _start(self, info, device, max_tokens, region_name):
        if not torch.cuda.is_available():
            raise RuntimeError("AttndTorch needs CUDA, and torch sees no CUDA device")
        missing = {"cuda_regions", "ipc_events", "stream"} - set(info.features)
        if missing:
            raise RuntimeError(
                f"attnd at {self._client.target} lacks {', '.join(sorted(missing))} "
                f"({tensors.pb.BackendKind.Name(info.backend)}): AttndTorch needs attnd's CUDA "
                "backend on this machine")
        served = [d.device for d in info.devices]
        if device not in served:
            raise ValueError(f"attnd serves devices {served}, not {device}")
        if max_tokens < 1 or max_tokens > info.max_tokens_per_request:
            raise ValueError(f"max_tokens must be 1..{info.max_tokens_per_request} (attnd's "
                             f"max_tokens_per_request), got {max_tokens}")
        self.model = _model(info)
        self.device = device
        self.max_tokens = max_tokens
        self._torch_device = torch.device("cuda", device)
        self._dtype_code = info.model.dtype
        self._region = region_name or f"attnd-torch-{os.getpid()}-{secrets.token_hex(4)}"
        self._allocate()
        self._register()
        self._native = self._client.open_stream()

    def _allocate(self):
        m, t = self.model, self.max_tokens
        qo, kv, d = m["num_qo_heads"], m["num_kv_heads"], m["head_dim"]
        shapes = {"q": ((t, qo, d), m["dtype"]), "k_new": ((t, kv, d), m["dtype"]),
                  "v_new": ((t, kv, d), m["dtype"]), "out": ((t, qo, d), m["dtype"]),
                  "lse": ((t, qo), torch.float32)}
        carve = tensors.RegionAllocator(1 << 62)
        starts = {}
        for name, (shape, dtype) in shapes.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            starts[name] = (carve.allocate(nbytes, ALIGNMENT), nbytes)
        self._buffer = torch.empty(carve.used, dtype=torch.uint8, device=self._torch_device)
        self._offsets = {}
        for name, (shape, dtype) in shapes.items():
            start, nbytes = starts[name]
            view = self._buffer[start:start + nbytes].view(dtype).view(shape)
            setattr(self, name, view)
            self._offsets[name] = start

    def _register(self):
        handle, base, size = share_cuda_tensor(self._buffer)
        # Region offsets count from the cudaMalloc block's base, not from our buffer's start.
        self._offsets = {name: base + start for name, start in self._offsets.items()}
        self._client.register_cuda_region(self._region, handle, self.device, size)
        self._registered.append(("region", self._region))
        with torch.cuda.device(self.device):
            # Created on this device (ipc_handle() creates a not-yet-recorded event there).
            self._wait = torch.cuda.Event(interprocess=True)
            self._signal = torch.cuda.Event(interprocess=True)
            events = ((f"{self._region}-wait", self._wait),
                      (f"{self._region}-signal", self._signal))
            for name, event in events:
                self._client.register_cuda_event(name, bytes(event.ipc_handle()), self.device)
                self._registered.append(("event", name))
        self._wait_name, self._signal_name = events[0][0], events[1][0]

    # ---- sequences (on this device) ----
    def create_sequence(self, seq_id):
        self._client.create_sequence(self.device, seq_id)

    def fork_sequence(self, parent_id, child_id):
        self._client.fork_sequence(self.device, parent_id, child_id)

    def truncate_sequence(self, seq_id, length):
        self._client.truncate_sequence(self.device, seq_id, length)

    def release_sequence(self, seq_id):
        """Returns the number of pages freed."""
        return self._client.release_sequence(self.device, seq_id)

    def sequence_lengths(self, seq_id):
        """The sequence's length at each layer."""
        return self._client.get_sequence(self.device, seq_id)

    # ---- per step ----
    def set_batch(self, seq_ids, num_new_tokens):
        """The step's batch, once per step: every layer's call then carries these items, new
        tokens packed in this order (T = sum(num_new_tokens) rows)."""
        seq_ids, counts = [int(s) for s in seq_ids], [int(n) for n in num_new_tokens]
        if not seq_ids or len(seq_ids) != len(counts):
            raise ValueError(f"set_batch: {len(seq_ids)} seq_ids and {len(counts)} counts; "
                             "need the same number, at least one")
        total = sum(counts)
        if min(counts) < 0 or total > self.max_tokens:
            raise ValueError(f"set_batch: {total} new tokens; counts must be >= 0 and sum to at "
                             f"most max_tokens = {self.max_tokens}")
        m, region, o = self.model, self._region, self._offsets
        d, dt = m["head_dim"], self._dtype_code

        def ref(name, heads):
            return region, o[name], dt, (total, heads, d)

        items = list(zip(seq_ids, counts))
        events = {"wait_event": self._wait_name, "signal_event": self._signal_name}
        qo, kv = m["num_qo_heads"], m["num_kv_heads"]
        op = OP_DECODE if all(n == 1 for n in counts) else OP_PREFILL
        self._attn_call = Call(op, self.device, items, q=ref("q", qo), k_new=ref("k_new", kv),
                               v_new=ref("v_new", kv), out=ref("out", qo), **events)
        self._append_call = None  # built by the step's first append()
        self._append_args = (items, ref("k_new", kv), ref("v_new", kv), events)
        self._lse_spec = (region, o["lse"], tensors.DTYPE_FLOAT32, (total, qo))
        self._lse_on = False
        self.num_tokens = total
        self._q_t, self._k_t, self._v_t = self.q[:total], self.k_new[:total], self.v_new[:total]
        self._out_t, self._lse_t = self.out[:total], self.lse[:total]

    def attention(self, layer, q, k_new, v_new, *, deterministic=False, return_lse=False):
        """Appends k_new/v_new to the batch's sequences at `layer` and attends q over them:
        q [T, qo, d], k_new/v_new [T, kv, d], CUDA tensors of the model dtype on this device,
        rows in batch order. Ordered on torch's current stream; no host synchronisation.
        Returns out[:T] (and lse[:T], fp32), views valid until the next call."""
        call = self._attn_call
        if call is None:
            raise RuntimeError("attention(): call set_batch() first")
        self._stage(((q, self._q_t, "q"), (k_new, self._k_t, "k_new"),
                     (v_new, self._v_t, "v_new")))
        if return_lse != self._lse_on:
            call.set_tensor("lse", self._lse_spec if return_lse else None)
            self._lse_on = return_lse
        c = call.struct
        c.layer = layer
        c.deterministic = 1 if deterministic else 0
        self._round_trip(call)
        return (self._out_t, self._lse_t) if return_lse else self._out_t

    def append(self, layer, k_new, v_new):
        """Appends k_new/v_new [T, kv, d] to the batch's sequences at `layer` (no attention)."""
        call = self._append_call
        if call is None:
            if self._attn_call is None:
                raise RuntimeError("append(): call set_batch() first")
            items, k_ref, v_ref, events = self._append_args
            call = self._append_call = Call(OP_APPEND, self.device, items, k_new=k_ref,
                                            v_new=v_ref, **events)
        self._stage(((k_new, self._k_t, "k_new"), (v_new, self._v_t, "v_new")))
        call.struct.layer = layer
        self._round_trip(call)

    def _stage(self, inputs):
        """Copies each (src, buffer, name) into its buffer on the current stream, unless src
        is that buffer, in one kernel launch where torch can (_foreach_copy_)."""
        dsts, srcs = [], []
        for src, dst, name in inputs:
            if src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride():
                if src.shape != dst.shape or src.dtype != dst.dtype:
                    raise ValueError(f"{name}: the buffer view is {tuple(src.shape)} "
                                     f"{src.dtype}, the batch needs {tuple(dst.shape)} "
                                     f"{dst.dtype}")
                continue
            if (src.shape != dst.shape or src.dtype != dst.dtype
                    or src.get_device() != self.device):
                raise ValueError(f"{name}: expected {tuple(dst.shape)} {dst.dtype} on cuda:"
                                 f"{self.device}, got {tuple(src.shape)} {src.dtype} on "
                                 f"{src.device}")
            dsts.append(dst)
            srcs.append(src)
        if len(dsts) > 1 and _foreach_copy is not None:
            _foreach_copy(dsts, srcs)
        else:
            for dst, src in zip(dsts, srcs):
                dst.copy_(src)

    def _round_trip(self, call):
        # One pair of events serves every call, because each is re-recorded only when nothing
        # can still refer to its previous record: attnd calls cudaStreamWaitEvent(wait) and
        # cudaEventRecord(signal) while enqueuing a call, before it answers. So `wait` is
        # recorded for call N+1 only after call N's answer (attnd's stream already holds its
        # wait on record N), and torch's stream waits on `signal` right after call N's answer
        # (record N is the latest), before call N+1 is sent (when attnd re-records it).
        stream = torch.cuda.current_stream(self._torch_device)
        self._wait.record(stream)  # after the copies into the buffers and any earlier reads
        self._native.send(call)
        self._native.receive(False)  # GIL released; answered once attnd's work is enqueued
        stream.wait_event(self._signal)  # torch's later work follows attnd's

    # ---- teardown ----
    def close(self):
        """Closes the stream, unregisters the events and the region, closes the client."""
        if self._closed:
            return
        self._closed = True
        errors = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except Exception as error:  # keep tearing down; report the first at the end
                errors.append(error)

        if self._native is not None:
            attempt(self._native.close)
        if self._signal is not None:
            # attnd's last work has run: its mapping of our memory and events may go.
            attempt(self._signal.synchronize)
        for kind, name in reversed(self._registered):
            if kind == "event":
                attempt(self._client.unregister_cuda_event, name)
            else:
                attempt(self._client.unregister_region, name)
        attempt(self._client.close)
        self._attn_call = self._append_call = None
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
