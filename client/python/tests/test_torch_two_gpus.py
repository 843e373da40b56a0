"""AttndTorch on two GPUs: a client whose tensors all live on cuda:1 while torch's current device
is left at cuda:0 on purpose (FlashInfer's append_paged_kv_cache faulted there by taking the
current device's stream), and one model whose layers' attention runs on both devices, the
hidden state handed from cuda:0 to cuda:1 with .to(). Every output is checked against fp32 SDPA
on its own device (test_torch_gpu.History: inputs, NaN-poisoned outputs, the reference).

Skipped unless torch sees two CUDA devices and the attnd serves device 1 (and device 0 for the
split model): start it with --devices=0,1. The attnd is $ATTND_TARGET when set, else one started
here with --backend=cuda --devices=0,1 (conftest.py).

    ATTND_TARGET=unix:///tmp/attnd.sock python3 -m pytest client/python/tests/test_torch_two_gpus.py
"""

import gc
import secrets

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="fewer than two CUDA devices")

from attnd_client.torch import AttndTorch  # noqa: E402

from test_torch_gpu import History, sdpa_checkable_target  # noqa: E402

MAX_TOKENS = 512
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture(scope="module")
def served(request):
    """(target, the devices the attnd serves); skips unless it serves device 1."""
    target, info = sdpa_checkable_target(request, ["--devices=0,1"])
    devices = {d.device for d in info.devices}
    if 1 not in devices:
        pytest.skip(f"the attnd at {target} serves devices {sorted(devices)}, not 1 (start it "
                    "with --devices=0,1)")
    return target, devices


@pytest.fixture
def current_cuda0():
    """torch's current device is cuda:0 during the test, deliberately: a client of cuda:1
    must neither need nor change it."""
    previous = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield
    torch.cuda.set_device(previous)


def new_seqs(n):
    return [secrets.randbits(48) for _ in range(n)]


def prefill_then_decode(attn, h, seqs, decode_steps):
    h.step(seqs, [3, attn.model["page_size"] + 5, 40])  # Prefill
    for _ in range(decode_steps):
        h.step(seqs, [1] * len(seqs))  # Decode


def test_cuda1_client_prefill_then_decode_against_sdpa(served, current_cuda0):
    target, _ = served
    with AttndTorch.connect(target, device=1, max_tokens=MAX_TOKENS) as attn:
        assert attn.out.device == attn.lse.device == CUDA1
        h = History(attn)  # inputs, references and outputs all on cuda:1
        seqs = new_seqs(3)
        h.create(seqs)
        try:
            prefill_then_decode(attn, h, seqs, decode_steps=4)
            for s in seqs:
                assert attn.sequence_lengths(s) == h.lengths(s)
        finally:
            for s in seqs:
                attn.release_sequence(s)
        assert torch.cuda.current_device() == 0


def test_cuda1_client_allocates_nothing_on_cuda0(served, current_cuda0):
    target, _ = served
    gc.collect()  # nothing of earlier tests is freed on cuda:0 while we count
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    with AttndTorch.connect(target, device=1, max_tokens=MAX_TOKENS) as attn:
        h = History(attn)
        seqs = new_seqs(3)
        h.create(seqs)
        try:
            prefill_then_decode(attn, h, seqs, decode_steps=2)
        finally:
            for s in seqs:
                attn.release_sequence(s)
    torch.cuda.synchronize(1)
    assert torch.cuda.max_memory_allocated(0) == before, "something was allocated on cuda:0"
    assert torch.cuda.memory_allocated(0) == before


def split_step(stages, split, seq_ids, counts):
    """One step of a model whose layers below `split` run on stages[0] and the rest on
    stages[1], each stage an (AttndTorch, History): the set_batch of both, then every layer in
    order, its q the previous layer's output moved with .to() (so the hidden state crosses from
    cuda:0 to cuda:1 at the split), its k/v fresh; every output checked on its device."""
    for attn, _ in stages:
        attn.set_batch(seq_ids, counts)
    total = sum(counts)
    hidden = None
    for layer in range(stages[0][0].model["num_layers"]):
        attn, h = stages[0] if layer < split else stages[1]
        q, k, v = h.inputs(total)
        if hidden is not None:
            q = hidden.to(h.dev, copy=True)  # a copy: the next call rewrites attn.out
        h.grow(seq_ids, counts, layer, k, v)
        attn.out.fill_(float("nan"))  # whatever attnd does not write fails the check
        attn.lse.fill_(float("nan"))
        torch.cuda.set_sync_debug_mode("error")  # a host synchronisation raises
        try:
            out, lse = attn.attention(layer, q, k, v, return_lse=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.device == lse.device == h.dev
        h.check(seq_ids, counts, layer, q, out.clone(), lse.clone())
        hidden = out


def test_one_model_split_over_two_devices_against_sdpa(served):
    target, devices = served
    if 0 not in devices:
        pytest.skip(f"the attnd serves devices {sorted(devices)}, not 0")
    with AttndTorch.connect(target, device=0, max_tokens=MAX_TOKENS) as a0, \
            AttndTorch.connect(target, device=1, max_tokens=MAX_TOKENS) as a1:
        layers = a0.model["num_layers"]
        if layers < 2:
            pytest.skip("the attnd's model has one layer: nothing to split")
        split = (layers + 1) // 2  # layers 0..split-1 on cuda:0, the rest on cuda:1
        stages = [(a0, History(a0)), (a1, History(a1))]
        seqs = new_seqs(3)
        for _, h in stages:
            h.create(seqs)  # the same sequences on both devices, each with its layers' K/V
        try:
            split_step(stages, split, seqs, [3, a0.model["page_size"] + 5, 40])  # Prefill
            for _ in range(4):
                split_step(stages, split, seqs, [1, 1, 1])  # Decode
            split_step(stages, split, seqs, [2, 1, 7])  # a mixed batch goes as Prefill
            for attn, h in stages:
                for s in seqs:  # each device holds its own layers' tokens, none of the others'
                    assert attn.sequence_lengths(s) == h.lengths(s)
            assert a0.sequence_lengths(seqs[0])[split:] == [0] * (layers - split)
            assert a1.sequence_lengths(seqs[0])[:split] == [0] * split
        finally:
            for attn, _ in stages:
                for s in seqs:
                    attn.release_sequence(s)
