"""AttndTorch on a GPU: attention against torch SDPA (fp32, on the K/V history the test fed in)
after a prefill and decode steps, fork / truncate / append, no host synchronisation inside
attention(), and share_cuda_tensor's offsets on a carved allocation.

Skipped without torch, without a CUDA device, or without the native library. The attnd is
$ATTND_TARGET when set (it must run the CUDA backend), else one started here with
--backend=cuda from $ATTND_BINARY or the build folder next to the library (conftest.py).

    ATTND_TARGET=unix:///tmp/attnd.sock python3 -m pytest client/python/tests/test_torch_gpu.py
"""

import secrets

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

import torch.nn.functional as F  # noqa: E402

from attnd_client import NativeClient  # noqa: E402
from attnd_client.torch import AttndTorch, share_cuda_tensor  # noqa: E402

from conftest import attnd_target, native_library_or_skip  # noqa: E402

DEVICE = 0
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def sdpa_checkable_target(request, extra_flags=()):
    """(target, ServerInfo) of a CUDA attnd whose outputs SDPA can check; skips otherwise."""
    native_library_or_skip()
    target = attnd_target(request, "cuda", extra_flags)
    with NativeClient.connect(target) as client:
        info = client.server_info()
    if "cuda_regions" not in info.features:
        pytest.skip(f"the attnd at {target} has no CUDA regions (the CPU backend?)")
    if info.model.logits_soft_cap > 0 or info.model.window_left >= 0:
        pytest.skip("the attnd's model has a soft cap or a window, which SDPA cannot check")
    return target, info


@pytest.fixture(scope="module")
def attn(request):
    target, _ = sdpa_checkable_target(request)
    a = AttndTorch.connect(target, device=DEVICE, max_tokens=512)
    yield a
    a.close()


def reference(q, k, v, scale):
    """SDPA in fp32 of q [n, hq, d] at the last n positions of k, v [L, hk, d] (causal);
    returns (out [n, hq, d], lse [n, hq])."""
    n, hq, _ = q.shape
    length, hk, _ = k.shape
    group = hq // hk
    qf = q.float().transpose(0, 1).unsqueeze(0)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    pos = torch.arange(length - n, length, device=q.device)[:, None]
    visible = torch.arange(length, device=q.device)[None, :] <= pos
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=visible, scale=scale)
    logits = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return out[0].transpose(0, 1), torch.logsumexp(logits, dim=-1)[0].transpose(0, 1)


