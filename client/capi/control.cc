// The control half of the C ABI: connecting, server info, regions, events and sequences. One
// RPC each, straight through to attnd::client::Client.
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/capi/internal.h"

using attnd::capi::Guard;
using attnd::capi::NullError;

namespace {

// Bumped on any incompatible change to attnd_c.h.
constexpr int kAbiVersion = 2;  // 2: attnd_connect_as
// Raw bytes of a cudaIpcMemHandle_t and of a cudaIpcEventHandle_t.
constexpr size_t kIpcHandleBytes = 64;

}  // namespace

extern "C" {

int attnd_abi_version(void) { return kAbiVersion; }

int attnd_connect(const char* target, double connect_timeout_s, attnd_client** out, char* err,
                  size_t err_len) {
  return attnd_connect_as(target, connect_timeout_s, nullptr, nullptr, out, err, err_len);
}

int attnd_connect_as(const char* target, double connect_timeout_s, const char* token,
                     const char* client_name, attnd_client** out, char* err, size_t err_len) {
  if (out != nullptr) *out = nullptr;
  return Guard(err, err_len, [&]() -> absl::Status {
    if (target == nullptr) return NullError("target");
    if (out == nullptr) return NullError("out");
    // Also refuses NaN, which would otherwise become an undefined deadline.
    if (!(connect_timeout_s >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "connect_timeout_s is ", connect_timeout_s, "; must be >= 0 (0: do not wait)"));
    }
    attnd::client::ClientOptions options;
    options.connect_timeout = absl::Seconds(connect_timeout_s);
    if (token != nullptr) options.token = token;
    if (client_name != nullptr) options.client_name = client_name;
    auto client = attnd::client::Client::Connect(target, options);
    if (!client.ok()) return client.status();
    auto handle = std::make_unique<attnd_client>();
    handle->client = *std::move(client);
    *out = handle.release();
    return absl::OkStatus();
  });
}

void attnd_client_free(attnd_client* client) {
  // Destructors do not throw; the guard is for the contract, not an expected path.
  try {
    delete client;
  } catch (...) {
  }
}

int attnd_server_info(attnd_client* client, uint8_t* buf, size_t cap, size_t* len, char* err,
                      size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (len == nullptr) return NullError("len");
    if (buf == nullptr && cap > 0) {
      return absl::InvalidArgumentError(absl::StrCat("buf is NULL but cap is ", cap));
    }
    auto info = client->client->GetServerInfo();
    if (!info.ok()) return info.status();
    const size_t size = info->ByteSizeLong();
    *len = size;
    if (size > cap) {
      return absl::ResourceExhaustedError(
          absl::StrCat("ServerInfo is ", size, " bytes; buf holds ", cap));
    }
    if (!info->SerializeToArray(buf, static_cast<int>(size))) {
      return absl::InternalError("cannot serialize ServerInfo");
    }
    return absl::OkStatus();
  });
}

int attnd_register_host_region(attnd_client* client, const char* name, const char* shm_key,
                               uint64_t offset, uint64_t byte_size, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (name == nullptr) return NullError("name");
    if (shm_key == nullptr) return NullError("shm_key");
    return client->client->RegisterHostRegion(name, shm_key, offset, byte_size);
  });
}

int attnd_register_cuda_region(attnd_client* client, const char* name, const void* handle,
                               uint32_t device, uint64_t byte_size, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (name == nullptr) return NullError("name");
    if (handle == nullptr) return NullError("handle");
    return client->client->RegisterCudaRegion(
        name, absl::string_view(static_cast<const char*>(handle), kIpcHandleBytes), device,
        byte_size);
  });
}

int attnd_unregister_region(attnd_client* client, const char* name, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (name == nullptr) return NullError("name");
    return client->client->UnregisterRegion(name);
  });
}

int attnd_register_cuda_event(attnd_client* client, const char* name, const void* handle,
                              uint32_t device, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (name == nullptr) return NullError("name");
    if (handle == nullptr) return NullError("handle");
    return client->client->RegisterCudaEvent(
        name, absl::string_view(static_cast<const char*>(handle), kIpcHandleBytes), device);
  });
}

int attnd_unregister_cuda_event(attnd_client* client, const char* name, char* err,
                                size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (name == nullptr) return NullError("name");
    return client->client->UnregisterCudaEvent(name);
  });
}

int attnd_create_sequence(attnd_client* client, uint32_t device, uint64_t seq_id, char* err,
                          size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    return client->client->CreateSequence(device, seq_id).status();
  });
}

int attnd_fork_sequence(attnd_client* client, uint32_t device, uint64_t parent_id,
                        uint64_t child_id, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    return client->client->ForkSequence(device, parent_id, child_id).status();
  });
}

int attnd_truncate_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                            uint64_t length, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    return client->client->TruncateSequence(device, seq_id, length).status();
  });
}

int attnd_set_kv_scales(attnd_client* client, uint32_t device, uint32_t layer_begin,
                        const float* k_scales, const float* v_scales, size_t n, char* err,
                        size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (n > 0 && k_scales == nullptr) return NullError("k_scales");
    if (n > 0 && v_scales == nullptr) return NullError("v_scales");
    return client->client->SetKvScales(device, layer_begin, absl::MakeConstSpan(k_scales, n),
                                       absl::MakeConstSpan(v_scales, n));
  });
}

int attnd_release_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                           uint64_t* freed_pages, char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    absl::StatusOr<uint64_t> freed = client->client->ReleaseSequence(device, seq_id);
    if (!freed.ok()) return freed.status();
    if (freed_pages != nullptr) *freed_pages = *freed;
    return absl::OkStatus();
  });
}

int attnd_get_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                       uint64_t* lengths, size_t cap, size_t* num_layers, char* err,
                       size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    auto info = client->client->GetSequence(device, seq_id);
    if (!info.ok()) return info.status();
    attnd::capi::CopyOut(info->layer_lengths(), lengths, cap);
    if (num_layers != nullptr) *num_layers = static_cast<size_t>(info->layer_lengths_size());
    return absl::OkStatus();
  });
}

}  // extern "C"
