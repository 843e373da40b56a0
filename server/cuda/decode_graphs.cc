#include "server/cuda/decode_graphs.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/decode_plan.h"

namespace attnd {

absl::StatusOr<std::unique_ptr<DecodeGraphs>> DecodeGraphs::Capture(
    absl::Span<const int64_t> buckets, const kernels::cuda::PagedKv& kv,
    const kernels::AttentionOptions& options, const Workspaces& workspaces,
    cudaStream_t stream) {
  std::unique_ptr<DecodeGraphs> graphs(
      new DecodeGraphs(kv.pool, kv.shape, kv.scales, options, stream));
  if (buckets.empty()) return graphs;
  if (absl::Status s = graphs->AllocateArgs(buckets.back(), workspaces); !s.ok()) return s;
  for (bool deterministic : {false, true}) {
    for (int64_t bucket : buckets) {
      if (absl::Status s = graphs->CaptureOne(static_cast<int>(bucket), deterministic, workspaces);
          !s.ok())
        return s;
    }
  }
  return graphs;
}

absl::Status DecodeGraphs::AllocateArgs(int64_t max_bucket, const Workspaces& workspaces) {
  const auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  args_.slots = 256;
  args_.plan = align(args_.slots + static_cast<size_t>(max_bucket) * 8);
  args_.indices =
      align(args_.plan + static_cast<size_t>(workspaces.decode_layout().TotalInts()) * 4);
  args_.bytes =
      args_.indices + static_cast<size_t>(max_bucket * workspaces.max_pages_per_seq()) * 4;
  if (args_.bytes > UINT32_MAX) {  // the in-graph copy's ranges are 32-bit
    return absl::InvalidArgumentError(absl::StrCat(
        "graph arguments of ", args_.bytes, " bytes: lower --max_seq_len or the largest bucket"));
  }
  auto dev = AllocateDevice(args_.bytes, "graph arguments");
  if (!dev.ok()) return dev.status();
  args_dev_ = *std::move(dev);
  void* host = nullptr;
  ATTND_CUDA_RETURN(cudaMallocHost(&host, args_.bytes), "pinned graph arguments");
  args_host_.reset(host);
  std::memset(host, 0, args_.bytes);
  // Slots of padded entries stay -1 (the append skips them); replays refill only their own.
  std::fill_n(HostArg<int64_t>(args_.slots), max_bucket, int64_t{-1});
  cudaEvent_t uploaded = nullptr;
  ATTND_CUDA_RETURN(cudaEventCreateWithFlags(&uploaded, cudaEventDisableTiming), "event");
  args_uploaded_.reset(uploaded);
  bytes_ += args_.bytes;
  return absl::OkStatus();
}

absl::Status DecodeGraphs::CaptureOne(int bucket, bool deterministic,
                                      const Workspaces& workspaces) {
  const size_t es = kernels::DTypeSize(shape_.dtype);
  const size_t q_row = static_cast<size_t>(options_.num_qo_heads * shape_.head_dim) * es;
  const size_t kv_row = static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
  Graph g;
  g.bucket = bucket;
  g.deterministic = deterministic;
  for (auto [buffer, row] :
       {std::pair{&g.q, q_row}, std::pair{&g.out, q_row}, std::pair{&g.k, kv_row},
        std::pair{&g.v, kv_row}, std::pair{&g.lse, size_t{4} * options_.num_qo_heads}}) {
    auto b = AllocateDevice(row * static_cast<size_t>(bucket), "graph buffers");
    if (!b.ok()) return b.status();
    *buffer = *std::move(b);
    bytes_ += row * static_cast<size_t>(bucket);
  }
  // A valid plan for an all-padding batch: capture runs nothing, but the launchers' checks
  // pass.
  const std::vector<int32_t> no_keys(static_cast<size_t>(bucket) + 1, 0);
  const kernels::DecodePlanConfig& cfg = workspaces.decode_config(deterministic);
  int64_t plan_ints = 0;
  std::string error;
  if (!kernels::PlanDecode(no_keys.data(), no_keys.data(), bucket,
                           kernels::DecodeGridX(bucket, cfg), cfg, workspaces.decode_layout(),
                           HostArg<int32_t>(args_.plan), &plan_ints, &error)) {
    return absl::InternalError(absl::StrCat("graph plan for bucket ", bucket, ": ", error));
  }
  ATTND_CUDA_RETURN(cudaMemcpyAsync(args_dev_.get(), args_host_.get(), args_.bytes,
                                    cudaMemcpyHostToDevice, stream_),
                    "graph set-up");
  ATTND_CUDA_RETURN(cudaStreamSynchronize(stream_), "graph set-up");

  cudaGraph_t graph = nullptr;
  ATTND_CUDA_RETURN(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                    "begin graph capture");
  const absl::Status recorded = RecordLaunches(g, workspaces);
  const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = recorded.ok() && end == cudaSuccess
                            ? cudaGraphInstantiate(&exec, graph, 0)
                            : cudaSuccess;
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (!recorded.ok()) return Annotate(recorded, absl::StrCat("capture bucket ", bucket));
  ATTND_CUDA_RETURN(end, absl::StrCat("end graph capture, bucket ", bucket));
  ATTND_CUDA_RETURN(e, absl::StrCat("instantiate graph, bucket ", bucket));
  g.exec.reset(exec);
  graphs_.push_back(std::move(g));
  return absl::OkStatus();
}

// The nodes of one graph, in stream order: upload the argument block from pinned memory,
// record that the host may refill it, copy the inputs in, append, decode, copy the outputs out.
absl::Status DecodeGraphs::RecordLaunches(const Graph& g, const Workspaces& workspaces) {
  namespace kc = kernels::cuda;
  kc::AppendArgs append;
  append.kv = {pool_, shape_, 0, DeviceArg<int32_t>(kLayerOffset), scales_};
  append.k = g.k.get();
  append.v = g.v.get();
  append.k_token_stride = append.v_token_stride = shape_.num_kv_heads * shape_.head_dim;
  append.slot_mapping = DeviceArg<int64_t>(args_.slots);
  append.num_tokens = g.bucket;
  kc::DecodeArgs decode = workspaces.DecodeArgs(
      {pool_, shape_, 0, DeviceArg<int32_t>(kLayerOffset), scales_}, options_, g.bucket,
      g.deterministic,
      g.q.get(), g.out.get(), static_cast<float*>(g.lse.get()));
  decode.ws.plan = DeviceArg<int32_t>(args_.plan);
  decode.kv_indices = DeviceArg<int32_t>(args_.indices);
  const auto* copies = DeviceArg<kc::IndirectCopy>(kCopiesOffset);

  absl::Status s = kc::LaunchHostRangesCopy(HostArg<uint32_t>(kRangesOffset), args_host_.get(),
                                            args_dev_.get(), stream_);
  if (s.ok()) {
    s = Check(cudaEventRecordWithFlags(args_uploaded_.get(), stream_, cudaEventRecordExternal),
              "record the argument upload");
  }
  if (s.ok()) s = kc::LaunchIndirectCopies(copies, 3, stream_);
  if (s.ok()) s = Annotate(kc::LaunchAppendKv(append, stream_), "append kernel");
  if (s.ok()) s = Annotate(kc::LaunchBatchDecode(decode, stream_), "decode kernel");
  if (s.ok()) s = kc::LaunchIndirectCopies(copies + 3, 2, stream_);
  return s;
}

int DecodeGraphs::BucketFor(size_t batch, bool deterministic) const {
  for (const Graph& g : graphs_) {
    if (g.deterministic == deterministic && static_cast<size_t>(g.bucket) >= batch)
      return g.bucket;
  }
  return 0;
}

const DecodeGraphs::Graph* DecodeGraphs::Find(int bucket, bool deterministic) const {
  for (const Graph& g : graphs_) {
    if (g.deterministic == deterministic && g.bucket == bucket) return &g;
  }
  return nullptr;
}

// Whether the argument block already holds this call's page ids: the pool's table epoch is
// known and unchanged, and the batch lists the same tables (address and page count) in the
// same order as the last call. Remembers this call's tables for the next.
bool DecodeGraphs::SameTablesAsLastCall(const AppendWork& work) {
  const int64_t page = shape_.page_size;
  const auto table = [page](const BatchEntry& e) {
    return std::pair{e.page_table.data(), (e.start + e.num_new + page - 1) / page};
  };
  bool same = work.table_epoch != 0 && work.table_epoch == last_epoch_ &&
              work.entries.size() == last_tables_.size();
  for (size_t i = 0; same && i < work.entries.size(); ++i)
    same = last_tables_[i] == table(work.entries[i]);
  if (!same) {
    last_epoch_ = work.table_epoch;
    last_tables_.clear();
    for (const BatchEntry& e : work.entries) last_tables_.push_back(table(e));
  }
  return same;
}

absl::Status DecodeGraphs::Replay(int bucket, const AttentionWork& work,
                                  absl::Span<const int32_t> plan) {
  const Graph* g = Find(bucket, work.deterministic);
  if (g == nullptr || work.append.entries.size() > static_cast<size_t>(bucket)) {
    return absl::InternalError(absl::StrCat("decode graph: no graph of bucket ", bucket,
                                            " (deterministic=", work.deterministic, ") for ",
                                            work.append.entries.size(), " entries"));
  }
  if (plan.size() > (args_.indices - args_.plan) / 4) {
    return absl::InternalError(
        absl::StrCat("decode graph: a plan of ", plan.size(), " ints does not fit the block"));
  }
  // The previous replay's first node must have copied the pinned block before this call's
  // arguments go into it.
  ATTND_CUDA_RETURN(cudaEventSynchronize(args_uploaded_.get()), "graph arguments");
  // The layers of a step, and most steps, see the page tables of the call before: the ids
  // already on the device are kept (no host copy, no upload).
  const bool same_tables = SameTablesAsLastCall(work.append);
  BuildGpuBatch(work.append.entries, shape_.page_size, &batch_, HostArg<int32_t>(args_.indices),
                HostArg<int64_t>(args_.slots), same_tables);
  std::memcpy(HostArg<int32_t>(args_.plan), plan.data(), plan.size() * sizeof(int32_t));
  if (work.append.sync.wait != nullptr) {
    ATTND_CUDA_RETURN(
        cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(work.append.sync.wait), 0),
        "wait on the client's event");
  }
  WriteArguments(*g, work, plan.size(), /*upload_indices=*/!same_tables);
  return Check(cudaGraphLaunch(g->exec.get(), stream_), "graph replay");
}

