"""fp8 KV pools from Python: an attnd started with --kv_cache_dtype=fp8 reports its storage and
every layer's scales, set_kv_scales changes the scales of layers that hold no KV and is refused
(changing nothing) where a sequence holds some; a model-dtype attnd refuses scales, and so does
one with per-token scales (--kv_cache_dtype=fp8_per_token), which reports its storage."""

import grpc
import numpy as np
import pytest

import attnd_client as ac
from conftest import _Server, _attnd_binary, native_library_or_skip

LAYERS, KV, DIM = 2, 2, 128  # conftest.MODEL_FLAGS


def start(request, *flags):
    binary = _attnd_binary(native_library_or_skip())
    if binary is None:
        pytest.skip("no attnd binary (ATTND_BINARY)")
    server = _Server(binary, "cpu", flags)
    request.addfinalizer(server.stop)
    return server.target


@pytest.fixture(scope="module")
def fp8_target(request):
    return start(request, "--kv_cache_dtype=fp8", "--kv_scale_setters=*")


def scales(client):
    device = client.get_server_info().devices[0]
    return list(device.k_scales), list(device.v_scales)


def random_scales(rng, n):
    return [float(x) for x in np.float32(2.0 ** rng.uniform(-6, -1, n))]


def test_an_fp8_server_reports_its_storage_and_takes_scales_for_empty_layers(fp8_target):
    rng = np.random.default_rng()
    with ac.Client(fp8_target) as client:
        info = client.get_server_info()
        assert info.model.kv_cache_dtype == ac.pb.KV_CACHE_DTYPE_FP8_E4M3
        assert "fp8_kv" in info.features and "kv_scales" in info.features
        k, v = random_scales(rng, LAYERS), random_scales(rng, LAYERS)
        client.set_kv_scales(0, 0, k, v)
        assert scales(client) == (k, v)  # float32 on both sides: equal values


def test_scales_are_refused_where_a_sequence_holds_kv_and_nothing_changes(fp8_target):
    rng = np.random.default_rng()
    rows = 3 * KV * DIM
    with ac.Client(fp8_target) as client, ac.SharedMemoryRegion(4 * rows) as shm:
        client.register_host_region("kv", shm.key, 0, 4 * rows)
        client.create_sequence(0, 41)
        shm.write(0, ac.DTYPE_BFLOAT16, rng.standard_normal(rows))
        shm.write(2 * rows, ac.DTYPE_BFLOAT16, rng.standard_normal(rows))
        k = ac.tensor_ref("kv", 0, ac.DTYPE_BFLOAT16, (3, KV, DIM))
        v = ac.tensor_ref("kv", 2 * rows, ac.DTYPE_BFLOAT16, (3, KV, DIM))
        client.append(ac.append_request(0, 1, [(41, 3)], k, v))
        before = scales(client)
        with pytest.raises(ac.AttndError) as refused:
            client.set_kv_scales(0, 0, random_scales(rng, LAYERS), random_scales(rng, LAYERS))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "layer 1" in refused.value.message and "sequence 41" in refused.value.message
        assert scales(client) == before
        with pytest.raises(ac.AttndError) as uneven:
            client.set_kv_scales(0, 0, [1.0, 1.0], [1.0])
        assert uneven.value.code == grpc.StatusCode.INVALID_ARGUMENT
        client.set_kv_scales(0, 0, [0.25], [0.5])  # layer 0 holds nothing
        assert scales(client)[0][0] == 0.25 and scales(client)[1][0] == 0.5
        client.release_sequence(0, 41)
        client.unregister_region("kv")


def test_a_model_dtype_server_refuses_scales(request):
    with ac.Client(start(request, "--kv_scale_setters=*")) as client:
        assert client.get_server_info().model.kv_cache_dtype == ac.pb.KV_CACHE_DTYPE_MODEL
        with pytest.raises(ac.AttndError) as refused:
            client.set_kv_scales(0, 0, [0.5], [0.5])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "kv_cache_dtype" in refused.value.message


def test_a_per_token_server_reports_its_storage_and_refuses_scales_naming_it(request):
    target = start(request, "--kv_cache_dtype=fp8_per_token", "--kv_scale_setters=*")
    with ac.Client(target) as client:
        info = client.get_server_info()
        assert info.model.kv_cache_dtype == ac.pb.KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN
        assert "fp8_kv" in info.features and "fp8_kv_per_token" in info.features
        assert scales(client) == ([], [])
        with pytest.raises(ac.AttndError) as refused:
            client.set_kv_scales(0, 0, [0.5], [0.5])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "fp8_per_token" in refused.value.message
