// attnd_call (C) -> attnd.v1 requests: the checks only the C side can make, then the protos.
#ifndef ATTND_CLIENT_CAPI_CALL_H_
#define ATTND_CLIENT_CAPI_CALL_H_

#include "absl/status/status.h"
#include "attnd/v1/attention.pb.h"
#include "client/capi/internal.h"

namespace attnd::capi {

// INVALID_ARGUMENT naming the field for what C can get wrong and the server could never see:
// a NULL call, NULL items with num_items > 0, an unknown op, ndim outside 0..4 in a tensor the
// op reads. Everything else (limits, shapes, dtypes, names) is the server's to check.
absl::Status ValidateCall(const attnd_call* call);

// Fill* clear `request` and fill it from a validated call. A tensor whose region is NULL or ""
// is not given: its field stays unset (the server names it if the op needs it). NULL or ""
// events are none.
void FillAppend(const attnd_call& call, v1::AppendRequest* request);
void FillAttention(const attnd_call& call, v1::AttentionRequest* request);
// The op's member of the oneof; the tag is DataStream's to set.
void FillStreamRequest(const attnd_call& call, v1::StreamRequest* request);

}  // namespace attnd::capi

#endif  // ATTND_CLIENT_CAPI_CALL_H_
