"""KV transfer between two attnd processes from Python: the source grants a sequence, the
destination pulls it (whole, then half its kv heads into a server with half the heads), and what
arrived is compared byte for byte with the source's pages through ExportKv. Starts its own two
CPU attnd processes (UCX over tcp on loopback)."""

import os

import grpc
import numpy as np
import pytest

import attnd_client as ac
from conftest import _Server, _attnd_binary, native_library_or_skip

LAYERS, KV, DIM, TOKENS = 2, 2, 128, 37


@pytest.fixture(scope="module")
def servers(request):
    binary = _attnd_binary(native_library_or_skip())
    if binary is None:
        pytest.skip("no attnd binary (ATTND_BINARY)")
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    peers = [f"--kv_peers=uid:{os.geteuid()}", "--kv_sources=*"]
    source = _Server(binary, "cpu", peers)
    request.addfinalizer(source.stop)
    half = _Server(binary, "cpu", peers + ["--num_kv_heads=1", "--num_qo_heads=4"])
    request.addfinalizer(half.stop)
    dest = _Server(binary, "cpu", peers)
    request.addfinalizer(dest.stop)
    return source.target, dest.target, half.target


def export(client, seq_id, heads):
    nbytes = LAYERS * 2 * TOKENS * heads * DIM * 2
    with ac.SharedMemoryRegion(nbytes) as shm:
        shm.fill(0, nbytes, 0xA5)
        client.register_host_region("export", shm.key, 0, nbytes)
        ref = ac.tensor_ref("export", 0, ac.DTYPE_BFLOAT16, (LAYERS, 2, TOKENS, heads, DIM))
        client.export_kv(ac.pb.ExportKvRequest(seq_id=seq_id, layer_end=LAYERS, head_end=heads,
                                               num_tokens=TOKENS, dst=ref))
        client.unregister_region("export")
        return bytes(shm.buf[:nbytes])


def test_a_pulled_sequence_and_a_pulled_head_range_match_the_source(servers):
    source_target, dest_target, half_target = servers
    rng = np.random.default_rng()
    rows = TOKENS * KV * DIM
    with ac.Client(source_target) as src, ac.Client(dest_target) as dst, \
            ac.Client(half_target) as half, ac.SharedMemoryRegion(4 * rows) as shm:
        src.register_host_region("kv", shm.key, 0, 4 * rows)
        src.create_sequence(0, 1)
        for layer in range(LAYERS):
            shm.write(0, ac.DTYPE_BFLOAT16, rng.standard_normal(rows))
            shm.write(2 * rows, ac.DTYPE_BFLOAT16, rng.standard_normal(rows))
            k = ac.tensor_ref("kv", 0, ac.DTYPE_BFLOAT16, (TOKENS, KV, DIM))
            v = ac.tensor_ref("kv", 2 * rows, ac.DTYPE_BFLOAT16, (TOKENS, KV, DIM))
            src.append(ac.append_request(0, layer, [(1, TOKENS)], k, v))
        grant = src.grant_kv(0, 1, max_pulls=2)
        assert grant.num_tokens == TOKENS and len(grant.grant) == 16
        whole = dst.pull_kv(source_target, grant.grant, device=0, seq_id=5)
        assert list(whole.layer_lengths) == [TOKENS] * LAYERS
        assert whole.bytes == LAYERS * 2 * TOKENS * KV * DIM * 2
        assert export(dst, 5, KV) == export(src, 1, KV)
        part = half.pull_kv(source_target, grant.grant, device=0, seq_id=5, head_begin=1,
                            head_end=2)
        assert list(part.layer_lengths) == [TOKENS] * LAYERS
        # The source's head 1 of every (layer, K/V, token) is the half server's only head.
        full = np.frombuffer(export(src, 1, KV), np.uint16).reshape(LAYERS, 2, TOKENS, KV, DIM)
        got = np.frombuffer(export(half, 5, 1), np.uint16).reshape(LAYERS, 2, TOKENS, 1, DIM)
        assert np.array_equal(got[:, :, :, 0], full[:, :, :, 1])
        with pytest.raises(ac.AttndError) as refused:  # its two pulls are used
            dst.pull_kv(source_target, grant.grant, device=0, seq_id=6)
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
