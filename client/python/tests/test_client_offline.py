"""Offline smoke test of attnd_client: tensor helpers, dtype conversions, shared memory and
the reference, with no server.

    PYTHONPATH=client/python python3 -m pytest client/python/tests
"""

import math
import os

import numpy as np
import pytest

import attnd_client as ac


def test_tensor_ref_and_sizes():
    ref = ac.tensor_ref("kv", 512, ac.DTYPE_BFLOAT16, [3, 8, 64])
    assert ref.region == "kv" and ref.offset == 512 and ref.dtype == ac.pb.DTYPE_BFLOAT16
    assert list(ref.shape) == [3, 8, 64]
    assert ac.byte_size(ref) == 3 * 8 * 64 * 2
    assert ac.dtype_size(ac.DTYPE_FLOAT32) == 4
    assert ac.dtype_size(ac.pb.DTYPE_UNSPECIFIED) == 0
    assert ac.dtype_name(ac.DTYPE_FLOAT16) == "float16"


def test_requests():
    r = ac.tensor_ref("r", 0, ac.DTYPE_FLOAT16, [3, 2, 4])
    req = ac.attention_request(1, 2, [(10, 2), (11, 1)], r, r, r, r)
    assert req.device == 1 and req.layer == 2
    assert [(i.seq_id, i.num_new_tokens) for i in req.items] == [(10, 2), (11, 1)]
    assert not req.HasField("lse")
    lse = ac.tensor_ref("r", 0, ac.DTYPE_FLOAT32, [1, 2])
    req = ac.attention_request(0, 0, [(1, 1)], r, r, r, r, lse=lse)
    assert req.lse.dtype == ac.DTYPE_FLOAT32
    app = ac.append_request(0, 1, [(5, 3)], r, r)
    assert app.items[0].num_new_tokens == 3


def test_bf16_round_to_nearest_even():
    # 1 + 2^-8 is half-way between 1 and 1 + 2^-7: ties go to the even mantissa (1).
    assert ac.float_to_bf16_bits(np.float32(1 + 2**-8)) == 0x3F80
    # 1 + 3 * 2^-8 is half-way between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
    assert ac.float_to_bf16_bits(np.float32(1 + 3 * 2**-8)) == 0x3F82
    # Just above the tie rounds up.
    assert ac.float_to_bf16_bits(np.float32(1 + 2**-8 + 2**-20)) == 0x3F81
    assert ac.float_to_bf16_bits(np.float32(-2.0)) == 0xC000
    big = np.float32(np.finfo(np.float32).max)
    assert ac.float_to_bf16_bits(big) == 0x7F80  # rounds up into inf
    assert ac.float_to_bf16_bits(np.float32(np.inf)) == 0x7F80
    nan_bits = ac.float_to_bf16_bits(np.array([0x7F800001], np.uint32).view(np.float32))
    assert math.isnan(float(ac.bf16_bits_to_float(nan_bits)[0]))  # payload in the low bits only
    assert ac.bf16_bits_to_float(np.uint16(0x3F80)) == 1.0


def test_fp16_round_to_nearest_even():
    assert ac.float_to_fp16_bits(np.float32(1 + 2**-11)) == 0x3C00  # tie -> even
    assert ac.float_to_fp16_bits(np.float32(1 + 3 * 2**-11)) == 0x3C02  # tie -> even (up)
    assert ac.float_to_fp16_bits(np.float32(65504)) == 0x7BFF
    with np.errstate(over="ignore"):
        assert ac.float_to_fp16_bits(np.float32(65520)) == 0x7C00  # tie at the top -> inf
    assert ac.float_to_fp16_bits(np.float32(2**-24)) == 0x0001  # smallest subnormal
    assert ac.float_to_fp16_bits(np.float32(2**-26)) == 0x0000  # below half of it -> 0
    assert ac.fp16_bits_to_float(np.uint16(0x0001)) == np.float32(2**-24)
    assert ac.fp16_bits_to_float(np.uint16(0xC000)) == -2.0


def test_round_trips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10000).astype(np.float32) * 100
    cases = ((ac.DTYPE_FLOAT32, 0), (ac.DTYPE_FLOAT16, 2**-11), (ac.DTYPE_BFLOAT16, 2**-8))
    for dtype, rel in cases:
        y = ac.round_to_dtype(x, dtype)
        assert np.all(np.abs(y - x) <= rel * np.abs(x) + 1e-30)
        # Rounding is idempotent: what the server reads back is exactly what was sent.
        assert np.array_equal(ac.round_to_dtype(y, dtype), y)
        assert np.array_equal(ac.decode(ac.encode(y, dtype), dtype), y)


def test_region_allocator():
    alloc = ac.RegionAllocator(1024)
    assert alloc.allocate(10) == 0
    assert alloc.allocate(10) == 256
    assert alloc.allocate(8, alignment=8) == 272
    with pytest.raises(MemoryError):
        alloc.allocate(1024)
    with pytest.raises(ValueError):
        alloc.allocate(1, alignment=3)


def test_shared_memory_region():
    with ac.SharedMemoryRegion(4096) as shm:
        path = "/dev/shm" + shm.key
        assert os.path.exists(path) and os.path.getsize(path) == 4096
        with pytest.raises(FileExistsError):
            ac.SharedMemoryRegion(16, key=shm.key)  # exclusive creation
        values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
        shm.write(128, ac.DTYPE_BFLOAT16, values)
        assert np.array_equal(shm.read(128, ac.DTYPE_BFLOAT16, (3, 4)),
                              ac.round_to_dtype(values, ac.DTYPE_BFLOAT16))
        shm.fill(0, 8, 0xFF)
        assert np.all(np.isnan(shm.read(0, ac.DTYPE_FLOAT16, (4,))))
    assert not os.path.exists(path)


def test_dense_reference():
    rng = np.random.default_rng(1)
    hq, hk, d, kv_len, n = 4, 2, 8, 5, 2
    q = rng.standard_normal((n, hq, d))
    k = rng.standard_normal((kv_len, hk, d))
    v = rng.standard_normal((kv_len, hk, d))
    out, lse = ac.dense_attention_reference(q, k, v, 0.5)
    # By hand for the last query (position 4, sees all keys), head 3 -> kv head 1.
    logits = 0.5 * k[:, 1] @ q[1, 3]
    p = np.exp(logits - logits.max())
    assert np.allclose(out[1, 3], (p / p.sum()) @ v[:, 1])
    assert np.isclose(lse[1, 3], logits.max() + np.log(p.sum()))
    # The first query (position 3) must not see key 4.
    logits = 0.5 * k[:4, 0] @ q[0, 0]
    p = np.exp(logits - logits.max())
    assert np.allclose(out[0, 0], (p / p.sum()) @ v[:4, 0])
    # window_left = 0: each query sees only itself.
    out, _ = ac.dense_attention_reference(q, k, v, 0.5, window_left=0)
    for r in range(n):
        for h in range(hq):
            assert np.allclose(out[r, h], v[kv_len - n + r, h // (hq // hk)])
    # soft cap bounds the logits, so lse <= cap + log(kv_len).
    _, lse = ac.dense_attention_reference(q * 100, k, v, 1.0, soft_cap=2.0)
    assert np.all(lse <= 2.0 + np.log(kv_len) + 1e-9)
    assert ac.relative_l2_error(out, out) == 0.0
    bad = out.copy()
    bad[0, 0, 0] = np.nan
    assert ac.relative_l2_error(bad, out) == math.inf