// The rest of the block: the layer, where the copies go, padding, and what the first node
// uploads (the page ids only when they changed).
void DecodeGraphs::WriteArguments(const Graph& g, const AttentionWork& work, size_t plan_ints,
                                  bool upload_indices) {
  const size_t es = kernels::DTypeSize(shape_.dtype);
  const size_t n = work.append.entries.size();
  const size_t q_bytes = n * static_cast<size_t>(options_.num_qo_heads * shape_.head_dim) * es;
  const size_t kv_bytes = n * static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
  *HostArg<int32_t>(kLayerOffset) = static_cast<int32_t>(work.append.layer);
  auto* copies = HostArg<kernels::cuda::IndirectCopy>(kCopiesOffset);
  copies[0] = {work.q, g.q.get(), q_bytes};
  copies[1] = {work.append.k_new, g.k.get(), kv_bytes};
  copies[2] = {work.append.v_new, g.v.get(), kv_bytes};
  copies[3] = {g.out.get(), work.out, q_bytes};
  copies[4] = {g.lse.get(), work.lse,
               work.lse == nullptr ? 0 : n * static_cast<size_t>(options_.num_qo_heads) * 4};
  // Padded tokens: skipped by the append.
  int64_t* slots = HostArg<int64_t>(args_.slots);
  std::fill(slots + n, slots + g.bucket, int64_t{-1});
  uint32_t* ranges = HostArg<uint32_t>(kRangesOffset);
  ranges[0] = static_cast<uint32_t>(args_.plan + plan_ints * 4);
  ranges[1] = static_cast<uint32_t>(args_.indices);
  ranges[2] = upload_indices ? static_cast<uint32_t>(batch_.kv_indptr.back()) * 4 : 0;
}

}  // namespace attnd
