"""The native client (libattnd_c.so through ctypes) against a real attnd on host regions
(POSIX shared memory; the CPU backend): connect, server info, sequences, a prefill and
pipelined decodes checked against the fp64 reference on fresh random inputs with NaN-poisoned
outputs, and a refused call that leaves its stream usable.

Skipped (with the reason) only when the native library is absent; tests/python/run.sh builds
it and starts the attnd (conftest.py says where else an attnd can come from).
"""

import os
import secrets

import grpc
import numpy as np
import pytest

import attnd_client as ac
from attnd_client import _cabi
from attnd_client.native import OP_APPEND, OP_DECODE, OP_PREFILL, Call, NativeClient

DEVICE = 0


def _seq_ids(n):
    return [secrets.randbits(48) for _ in range(n)]


class Session:
    """A client, one shared-memory region with per-layer q/k/v/out/lse buffers, the client's
    copy of every sequence's K/V, and the reference check."""

    def __init__(self, target, max_tokens):
        self.seed = secrets.randbits(32)  # fresh inputs every run; printed on failure
        self.rng = np.random.default_rng(self.seed)
        self.client = NativeClient.connect(target)
        m = self.client.server_info().model
        self.model = m
        self.layers, self.hq, self.hk, self.d = (m.num_layers, m.num_qo_heads, m.num_kv_heads,
                                                 m.head_dim)
        self.dtype = m.dtype
        self.tolerance = {ac.DTYPE_FLOAT32: 1e-4, ac.DTYPE_FLOAT16: 2e-3}.get(m.dtype, 1e-2)
        es = ac.dtype_size(m.dtype)
        carve = ac.RegionAllocator(1 << 62)
        self.at = {}
        for layer in range(self.layers):
            for name, heads in (("q", self.hq), ("k_new", self.hk), ("v_new", self.hk),
                                ("out", self.hq)):
                self.at[name, layer] = carve.allocate(max_tokens * heads * self.d * es)
            self.at["lse", layer] = carve.allocate(max_tokens * self.hq * 4)
        self.shm = ac.SharedMemoryRegion(carve.used)
        self.region = f"py-native-{os.getpid()}-{secrets.token_hex(4)}"
        self.client.register_host_region(self.region, self.shm.key, 0, self.shm.size)
        self.kv = {}
        self.created = []

    def close(self):
        for s in self.created:
            try:
                self.client.release_sequence(DEVICE, s)
            except ac.AttndError:
                pass
        self.client.unregister_region(self.region)
        self.shm.close()
        self.client.close()

    def create(self, seq_ids):
        for s in seq_ids:
            self.client.create_sequence(DEVICE, s)
            self.created.append(s)
            for layer in range(self.layers):
                empty = np.zeros((0, self.hk, self.d))
                self.kv[s, layer] = (empty, empty)

    def specs(self, items, layer, lse=True):
        """The tensors of a call on `items` in layer `layer`'s buffers."""
        t = sum(n for _, n in items)

        def spec(name, heads):
            return self.region, self.at[name, layer], self.dtype, (t, heads, self.d)

        tensors = {"q": spec("q", self.hq), "k_new": spec("k_new", self.hk),
                   "v_new": spec("v_new", self.hk), "out": spec("out", self.hq)}
        if lse:
            tensors["lse"] = (self.region, self.at["lse", layer], ac.DTYPE_FLOAT32, (t, self.hq))
        return tensors

    def offsets(self, layer):
        return {name: self.at[name, layer] for name in ("q", "k_new", "v_new", "out", "lse")}

    def stage(self, items, layer, record=True):
        """Fresh q/k/v in layer `layer`'s buffers, NaN in its out/lse; returns q."""
        t = sum(n for _, n in items)
        q, k, v = (ac.round_to_dtype(self.rng.standard_normal((t, h, self.d)), self.dtype)
                   for h in (self.hq, self.hk, self.hk))
        for name, values in (("q", q), ("k_new", k), ("v_new", v)):
            self.shm.write(self.at[name, layer], self.dtype, values)
        self.shm.fill(self.at["out", layer], t * self.hq * self.d * ac.dtype_size(self.dtype),
                      0xFF)
        self.shm.fill(self.at["lse", layer], t * self.hq * 4, 0xFF)
        row = 0
        for s, n in items:
            if record:
                old_k, old_v = self.kv[s, layer]
                self.kv[s, layer] = (np.concatenate([old_k, k[row:row + n]]),
                                     np.concatenate([old_v, v[row:row + n]]))
            row += n
        return q

    def check(self, what, items, layer, q, lengths):
        t = sum(n for _, n in items)
        out = self.shm.read(self.at["out", layer], self.dtype, (t, self.hq, self.d))
        lse = self.shm.read(self.at["lse", layer], ac.DTYPE_FLOAT32, (t, self.hq))
        m = self.model
        row = 0
        for (s, n), length in zip(items, lengths):
            k, v = self.kv[s, layer]
            where = f"{what}, layer {layer}, seq {s} (seed {self.seed})"
            assert length == len(k), f"{where}: length {length}, expected {len(k)}"
            ref_out, ref_lse = ac.dense_attention_reference(
                q[row:row + n], k, v, ac.model_sm_scale(m), m.logits_soft_cap, m.window_left)
            err = ac.relative_l2_error(out[row:row + n], ref_out)
            assert err <= self.tolerance, f"{where}: relative L2 error {err:.3g}"
            lse_err = float(np.max(np.abs(lse[row:row + n] - ref_lse)))
            assert lse_err < 1e-2, f"{where}: lse error {lse_err:.3g}"
            row += n
        assert len(lengths) == len(items)


