// CUDA kernels of attnd, the one header the server includes: paged-KV append, batch decode
// (split-KV + merge), batch prefill, the merge of partial states, copies for graphs and a
// faulting kernel for tests. Each family lives in its own folder (params, kernel body, launcher);
// shared device and host helpers in common/.
//
// Host launchers only check arguments and dispatch; every launch goes on the caller's stream,
// and the caller makes the stream's device current (the kernels never pick a device). Pointers
// are device pointers unless a comment says host. Every launcher is CUDA-graph safe: what
// changes from step to step (lengths, page tables, the split plan, slot mappings) is read from
// device memory, and the grid depends only on the batch size passed in. Launchers return
// absl::Status: InvalidArgumentError naming the argument and its limit, InternalError with the
// CUDA error for a failed CUDA call.
#ifndef ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_
#define ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_

#include "kernels/cuda/append/append.h"
#include "kernels/cuda/common/paged_kv_args.h"
#include "kernels/cuda/convert/convert.h"
#include "kernels/cuda/copy/copy.h"
#include "kernels/cuda/decode/decode.h"
#include "kernels/cuda/fault/fault.h"
#include "kernels/cuda/merge/merge.h"
#include "kernels/cuda/prefill/prefill.h"

#endif  // ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_