def rel_l2(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


class History:
    """The K/V the test has fed each (sequence, layer), and the checks against it."""

    def __init__(self, attn):
        self.attn = attn
        self.m = attn.model
        self.dev = torch.device("cuda", attn.device)  # every tensor on attn's device
        self.kv = {}

    def create(self, seq_ids):
        for s in seq_ids:
            self.attn.create_sequence(s)
            self.start(s)

    def start(self, s, like=None, length=None):
        m, dev = self.m, self.dev
        for layer in range(m["num_layers"]):
            if like is None:
                empty = torch.empty(0, m["num_kv_heads"], m["head_dim"], dtype=m["dtype"],
                                    device=dev)
                self.kv[s, layer] = (empty, empty)
            else:
                k, v = self.kv[like, layer]
                self.kv[s, layer] = (k[:length], v[:length])

    def inputs(self, total):
        m, dev = self.m, self.dev
        return tuple(torch.randn(total, heads, m["head_dim"], dtype=m["dtype"], device=dev)
                     for heads in (m["num_qo_heads"], m["num_kv_heads"], m["num_kv_heads"]))

    def grow(self, seq_ids, counts, layer, k, v):
        row = 0
        for s, n in zip(seq_ids, counts):
            old_k, old_v = self.kv[s, layer]
            self.kv[s, layer] = (torch.cat([old_k, k[row:row + n]]),
                                 torch.cat([old_v, v[row:row + n]]))
            row += n

    def step(self, seq_ids, counts, in_place=False, deterministic=False):
        """One step, every layer through attention(), each output checked."""
        attn, m = self.attn, self.m
        attn.set_batch(seq_ids, counts)
        total = sum(counts)
        for layer in range(m["num_layers"]):
            q, k, v = self.inputs(total)
            self.grow(seq_ids, counts, layer, k, v)
            given = (q, k, v)
            if in_place:  # written straight into the region's buffers: nothing to copy
                given = (attn.q[:total], attn.k_new[:total], attn.v_new[:total])
                for buffer, values in zip(given, (q, k, v)):
                    buffer.copy_(values)
            attn.out.fill_(float("nan"))  # whatever attnd does not write fails the check
            attn.lse.fill_(float("nan"))
            torch.cuda.set_sync_debug_mode("error")  # a host synchronisation raises
            try:
                out, lse = attn.attention(layer, *given, deterministic=deterministic,
                                          return_lse=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert out.shape == (total, m["num_qo_heads"], m["head_dim"])
            assert out.dtype == m["dtype"] and lse.dtype == torch.float32
            assert out.device == lse.device == self.dev
            self.check(seq_ids, counts, layer, q, out.clone(), lse.clone())

    def check(self, seq_ids, counts, layer, q, out, lse):
        row = 0
        for s, n in zip(seq_ids, counts):
            k, v = self.kv[s, layer]
            ref_out, ref_lse = reference(q[row:row + n], k, v, self.m["sm_scale"])
            err = rel_l2(out[row:row + n], ref_out)
            where = f"seq {s} layer {layer} ({n} new of {len(k)})"
            assert err <= TOLERANCE[self.m["dtype"]], f"{where}: relative L2 error {err:.3g}"
            lse_err = float((lse[row:row + n] - ref_lse).abs().max())
            assert lse_err < 1e-2, f"{where}: lse error {lse_err:.3g}"
            row += n

    def lengths(self, s):
        return [len(self.kv[s, layer][0]) for layer in range(self.m["num_layers"])]


def test_prefill_then_decode_against_sdpa(attn):
    h = History(attn)
    seqs = [secrets.randbits(48) for _ in range(3)]
    h.create(seqs)
    try:
        h.step(seqs, [3, attn.model["page_size"] + 5, 40])  # Prefill
        for step in range(4):
            h.step(seqs, [1, 1, 1], in_place=step % 2 == 1, deterministic=step == 3)  # Decode
        h.step(seqs, [2, 1, 7])  # a mixed batch goes as Prefill
        for s in seqs:
            assert attn.sequence_lengths(s) == h.lengths(s)
    finally:
        for s in seqs:
            attn.release_sequence(s)


def test_fork_truncate_append(attn):
    h = History(attn)
    parent, child = secrets.randbits(48), secrets.randbits(48)
    h.create([parent])
    layers = attn.model["num_layers"]
    try:
        h.step([parent], [10])
        attn.fork_sequence(parent, child)
        h.start(child, like=parent)
        assert attn.sequence_lengths(child) == [10] * layers
        h.step([child], [1])  # the child attends the parent's K/V and its own token
        h.step([parent], [1])  # the parent does not see the child's
        attn.truncate_sequence(parent, 6)
        h.start(parent, like=parent, length=6)
        assert attn.sequence_lengths(parent) == [6] * layers
        h.step([parent], [1])
        attn.set_batch([parent, child], [2, 3])
        for layer in range(layers):
            _, k, v = h.inputs(5)
            attn.append(layer, k, v)
            h.grow([parent, child], [2, 3], layer, k, v)
        assert attn.sequence_lengths(parent) == h.lengths(parent) == [9] * layers
        assert attn.sequence_lengths(child) == h.lengths(child) == [14] * layers
        h.step([child, parent], [1, 1])  # what append wrote is attended
    finally:
        assert attn.release_sequence(child) >= 0
        assert attn.release_sequence(parent) >= 0


def test_attention_refuses_wrong_inputs(attn):
    m = attn.model
    s = secrets.randbits(48)
    attn.create_sequence(s)
    try:
        attn.set_batch([s], [2])
        q = torch.randn(3, m["num_qo_heads"], m["head_dim"], dtype=m["dtype"], device="cuda")
        k = torch.randn(2, m["num_kv_heads"], m["head_dim"], dtype=m["dtype"], device="cuda")
        with pytest.raises(ValueError, match="q: expected"):
            attn.attention(0, q, k, k)
        with pytest.raises(ValueError, match="k_new: expected"):
            attn.attention(0, q[:2], k.float(), k)
        assert attn.sequence_lengths(s) == [0] * m["num_layers"]  # nothing was sent
        with pytest.raises(ValueError, match="max_tokens"):
            attn.set_batch([s], [attn.max_tokens + 1])
    finally:
        attn.release_sequence(s)


def test_share_cuda_tensor_offsets_on_a_carved_allocation():
    base = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    handle, offset, size = share_cuda_tensor(base)
    assert len(handle) == 64 and offset % 512 == 0
    assert size == offset + base.untyped_storage().nbytes()
    view = base[4096:8192]
    assert share_cuda_tensor(view) == (handle, offset + 4096, size)
    floats = base[256:].view(torch.float32)[10:20]
    assert share_cuda_tensor(floats) == (handle, offset + 256 + 40, size)
    # Small tensors share one cudaMalloc block of the small pool: the offsets follow their
    # addresses, and each size ends at its own storage.
    a = torch.empty(1000, device="cuda")
    b = torch.empty(1000, device="cuda")
    (ha, oa, sa), (hb, ob, sb) = share_cuda_tensor(a), share_cuda_tensor(b)
    assert sa == oa + a.untyped_storage().nbytes() and sb == ob + b.untyped_storage().nbytes()
    if ha == hb:
        assert ob - oa == b.data_ptr() - a.data_ptr()
    with pytest.raises(ValueError, match="CUDA tensor"):
        share_cuda_tensor(torch.empty(4))