@pytest.fixture
def session(cpu_target):
    s = Session(cpu_target, max_tokens=64)
    yield s
    s.close()


def test_connect_and_server_info(cpu_target):
    with NativeClient.connect(cpu_target) as client:
        info = client.server_info()
        assert isinstance(info, ac.pb.ServerInfo)
        assert info.model.num_layers >= 1 and info.model.head_dim >= 1
        assert info.model.num_qo_heads % info.model.num_kv_heads == 0
        assert "host_regions" in info.features and "stream" in info.features
        assert any(d.device == DEVICE for d in info.devices)
        assert info.max_batch_size >= 1 and info.max_tokens_per_request >= 1
    assert _cabi.library().attnd_abi_version() == _cabi.ABI_VERSION
    with pytest.raises(ac.AttndError, match="closed"):
        client.server_info()


def test_connect_to_nothing_is_unavailable(native_lib, tmp_path):
    with pytest.raises(ac.AttndError) as error:
        NativeClient.connect(f"unix://{tmp_path}/none.sock", connect_timeout=0.2)
    assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_sequences(session):
    client, layers = session.client, session.layers
    parent, child, grandchild = _seq_ids(3)
    session.create([parent])
    assert client.get_sequence(DEVICE, parent) == [0] * layers
    with pytest.raises(ac.AttndError) as error:
        client.create_sequence(DEVICE, parent)
    assert error.value.code == grpc.StatusCode.ALREADY_EXISTS
    items = [(parent, 5)]
    for layer in range(layers):
        session.stage(items, layer, record=False)
        call = Call(OP_APPEND, DEVICE, items, layer=layer, k_new=session.specs(items, layer)[
            "k_new"], v_new=session.specs(items, layer)["v_new"])
        assert client.call(call) == [5]
    assert client.get_sequence(DEVICE, parent) == [5] * layers
    client.fork_sequence(DEVICE, parent, child)
    session.created.append(child)
    assert client.get_sequence(DEVICE, child) == [5] * layers
    client.truncate_sequence(DEVICE, parent, 2)
    assert client.get_sequence(DEVICE, parent) == [2] * layers
    assert client.get_sequence(DEVICE, child) == [5] * layers  # the fork is unaffected
    client.fork_sequence(DEVICE, parent, grandchild)
    session.created.append(grandchild)
    assert client.get_sequence(DEVICE, grandchild) == [2] * layers
    for s in (parent, child, grandchild):
        assert client.release_sequence(DEVICE, s) >= 0
        with pytest.raises(ac.AttndError) as error:
            client.get_sequence(DEVICE, s)
        assert error.value.code == grpc.StatusCode.NOT_FOUND and "seq_id" in error.value.message
    session.created.clear()


def test_prefill_then_pipelined_decodes(session):
    """A batched Prefill per layer (unary), then decode steps with every layer's call in flight
    on one NativeStream before the first answer is read; one Call per op, patched per call."""
    client, layers = session.client, session.layers
    prompts = [1, session.model.page_size + 3, 37]
    seqs = _seq_ids(len(prompts))
    session.create(seqs)
    items = list(zip(seqs, prompts))
    prefill = Call(OP_PREFILL, DEVICE, items, **session.specs(items, 0))
    for layer in range(layers):
        q = session.stage(items, layer)
        prefill.layer = layer
        prefill.set_offsets(**session.offsets(layer))
        session.check("prefill", items, layer, q, client.call(prefill))

    decode_items = [(s, 1) for s in seqs]
    decode = Call(OP_DECODE, DEVICE, decode_items, **session.specs(decode_items, 0))
    with client.open_stream() as stream:
        for step in range(3):
            sent = []
            for layer in range(layers):
                q = session.stage(decode_items, layer)
                decode.layer = layer
                decode.set_offsets(**session.offsets(layer))
                sent.append((stream.send(decode), layer, q))
            assert stream.pending == layers
            for tag, layer, q in sent:
                got, lengths = stream.receive()
                assert got == tag
                session.check(f"decode step {step}", decode_items, layer, q, lengths)
            assert stream.pending == 0
    for s, n in items:
        assert client.get_sequence(DEVICE, s) == [n + 3] * layers


