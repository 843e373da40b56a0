/* attnd's C ABI: the data path of the C++ client (client/client.h) for languages that load a
 * shared library (Python through ctypes, which releases the GIL during every call here). Control
 * RPCs are here too, so a caller needs no gRPC of its own.
 *
 * Every function returns 0 (OK) or a gRPC status code (3 INVALID_ARGUMENT, 5 NOT_FOUND, 14
 * UNAVAILABLE, ...) and, when `err` is not NULL, writes the message (NUL-terminated, cut to
 * err_len bytes) there. Handles are not thread-safe: one thread drives a stream at a time; a
 * client may be shared. */
#ifndef ATTND_CLIENT_CAPI_ATTND_C_H_
#define ATTND_CLIENT_CAPI_ATTND_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct attnd_client attnd_client;
typedef struct attnd_stream attnd_stream;

/* Element types, as attnd.v1.DType. */
enum { ATTND_DTYPE_FLOAT16 = 1, ATTND_DTYPE_BFLOAT16 = 2, ATTND_DTYPE_FLOAT32 = 3 };
/* Data operations of a stream. */
enum { ATTND_OP_APPEND = 1, ATTND_OP_PREFILL = 2, ATTND_OP_DECODE = 3 };

/* A tensor in a registered region: region NULL (or "") means "not given" (lse). */
typedef struct {
  const char* region;
  uint64_t offset; /* bytes from the region's start */
  int32_t dtype;   /* ATTND_DTYPE_* */
  int32_t ndim;    /* 0..4 */
  uint64_t shape[4];
} attnd_tensor;

typedef struct {
  uint64_t seq_id;
  uint32_t num_new_tokens;
} attnd_item;

/* One data call. Append reads k_new and v_new only. */
typedef struct {
  int32_t op; /* ATTND_OP_* */
  uint32_t device;
  uint32_t layer;
  const attnd_item* items;
  size_t num_items;
  attnd_tensor q, k_new, v_new, out, lse;
  int32_t deterministic;
  const char* wait_event;   /* NULL or "": none */
  const char* signal_event; /* NULL or "": none */
} attnd_call;

/* Version of this ABI; bumped on any incompatible change. */
int attnd_abi_version(void);

/* ---- Connection ---- */
/* connect_timeout_s: how long to wait for the channel (0: do not wait; negative or NaN: 3). */
int attnd_connect(const char* target, double connect_timeout_s, attnd_client** out, char* err,
                  size_t err_len);
/* The same, as a named client: token (NULL or "": none) is sent as `authorization: Bearer <token>`
 * (the server's --token_file names the client), client_name (NULL or "": none) as
 * `attnd-client`, one instance of the caller with its own lease and namespace. */
int attnd_connect_as(const char* target, double connect_timeout_s, const char* token,
                     const char* client_name, attnd_client** out, char* err, size_t err_len);
/* A stream keeps its client's connection alive: client and streams may be freed in any order. */
void attnd_client_free(attnd_client* client);
/* The ServerInfo message, serialized (attnd.v1.ServerInfo); *len is set to the full size even
 * when it exceeds cap (then nothing is copied and the call returns 8 RESOURCE_EXHAUSTED). */
int attnd_server_info(attnd_client* client, uint8_t* buf, size_t cap, size_t* len, char* err,
                      size_t err_len);

/* ---- Regions and events ---- */
int attnd_register_host_region(attnd_client* client, const char* name, const char* shm_key,
                               uint64_t offset, uint64_t byte_size, char* err, size_t err_len);
/* handle: the 64 raw bytes of a cudaIpcMemHandle_t. */
int attnd_register_cuda_region(attnd_client* client, const char* name, const void* handle,
                               uint32_t device, uint64_t byte_size, char* err, size_t err_len);
int attnd_unregister_region(attnd_client* client, const char* name, char* err, size_t err_len);
/* handle: the 64 raw bytes of a cudaIpcEventHandle_t. */
int attnd_register_cuda_event(attnd_client* client, const char* name, const void* handle,
                              uint32_t device, char* err, size_t err_len);
int attnd_unregister_cuda_event(attnd_client* client, const char* name, char* err,
                                size_t err_len);

/* ---- Sequences: `lengths` (may be NULL) receives up to cap per-layer lengths, *num_layers
 * the count the server has. ---- */
int attnd_create_sequence(attnd_client* client, uint32_t device, uint64_t seq_id, char* err,
                          size_t err_len);
int attnd_fork_sequence(attnd_client* client, uint32_t device, uint64_t parent_id,
                        uint64_t child_id, char* err, size_t err_len);
int attnd_truncate_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                            uint64_t length, char* err, size_t err_len);
int attnd_release_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                           uint64_t* freed_pages, char* err, size_t err_len);
int attnd_get_sequence(attnd_client* client, uint32_t device, uint64_t seq_id,
                       uint64_t* lengths, size_t cap, size_t* num_layers, char* err,
                       size_t err_len);

/* ---- fp8 KV pools: the scales of layers [layer_begin, layer_begin + n), k_scales[i] and
 * v_scales[i] for layer layer_begin + i. Refused (9 FAILED_PRECONDITION) while a sequence on
 * the device holds KV at one of those layers, and for a model-dtype or per-token pool. ---- */
int attnd_set_kv_scales(attnd_client* client, uint32_t device, uint32_t layer_begin,
                        const float* k_scales, const float* v_scales, size_t n, char* err,
                        size_t err_len);

/* ---- Unary data calls: wait for the answer; `lengths` (may be NULL) receives each item's
 * length after the call (cap entries at most). ---- */
int attnd_call_unary(attnd_client* client, const attnd_call* call, uint64_t* lengths, size_t cap,
                     char* err, size_t err_len);

/* ---- Stream: pipelined data calls. Send returns once the request is handed to the transport
 * (with a signal event, attnd answers once its work is enqueued); answers come back in order
 * through Receive. ---- */
int attnd_stream_open(attnd_client* client, attnd_stream** out, char* err, size_t err_len);
int attnd_stream_send(attnd_stream* stream, const attnd_call* call, uint64_t* tag, char* err,
                      size_t err_len);
/* Blocks for the oldest answer not yet received. Returns that request's own status (the tag is
 * set either way); a broken stream returns its transport error for every later call (tag 0).
 * *num_lengths: how many lengths the answer holds (0 on error); at most cap are copied. */
int attnd_stream_receive(attnd_stream* stream, uint64_t* tag, uint64_t* lengths, size_t cap,
                         size_t* num_lengths, char* err, size_t err_len);
size_t attnd_stream_pending(const attnd_stream* stream);
/* Receives what is pending, half-closes and frees the stream; returns the final status.
 * NULL: nothing to do, 0. */
int attnd_stream_close(attnd_stream* stream, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* ATTND_CLIENT_CAPI_ATTND_C_H_ */
