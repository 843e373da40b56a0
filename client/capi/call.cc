#include "client/capi/call.h"

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "absl/strings/str_cat.h"

namespace attnd::capi {
namespace {

// The ABI's enums are the wire's numbers, so values pass through without a table.
static_assert(ATTND_DTYPE_FLOAT16 == static_cast<int>(v1::DTYPE_FLOAT16));
static_assert(ATTND_DTYPE_BFLOAT16 == static_cast<int>(v1::DTYPE_BFLOAT16));
static_assert(ATTND_DTYPE_FLOAT32 == static_cast<int>(v1::DTYPE_FLOAT32));
// The layout the Python binding mirrors with ctypes (x86-64 and aarch64 Linux, LP64); a change
// here is an ABI change and bumps attnd_abi_version.
static_assert(sizeof(attnd_tensor) == 56 && sizeof(attnd_item) == 16);
static_assert(sizeof(attnd_call) == 336 && offsetof(attnd_call, items) == 16 &&
              offsetof(attnd_call, q) == 32 && offsetof(attnd_call, deterministic) == 312);
static_assert(std::is_standard_layout_v<attnd_call>);

constexpr int32_t kMaxNdim = 4;

bool Given(const char* s) { return s != nullptr && s[0] != '\0'; }

absl::Status CheckTensor(const attnd_tensor& tensor, absl::string_view name) {
  if (!Given(tensor.region)) return absl::OkStatus();
  if (tensor.ndim < 0 || tensor.ndim > kMaxNdim) {
    return absl::InvalidArgumentError(
        absl::StrCat("call.", name, ".ndim is ", tensor.ndim, "; must be 0..", kMaxNdim));
  }
  return absl::OkStatus();
}

void FillTensor(const attnd_tensor& tensor, v1::TensorRef* ref) {
  ref->set_region(tensor.region);
  ref->set_offset(tensor.offset);
  // Unknown dtypes pass through: proto3 enums are open, and the server names the bad value.
  ref->set_dtype(static_cast<v1::DType>(tensor.dtype));
  google::protobuf::RepeatedField<uint64_t>* shape = ref->mutable_shape();
  shape->Reserve(tensor.ndim);
  for (int32_t d = 0; d < tensor.ndim; ++d) shape->AddAlreadyReserved(tensor.shape[d]);
}

// What AppendRequest and AttentionRequest share: device, layer, items, k_new, v_new, sync.
template <typename Request>
void FillCommon(const attnd_call& call, Request* request) {
  request->set_device(call.device);
  request->set_layer(call.layer);
  google::protobuf::RepeatedPtrField<v1::BatchItem>* items = request->mutable_items();
  items->Reserve(static_cast<int>(call.num_items));
  for (size_t i = 0; i < call.num_items; ++i) {
    v1::BatchItem* item = items->Add();
    item->set_seq_id(call.items[i].seq_id);
    item->set_num_new_tokens(call.items[i].num_new_tokens);
  }
  if (Given(call.k_new.region)) FillTensor(call.k_new, request->mutable_k_new());
  if (Given(call.v_new.region)) FillTensor(call.v_new, request->mutable_v_new());
  if (Given(call.wait_event) || Given(call.signal_event)) {
    v1::EventSync* sync = request->mutable_sync();
    if (Given(call.wait_event)) sync->set_wait_event(call.wait_event);
    if (Given(call.signal_event)) sync->set_signal_event(call.signal_event);
  }
}

}  // namespace

absl::Status ValidateCall(const attnd_call* call) {
  if (call == nullptr) return NullError("call");
  if (call->op != ATTND_OP_APPEND && call->op != ATTND_OP_PREFILL &&
      call->op != ATTND_OP_DECODE) {
    return absl::InvalidArgumentError(absl::StrCat(
        "call.op is ", call->op,
        "; must be ATTND_OP_APPEND (1), ATTND_OP_PREFILL (2) or ATTND_OP_DECODE (3)"));
  }
  if (call->items == nullptr && call->num_items > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("call.items is NULL but call.num_items is ", call->num_items));
  }
  // Repeated fields are int-indexed; the server's own limit (max_batch_size) is far lower.
  if (call->num_items > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("call.num_items is ", call->num_items, "; must be at most ", INT_MAX));
  }
  for (const auto& [tensor, name] : {std::pair{&call->k_new, "k_new"}, {&call->v_new, "v_new"}}) {
    if (absl::Status s = CheckTensor(*tensor, name); !s.ok()) return s;
  }
  // Append reads k_new and v_new only; its other tensors are never looked at.
  if (call->op == ATTND_OP_APPEND) return absl::OkStatus();
  for (const auto& [tensor, name] :
       {std::pair{&call->q, "q"}, {&call->out, "out"}, {&call->lse, "lse"}}) {
    if (absl::Status s = CheckTensor(*tensor, name); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void FillAppend(const attnd_call& call, v1::AppendRequest* request) {
  request->Clear();
  FillCommon(call, request);
}

void FillAttention(const attnd_call& call, v1::AttentionRequest* request) {
  request->Clear();
  FillCommon(call, request);
  if (Given(call.q.region)) FillTensor(call.q, request->mutable_q());
  if (Given(call.out.region)) FillTensor(call.out, request->mutable_out());
  if (Given(call.lse.region)) FillTensor(call.lse, request->mutable_lse());
  request->set_deterministic(call.deterministic != 0);
}

void FillStreamRequest(const attnd_call& call, v1::StreamRequest* request) {
  switch (call.op) {
    case ATTND_OP_APPEND:
      FillAppend(call, request->mutable_append());
      break;
    case ATTND_OP_PREFILL:
      FillAttention(call, request->mutable_prefill());
      break;
    default:
      FillAttention(call, request->mutable_decode());
      break;
  }
}

}  // namespace attnd::capi
