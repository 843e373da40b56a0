// One captured append + decode graph per (batch-size bucket, mode), and the replay of a
// planned decode batch through them. Inputs and outputs go through each graph's own buffers
// (the client's differ per call); the layer, the slot mapping, the page table and the plan are
// read from one device block of arguments, so one graph serves every layer and any lengths.
// The block is uploaded by the graph's first node from a pinned host block the host fills
// before each replay: a replay costs one cudaGraphLaunch and no copy call of its own.
#ifndef ATTND_SERVER_CUDA_DECODE_GRAPHS_H_
#define ATTND_SERVER_CUDA_DECODE_GRAPHS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cuda/common/paged_kv_args.h"
#include "kernels/paged_kv.h"
#include "server/cuda/cuda_check.h"
#include "server/cuda/workspaces.h"
#include "server/platform/backend.h"
#include "server/platform/gpu_batch.h"

namespace attnd {

class DecodeGraphs {
 public:
  // Captures every bucket's graph (ascending buckets) in both modes on `stream`, on the
  // device's worker at start-up. `kv` is the KV pool (its layer is ignored: the graphs read it
  // from their argument block; fp8 pools' scales from kv.scales); the graphs use
  // `workspaces`' decode partials and counters, so it must outlive them.
  static absl::StatusOr<std::unique_ptr<DecodeGraphs>> Capture(
      absl::Span<const int64_t> buckets, const kernels::cuda::PagedKv& kv,
      const kernels::AttentionOptions& options, const Workspaces& workspaces,
      cudaStream_t stream);
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;

  // The smallest bucket of the mode that holds `batch` entries; 0 when none does.
  int BucketFor(size_t batch, bool deterministic) const;
  size_t size() const { return graphs_.size(); }
  // Device and pinned memory the graphs hold, for the start-up log.
  size_t bytes() const { return bytes_; }

  // Replays the graph of (bucket, work.deterministic) for work.append.entries, whose decode
  // plan, made for the whole bucket, is `plan` (staged on the host). The stream waits on the
  // client's event, if any, before the replay reads inputs. Returns once the replay is
  // enqueued.
  absl::Status Replay(int bucket, const AttentionWork& work, absl::Span<const int32_t> plan);

 private:
  struct GraphExecDestroy {
    void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
  };
  struct Graph {
    int bucket = 0;
    bool deterministic = false;
    DeviceBuffer q, k, v, out, lse;
    std::unique_ptr<CUgraphExec_st, GraphExecDestroy> exec;  // last: destroyed first
  };
  // Byte offsets in the argument block: [layer][ranges][copies in (q, k, v) and out (out,
  // lse)] then the slot mapping, the plan and the page table at offsets set at capture.
  static constexpr size_t kLayerOffset = 0;
  static constexpr size_t kRangesOffset = 4;  // 3 x uint32: what the graph's first node copies
  static constexpr size_t kCopiesOffset = 16;
  struct ArgsLayout {
    size_t slots = 0, plan = 0, indices = 0, bytes = 0;
  };

  DecodeGraphs(void* pool, const kernels::KvCacheShape& shape, const float* scales,
               const kernels::AttentionOptions& options, cudaStream_t stream)
      : pool_(pool), shape_(shape), scales_(scales), options_(options), stream_(stream) {}

  absl::Status AllocateArgs(int64_t max_bucket, const Workspaces& workspaces);
  absl::Status CaptureOne(int bucket, bool deterministic, const Workspaces& workspaces);
  absl::Status RecordLaunches(const Graph& g, const Workspaces& workspaces);
  const Graph* Find(int bucket, bool deterministic) const;
  bool SameTablesAsLastCall(const AppendWork& work);
  void WriteArguments(const Graph& g, const AttentionWork& work, size_t plan_ints,
                      bool upload_indices);

  template <typename T>
  T* DeviceArg(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(args_dev_.get()) + offset);
  }
  template <typename T>
  T* HostArg(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(args_host_.get()) + offset);
  }

  // Constant after construction.
  void* const pool_;
  const kernels::KvCacheShape shape_;
  const float* const scales_;  // fp8 pools: the device scales the kernels read
  const kernels::AttentionOptions options_;
  const cudaStream_t stream_;
  ArgsLayout args_;
  DeviceBuffer args_dev_;
  PinnedBuffer args_host_;
  // Recorded by each replay once its first node has copied the pinned block: the host may
  // write the block again after it.
  Event args_uploaded_;
  std::vector<Graph> graphs_;  // all buckets of one mode, then of the other
  size_t bytes_ = 0;

  // Mutable state, of the replay in progress.
  GpuBatch batch_;
  // The page tables whose ids the argument block holds (see SameTablesAsLastCall).
  uint64_t last_epoch_ = 0;
  std::vector<std::pair<const int32_t*, int64_t>> last_tables_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_DECODE_GRAPHS_H_
