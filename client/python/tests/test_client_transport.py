"""What attnd_client.Client sends besides requests: the token and client name as metadata on
every call, unary and Stream, and TLS options it cannot use refused at construction. A tiny
in-process gRPC server on a Unix socket records each call's metadata; no attnd is needed.
"""

from concurrent import futures

import grpc
import pytest

import attnd_client as ac
from attnd_client.client import pb, pb_grpc


class _MetadataEcho(pb_grpc.AttentionServicer):
    def __init__(self):
        self.seen = {}

    def GetServerInfo(self, request, context):
        self.seen = dict(context.invocation_metadata())
        return pb.ServerInfo()

    def Stream(self, request_iterator, context):
        self.seen = dict(context.invocation_metadata())
        for _ in request_iterator:
            pass
        return iter(())


@pytest.fixture
def echo(tmp_path):
    service = _MetadataEcho()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AttentionServicer_to_server(service, server)
    target = f"unix://{tmp_path}/echo.sock"
    server.add_insecure_port(target)
    server.start()
    yield target, service
    server.stop(None)


def test_a_unary_call_carries_the_token_and_the_client_name(echo):
    target, service = echo
    with ac.Client(target, token="s3cret", client_name="worker-3") as client:
        client.get_server_info()
    assert service.seen.get("authorization") == "Bearer s3cret"
    assert service.seen.get("attnd-client") == "worker-3"


def test_a_stream_carries_the_token_and_the_client_name(echo):
    target, service = echo
    with ac.Client(target, token="s3cret", client_name="worker-3") as client:
        client.open_stream().close()
    assert service.seen.get("authorization") == "Bearer s3cret"
    assert service.seen.get("attnd-client") == "worker-3"


def test_without_a_token_or_a_name_neither_is_sent(echo):
    target, service = echo
    with ac.Client(target) as client:
        client.get_server_info()
    assert "authorization" not in service.seen
    assert "attnd-client" not in service.seen


def test_an_unreadable_tls_file_is_refused_naming_its_option(tmp_path):
    with pytest.raises(ac.AttndError) as error:
        ac.Client("127.0.0.1:1", tls_ca_file=str(tmp_path / "missing.pem"))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tls_ca_file" in error.value.message
