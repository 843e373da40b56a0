"""The Python client of attnd: one method per RPC, and DataStream for the bidirectional Stream.

Mirrors the C++ attnd::client::Client. Failed calls raise AttndError with the gRPC code and the
server's message (which names the offending field and the limit).
"""

import collections
import queue

import grpc

from ._protos import load as _load

pb, pb_grpc, health_pb, health_pb_grpc = _load()

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class AttndError(Exception):
    """A rejected call: `code` is a grpc.StatusCode, `message` the server's explanation.
    `tag`: for an answer on a native stream (NativeStream.receive), the refused request's tag;
    None otherwise."""

    def __init__(self, code, message, tag=None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.tag = tag

    @classmethod
    def from_code(cls, code, message, tag=None):
        """From a numeric gRPC status code, as the C ABI (libattnd_c.so) returns them."""
        return cls(_CODES.get(int(code), grpc.StatusCode.UNKNOWN), message, tag)


def _raise(error):
    raise AttndError(error.code(), error.details()) from None


def batch_items(items):
    """[(seq_id, num_new_tokens), ...] -> [BatchItem, ...]."""
    return [pb.BatchItem(seq_id=int(s), num_new_tokens=int(n)) for s, n in items]


def attention_request(device, layer, items, q, k_new, v_new, out, lse=None,
                      deterministic=False):
    """An AttentionRequest (Prefill/Decode); items are (seq_id, num_new_tokens) pairs."""
    request = pb.AttentionRequest(device=device, layer=layer, items=batch_items(items), q=q,
                                  k_new=k_new, v_new=v_new, out=out,
                                  deterministic=deterministic)
    if lse is not None:
        request.lse.CopyFrom(lse)
    return request


def append_request(device, layer, items, k_new, v_new):
    return pb.AppendRequest(device=device, layer=layer, items=batch_items(items), k_new=k_new,
                            v_new=v_new)


def _read_pem(option, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise AttndError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{option}={path}: cannot be read: {error.strerror}") from None


def _channel(target, tls_ca_file, tls_cert_file, tls_key_file, tls_server_name):
    """Plaintext unless a CA or a client certificate is given (as the C++ client)."""
    if not tls_ca_file and not tls_cert_file:
        return grpc.insecure_channel(target)
    if bool(tls_cert_file) != bool(tls_key_file):
        raise AttndError(grpc.StatusCode.INVALID_ARGUMENT,
                         "tls_cert_file and tls_key_file go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem("tls_ca_file", tls_ca_file) if tls_ca_file else None,
        private_key=_read_pem("tls_key_file", tls_key_file) if tls_key_file else None,
        certificate_chain=_read_pem("tls_cert_file", tls_cert_file) if tls_cert_file else None)
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return grpc.secure_channel(target, credentials, options=options)


class Client:
    """A connection to one attnd.

    target: "unix:///path/to.sock" or "host:port". timeout: default deadline of each call in
    seconds (None: none). connect_timeout: seconds to wait for the server at construction.

    TLS (attnd's TCP port with --tls_cert_file) is on when tls_ca_file or tls_cert_file is
    given: tls_ca_file, the PEM CA the server's certificate must chain to (None: gRPC's
    default roots); tls_cert_file + tls_key_file, this client's certificate for a server that
    requires one; tls_server_name, the name checked in the server's certificate when it is not
    the target's host. token is sent as `authorization: Bearer <token>` and client_name as
    `attnd-client: <name>` with every call, Streams included.
    """

    def __init__(self, target="unix:///tmp/attnd.sock", timeout=None, connect_timeout=5.0, *,
                 tls_ca_file=None, tls_cert_file=None, tls_key_file=None, tls_server_name=None,
                 token=None, client_name=None):
        self.target = target
        self.timeout = timeout
        self._metadata = tuple(
            (key, value) for key, value in (("authorization", token and f"Bearer {token}"),
                                            ("attnd-client", client_name)) if value)
        self._channel = _channel(target, tls_ca_file, tls_cert_file, tls_key_file,
                                 tls_server_name)
        if connect_timeout:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                self._channel.close()
                raise AttndError(grpc.StatusCode.UNAVAILABLE,
                                 f"cannot connect to {target} within {connect_timeout} s") from None
        self._stub = pb_grpc.AttentionStub(self._channel)
        self._health = health_pb_grpc.HealthStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=self._metadata)
        except grpc.RpcError as error:
            _raise(error)

    # ---- server ----
    def get_server_info(self, timeout=None):
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    def get_stats(self, timeout=None):
        return self._call(self._stub.GetStats, pb.GetStatsRequest(), timeout)

    # ---- this client's lease ----
    def get_lease(self, timeout=None):
        """What this client holds against its quotas, its limits and its lease timeout."""
        return self._call(self._stub.GetLease, pb.GetLeaseRequest(), timeout)

    def release_all(self, timeout=None):
        """Releases every sequence, region and event this client holds."""
        return self._call(self._stub.ReleaseAll, pb.ReleaseAllRequest(), timeout)

    def health(self, service="", timeout=None):
        """"SERVING", "NOT_SERVING", ... for "" (server), "attnd.v1.Attention" or
        "attnd.v1.Attention/device/<i>"."""
        response = self._call(self._health.Check, health_pb.HealthCheckRequest(service=service),
                              timeout)
        return health_pb.HealthCheckResponse.ServingStatus.Name(response.status)

    # ---- regions ----
    def register_host_region(self, name, shm_key, offset, byte_size, timeout=None):
        self._call(self._stub.RegisterHostRegion,
                   pb.RegisterHostRegionRequest(name=name, shm_key=shm_key, offset=offset,
                                                byte_size=byte_size), timeout)

    def register_cuda_region(self, name, ipc_handle, device, byte_size, timeout=None):
        self._call(self._stub.RegisterCudaRegion,
                   pb.RegisterCudaRegionRequest(name=name, ipc_handle=bytes(ipc_handle),
                                                device=device, byte_size=byte_size), timeout)

    def unregister_region(self, name, timeout=None):
        self._call(self._stub.UnregisterRegion, pb.UnregisterRegionRequest(name=name), timeout)

    def list_regions(self, timeout=None):
        return list(self._call(self._stub.ListRegions, pb.ListRegionsRequest(), timeout).regions)

    # ---- CUDA IPC events ----
    def register_cuda_event(self, name, ipc_handle, device, timeout=None):
        self._call(self._stub.RegisterCudaEvent,
                   pb.RegisterCudaEventRequest(name=name, ipc_handle=bytes(ipc_handle),
                                               device=device), timeout)

    def unregister_cuda_event(self, name, timeout=None):
        self._call(self._stub.UnregisterCudaEvent, pb.UnregisterCudaEventRequest(name=name),
                   timeout)

    # ---- sequences ----
    def create_sequence(self, device, seq_id, timeout=None):
        return self._call(self._stub.CreateSequence,
                          pb.CreateSequenceRequest(device=device, seq_id=seq_id), timeout)

    def fork_sequence(self, device, parent_id, child_id, timeout=None):
        return self._call(self._stub.ForkSequence,
                          pb.ForkSequenceRequest(device=device, parent_id=parent_id,
                                                 child_id=child_id), timeout)

    def truncate_sequence(self, device, seq_id, length, timeout=None):
        return self._call(self._stub.TruncateSequence,
                          pb.TruncateSequenceRequest(device=device, seq_id=seq_id,
                                                     length=length), timeout)

    def release_sequence(self, device, seq_id, timeout=None):
        """Returns the number of pages freed."""
        return self._call(self._stub.ReleaseSequence,
                          pb.ReleaseSequenceRequest(device=device, seq_id=seq_id),
                          timeout).freed_pages

    def get_sequence(self, device, seq_id, timeout=None):
        return self._call(self._stub.GetSequence,
                          pb.GetSequenceRequest(device=device, seq_id=seq_id), timeout)

    def list_sequences(self, device, timeout=None):
        return list(self._call(self._stub.ListSequences, pb.ListSequencesRequest(device=device),
                               timeout).sequences)

    # ---- data ----
    def append(self, request, timeout=None):
        return self._call(self._stub.Append, request, timeout)

    def prefill(self, request, timeout=None):
        return self._call(self._stub.Prefill, request, timeout)

    def decode(self, request, timeout=None):
        return self._call(self._stub.Decode, request, timeout)

    def export_kv(self, request, timeout=None):
        return self._call(self._stub.ExportKv, request, timeout)

    def import_kv(self, request, timeout=None):
        return self._call(self._stub.ImportKv, request, timeout)

    # ---- KV transfer between attnd processes (README "Across nodes") ----
    def grant_kv(self, device, seq_id, num_tokens=0, ttl_ms=0, max_pulls=0, timeout=None):
        """On the source: lets peers pull positions [0, num_tokens) of the sequence (0: its
        length). Returns a KvGrant; pass its `grant` bytes and this server's target to the
        destination's pull_kv."""
        return self._call(self._stub.GrantKv,
                          pb.GrantKvRequest(device=device, seq_id=seq_id, num_tokens=num_tokens,
                                            ttl_ms=ttl_ms, max_pulls=max_pulls), timeout)

    def revoke_kv(self, grant, timeout=None):
        self._call(self._stub.RevokeKv, pb.RevokeKvRequest(grant=grant), timeout)

    def pull_kv(self, source, grant, device, seq_id, layer_begin=0, layer_end=0, head_begin=0,
                head_end=0, num_tokens=0, dst_layer_begin=0, timeout=None):
        """On the destination: this server pulls the grant's KV (a layer and kv-head range; 0, 0:
        all) from the source attnd at `source` into a new or empty sequence. Returns a
        PullKvResponse (layer_lengths, bytes, requests, transfer_s)."""
        return self._call(self._stub.PullKv,
                          pb.PullKvRequest(source=source, grant=grant, device=device,
                                           seq_id=seq_id, layer_begin=layer_begin,
                                           layer_end=layer_end, head_begin=head_begin,
                                           head_end=head_end, num_tokens=num_tokens,
                                           dst_layer_begin=dst_layer_begin), timeout)

    # ---- fp8 KV pools ----
    def set_kv_scales(self, device, layer_begin, k_scales, v_scales, timeout=None):
        """Sets the dequantization scales of layers [layer_begin, layer_begin + len(k_scales))
        of an fp8 pool (model.kv_cache_dtype == KV_CACHE_DTYPE_FP8_E4M3); k_scales[i] and
        v_scales[i] are layer layer_begin + i's. Refused (FAILED_PRECONDITION) while any
        sequence on the device holds KV at one of those layers: set scales before traffic; and
        always for a model-dtype pool or a per-token one (KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN,
        whose scales the server computes as it appends)."""
        self._call(self._stub.SetKvScales,
                   pb.SetKvScalesRequest(device=device, layer_begin=layer_begin,
                                         k_scales=[float(k) for k in k_scales],
                                         v_scales=[float(v) for v in v_scales]), timeout)

    def open_stream(self, timeout=None):
        """A DataStream; `timeout` (seconds) bounds the stream's whole life."""
        return DataStream(self._stub.Stream, timeout, self._metadata)


_CLOSE = object()


class DataStream:
    """One open Stream. Answers come exactly once per request and in order, so it can be used
    synchronously (append/prefill/decode wait for their answer) or pipelined (send several,
    then receive their answers in order). A per-request error raises AttndError and leaves the
    stream open; a transport error ends it."""

    def __init__(self, stream_method, timeout, metadata=()):
        self._requests = queue.SimpleQueue()
        self._responses = stream_method(iter(self._requests.get, _CLOSE), timeout=timeout,
                                        metadata=metadata)
        self._next_tag = 1
        self._pending = collections.deque()
        self._closed = False

    def send(self, op, request):
        """Queues one request; op is "append", "prefill" or "decode". Returns its tag."""
        if self._closed:
            raise AttndError(grpc.StatusCode.FAILED_PRECONDITION, "stream is closed")
        tag = self._next_tag
        self._next_tag += 1
        self._requests.put(pb.StreamRequest(tag=tag, **{op: request}))
        self._pending.append(tag)
        return tag

    def receive(self):
        """The StreamResponse to the oldest request not yet answered (its own status is in
        .code/.message; see result())."""
        if not self._pending:
            raise AttndError(grpc.StatusCode.FAILED_PRECONDITION,
                             "no request is awaiting a response")
        try:
            response = next(self._responses)
        except grpc.RpcError as error:
            self._pending.clear()
            _raise(error)
        except StopIteration:
            self._pending.clear()
            raise AttndError(grpc.StatusCode.UNAVAILABLE, "stream ended by the server") from None
        expected = self._pending.popleft()
        if response.tag != expected:
            self.cancel()
            raise AttndError(grpc.StatusCode.INTERNAL,
                             f"stream response has tag {response.tag}, expected {expected}")
        return response

    @staticmethod
    def result(response):
        """The AppendResponse/AttentionResponse of a StreamResponse, or AttndError."""
        if response.code != 0:
            raise AttndError(_CODES.get(response.code, grpc.StatusCode.UNKNOWN), response.message)
        return getattr(response, response.WhichOneof("result"))

    def _round_trip(self, op, request):
        if self._pending:
            raise AttndError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{len(self._pending)} pipelined responses must be received first")
        self.send(op, request)
        return self.result(self.receive())

    def append(self, request):
        return self._round_trip("append", request)

    def prefill(self, request):
        return self._round_trip("prefill", request)

    def decode(self, request):
        return self._round_trip("decode", request)

    @property
    def pending(self):
        return len(self._pending)

    def close(self):
        """Half-closes the stream after reading (and dropping) answers still pending."""
        if self._closed:
            return
        while self._pending:
            self.receive()
        self._closed = True
        self._requests.put(_CLOSE)
        for _ in self._responses:  # wait for the server to end the call
            pass

    def cancel(self):
        self._closed = True
        self._pending.clear()
        self._responses.cancel()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.cancel()