def test_refused_call_names_seq_id_and_stream_survives(session):
    client = session.client
    (seq,) = _seq_ids(1)
    missing = seq + 1
    session.create([seq])
    items = [(seq, 4)]
    prefill = Call(OP_PREFILL, DEVICE, items, **session.specs(items, 0))
    q = session.stage(items, 0)
    session.check("prefill", items, 0, q, client.call(prefill))

    bad_items = [(missing, 1)]
    bad = Call(OP_DECODE, DEVICE, bad_items, **session.specs(bad_items, 0))
    with client.open_stream() as stream:
        tag = stream.send(bad)
        with pytest.raises(ac.AttndError) as error:
            stream.receive()
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert "seq_id" in error.value.message and str(missing) in error.value.message
        assert error.value.tag == tag and stream.pending == 0
        # The same stream carries the next call, answered and correct.
        good_items = [(seq, 1)]
        good = Call(OP_DECODE, DEVICE, good_items, **session.specs(good_items, 0))
        q = session.stage(good_items, 0)
        next_tag = stream.send(good)
        got, lengths = stream.receive()
        assert got == next_tag and next_tag != tag
        session.check("decode after a refusal", good_items, 0, q, lengths)
    # Unary: the same refusal, the same code.
    with pytest.raises(ac.AttndError) as error:
        client.call(bad)
    assert error.value.code == grpc.StatusCode.NOT_FOUND and str(missing) in error.value.message
    # Another refusal (a layer out of range), another code; the stream stays usable.
    with client.open_stream() as stream:
        wrong = Call(OP_DECODE, DEVICE, [(seq, 1)], layer=session.layers,
                     **session.specs([(seq, 1)], 0))
        stream.send(wrong)
        with pytest.raises(ac.AttndError) as error:
            stream.receive()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "layer" in error.value.message
        assert stream.pending == 0


def test_keyword_calls_and_closed_stream(session):
    client = session.client
    (seq,) = _seq_ids(1)
    session.create([seq])
    items = [(seq, 2)]
    q = session.stage(items, 0)
    lengths = client.call("prefill", device=DEVICE, items=items, **session.specs(items, 0))
    session.check("keyword prefill", items, 0, q, lengths)
    stream = client.open_stream()
    items = [(seq, 1)]
    q = session.stage(items, 0)
    stream.send("decode", device=DEVICE, items=items, **session.specs(items, 0, lse=False))
    tag, lengths = stream.receive()
    assert lengths == [3]
    stream.close()
    stream.close()  # idempotent
    with pytest.raises(ac.AttndError, match="closed"):
        stream.send("decode", device=DEVICE, items=items, **session.specs(items, 0))
    assert stream.pending == 0


def test_clients_see_only_their_own_and_release_all_gives_back_everything(cpu_target):
    seq_id = secrets.randbelow(1 << 62)
    with ac.Client(cpu_target, client_name="py-a") as a, ac.Client(cpu_target, client_name="py-b") as b:
        a.create_sequence(DEVICE, seq_id)
        lease = a.get_lease()
        assert lease.client.endswith("/py-a")
        assert lease.sequences == 1 and lease.lease_timeout_s > 0
        assert all(s.seq_id != seq_id for s in b.list_sequences(DEVICE))
        with pytest.raises(ac.AttndError) as refused:
            b.release_sequence(DEVICE, seq_id)
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        released = a.release_all()
        assert released.sequences == 1
        assert a.get_lease().sequences == 0


def test_native_clients_under_other_names_see_none_of_each_others_sequences(cpu_target):
    seq_id = secrets.randbelow(1 << 62)
    with NativeClient.connect(cpu_target, client_name="native-a") as a, \
            NativeClient.connect(cpu_target, client_name="native-b") as b:
        a.create_sequence(DEVICE, seq_id)
        a.get_sequence(DEVICE, seq_id)
        with pytest.raises(ac.AttndError) as refused:
            b.get_sequence(DEVICE, seq_id)
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        a.release_sequence(DEVICE, seq_id)
