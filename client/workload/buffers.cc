#include "client/workload/buffers.h"

#include <sys/mman.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "client/tensor.h"

namespace attnd::workload {
namespace {

// The shm object's name, for the signal handler: an interrupted run must not leave its memory
// behind in /dev/shm (the RAII owner never runs when a signal kills the process).
char g_shm_key[256] = {0};

void UnlinkAndReraise(int sig) {
  if (g_shm_key[0] != '\0') shm_unlink(g_shm_key);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// Offsets of the slots in a region of `alloc`'s capacity.
absl::Status Lay(const Model& model, const BufferPlan& plan, client::RegionAllocator& alloc,
                 Slot& main, std::vector<Slot>& bench) {
  const int64_t es = model.element_size();
  auto take = [&](uint64_t bytes, uint64_t* offset) -> absl::Status {
    absl::StatusOr<uint64_t> at = alloc.Allocate(std::max<uint64_t>(bytes, 1));
    if (!at.ok()) return at.status();
    *offset = *at;
    return absl::OkStatus();
  };
  auto slot = [&](Slot& s, int64_t tokens, bool inputs) -> absl::Status {
    s.tokens = tokens;
    if (inputs) {
      if (auto st = take(tokens * model.q_row() * es, &s.q); !st.ok()) return st;
      if (auto st = take(tokens * model.kv_row() * es, &s.k); !st.ok()) return st;
      if (auto st = take(tokens * model.kv_row() * es, &s.v); !st.ok()) return st;
    }
    if (auto st = take(tokens * model.q_row() * es, &s.out); !st.ok()) return st;
    return take(tokens * model.qo_heads * sizeof(float), &s.lse);
  };
  if (auto st = slot(main, plan.main_tokens, true); !st.ok()) return st;
  bench.assign(plan.bench_batch > 0 ? plan.pipeline : 0, Slot());
  for (size_t i = 0; i < bench.size(); ++i) {
    if (auto st = slot(bench[i], plan.bench_batch, i == 0); !st.ok()) return st;
    bench[i].q = bench[0].q;
    bench[i].k = bench[0].k;
    bench[i].v = bench[0].v;
  }
  return absl::OkStatus();
}

}  // namespace

BufferPlan PlanBuffers(const Model& model, const WorkloadOptions& options) {
  const int64_t decode_batch = std::min<int64_t>(options.sequences + 1, model.max_batch);
  BufferPlan plan;
  plan.bench_batch = std::min<int64_t>(options.bench_batch, model.max_batch);
  plan.main_tokens = std::min<int64_t>(
      model.max_tokens,
      std::max<int64_t>({options.prefill_tokens, decode_batch, plan.bench_batch, 2048}));
  plan.pipeline = std::max<int64_t>(model.layers, 4);
  return plan;
}

absl::StatusOr<std::unique_ptr<Buffers>> Buffers::Create(const Model& model, const BufferPlan& plan,
                                                         absl::string_view shm_prefix,
                                                         bool unlink_on_signal) {
  Slot main;
  std::vector<Slot> bench;
  client::RegionAllocator sizing(~uint64_t{0});
  if (auto st = Lay(model, plan, sizing, main, bench); !st.ok()) return st;
  const uint64_t bytes = sizing.used();

  absl::StatusOr<std::unique_ptr<client::SharedMemoryBuffer>> shm =
      client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey(shm_prefix), bytes);
  if (!shm.ok()) return shm.status();
  client::RegionAllocator alloc(bytes);
  if (auto st = Lay(model, plan, alloc, main, bench); !st.ok()) return st;
  if (unlink_on_signal) {
    std::snprintf(g_shm_key, sizeof(g_shm_key), "%s", (*shm)->key().c_str());
    for (int sig : {SIGINT, SIGTERM, SIGPIPE, SIGHUP}) std::signal(sig, UnlinkAndReraise);
  }
  return std::unique_ptr<Buffers>(new Buffers(model, main, std::move(bench), *std::move(shm)));
}

Buffers::Buffers(const Model& model, Slot main, std::vector<Slot> bench,
                 std::unique_ptr<client::SharedMemoryBuffer> shm)
    : dtype_(model.dtype),
      q_row_(model.q_row()),
      qo_heads_(model.qo_heads),
      main_(main),
      bench_(std::move(bench)),
      shm_(std::move(shm)) {}

Buffers::~Buffers() {
  if (key() == g_shm_key) g_shm_key[0] = '\0';
}

void Buffers::Write(uint64_t offset, absl::Span<const float> values) {
  client::EncodeFloats(dtype_, values, base() + offset);
}

void Buffers::Poison(const Slot& slot, int64_t tokens) {
  // All-ones bytes are a NaN in fp32, fp16 and bf16 alike: an output the server skips cannot
  // pass the check by accident.
  std::memset(base() + slot.out, 0xff, tokens * q_row_ * client::DTypeSize(dtype_));
  std::memset(base() + slot.lse, 0xff, tokens * qo_heads_ * sizeof(float));
}

std::vector<float> Buffers::ReadOut(const Slot& slot, int64_t tokens) const {
  std::vector<float> out(tokens * q_row_);
  client::DecodeFloats(dtype_, base() + slot.out, absl::MakeSpan(out));
  return out;
}

std::vector<float> Buffers::ReadLse(const Slot& slot, int64_t tokens) const {
  std::vector<float> lse(tokens * qo_heads_);
  std::memcpy(lse.data(), base() + slot.lse, lse.size() * sizeof(float));
  return lse;
}

}  // namespace attnd::workload
