"""Tensor helpers: TensorRefs, dtype conversions and a dense fp64 attention reference.

Values travel through shared memory in the model dtype. numpy has float16 (rounded to nearest
even); bfloat16 it lacks, so it is done here on the bits, also rounding to nearest even, which
is what the server and the GPU do.
"""

import numpy as np

from ._protos import load as _load

pb = _load()[0]

DTYPE_FLOAT16 = pb.DTYPE_FLOAT16
DTYPE_BFLOAT16 = pb.DTYPE_BFLOAT16
DTYPE_FLOAT32 = pb.DTYPE_FLOAT32

_SIZES = {DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2, DTYPE_FLOAT32: 4}
_NAMES = {DTYPE_FLOAT16: "float16", DTYPE_BFLOAT16: "bfloat16", DTYPE_FLOAT32: "float32"}


def dtype_size(dtype):
    """Bytes per element of a pb.DType; 0 for unspecified."""
    return _SIZES.get(dtype, 0)


def dtype_name(dtype):
    return _NAMES.get(dtype, "unspecified")


def tensor_ref(region, offset, dtype, shape):
    """A TensorRef: dense row-major `shape` of `dtype`, `offset` bytes into `region`."""
    return pb.TensorRef(region=region, offset=int(offset), dtype=dtype,
                        shape=[int(d) for d in shape])


def byte_size(ref):
    n = 1
    for d in ref.shape:
        n *= d
    return n * dtype_size(ref.dtype)


# ---- scalar formats ----

def float_to_bf16_bits(values):
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    u = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return (rounded & 0xFFFF).astype(np.uint16)


def bf16_bits_to_float(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float_to_fp16_bits(values):
    """float32 -> IEEE binary16 bits (uint16), round to nearest even; overflow gives inf."""
    with np.errstate(over="ignore"):  # inf is the right answer, not a warning
        return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)


def fp16_bits_to_float(bits):
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def encode(values, dtype):
    """float values -> a numpy array holding their bytes in `dtype` (uint16 or float32)."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == DTYPE_FLOAT32:
        return values.copy()
    if dtype == DTYPE_FLOAT16:
        return float_to_fp16_bits(values)
    if dtype == DTYPE_BFLOAT16:
        return float_to_bf16_bits(values)
    raise ValueError(f"unsupported dtype {dtype}")


def decode(stored, dtype):
    """The inverse of encode: stored elements of `dtype` -> float32."""
    if dtype == DTYPE_FLOAT32:
        return np.asarray(stored, dtype=np.float32).copy()
    if dtype == DTYPE_FLOAT16:
        return fp16_bits_to_float(stored)
    if dtype == DTYPE_BFLOAT16:
        return bf16_bits_to_float(stored)
    raise ValueError(f"unsupported dtype {dtype}")


def round_to_dtype(values, dtype):
    """What values become after a trip through `dtype`: exactly what the server reads."""
    return decode(encode(values, dtype), dtype)


# ---- regions ----

class RegionAllocator:
    """Hands out aligned, non-overlapping byte ranges of a region, front to back."""

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self.used = 0

    def allocate(self, nbytes, alignment=256):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        start = (self.used + alignment - 1) & ~(alignment - 1)
        if start + nbytes > self.capacity:
            raise MemoryError(f"{nbytes} bytes do not fit: {self.used} of {self.capacity} used")
        self.used = start + nbytes
        return start


# ---- reference ----

def model_sm_scale(model):
    """The logits scale a ModelConfig implies (0 means 1/sqrt(head_dim))."""
    return model.sm_scale if model.sm_scale > 0 else 1.0 / np.sqrt(model.head_dim)


def dense_attention_reference(q, k, v, sm_scale, soft_cap=0.0, window_left=-1):
    """Causal attention of the last len(q) positions over all len(k) positions, in float64.

    q: [n, qo_heads, head_dim]; k, v: [kv_len, kv_heads, head_dim]. Query r sits at position
    kv_len - n + r and sees key j iff j <= its position and (window_left < 0 or
    position - j <= window_left). Returns (out [n, qo_heads, head_dim],
    lse [n, qo_heads]) with lse the natural log of the softmax denominator.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n, hq, _ = q.shape
    kv_len, hk, _ = k.shape
    group = hq // hk
    k = np.repeat(k, group, axis=1)  # [kv_len, hq, d]
    v = np.repeat(v, group, axis=1)
    logits = np.einsum("nhd,jhd->hnj", q, k) * sm_scale
    if soft_cap > 0:
        logits = soft_cap * np.tanh(logits / soft_cap)
    pos = np.arange(kv_len - n, kv_len)[:, None]
    key = np.arange(kv_len)[None, :]
    visible = key <= pos
    if window_left >= 0:
        visible &= pos - key <= window_left
    logits = np.where(visible[None], logits, -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - peak)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hnj,jhd->nhd", p / denom, v)
    lse = (peak + np.log(denom))[..., 0].T
    return out, lse


def relative_l2_error(out, ref):
    """||out - ref|| / ||ref||; inf if out holds a NaN or inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))
