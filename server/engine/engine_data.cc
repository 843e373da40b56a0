// The engine's data calls: Append, Prefill and Decode. On the calling thread: limits, events and
// tensors are checked and resolved. On the device's worker: the batch is checked against the
// pool, planned once by the backend, its pages reserved (all or nothing), then launched.
#include <initializer_list>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"
#include "server/engine/limits.h"

namespace attnd {
namespace {

// The tensors of one attention request, resolved and bounds-checked.
struct AttentionTensors {
  ResolvedTensor q, k, v, out, lse;
  bool has_lse = false;
};

absl::Status CheckOutputsDoNotAliasInputs(const AttentionTensors& t) {
  const std::pair<const ResolvedTensor*, const char*> inputs[] = {
      {&t.q, "q"}, {&t.k, "k_new"}, {&t.v, "v_new"}};
  for (auto [output, out_name] : {std::pair{&t.out, "out"}, std::pair{&t.lse, "lse"}}) {
    if (output == &t.lse && !t.has_lse) continue;
    for (auto [input, in_name] : inputs) {
      if (output->Overlaps(*input))
        return absl::InvalidArgumentError(
            absl::StrCat(out_name, ": overlaps ", in_name, "; outputs must not alias inputs"));
    }
  }
  if (t.has_lse && t.out.Overlaps(t.lse)) return absl::InvalidArgumentError("lse: overlaps out");
  return absl::OkStatus();
}

std::vector<BatchEntry> EntriesOf(const PreparedAppend& prepared) {
  std::vector<BatchEntry> entries;
  entries.reserve(prepared.sequences.size());
  for (size_t i = 0; i < prepared.sequences.size(); ++i)
    entries.push_back({absl::MakeConstSpan(prepared.sequences[i]->pages), prepared.starts[i],
                       prepared.num_new[i]});
  return entries;
}

// Checked when the call's turn comes on the device, before anything changes: a call whose
// client gave up must not be applied (a retry after DEADLINE_EXCEEDED would append twice).
absl::Status CheckStillWanted(const CallLife& life) {
  if (absl::Now() > life.deadline)
    return absl::DeadlineExceededError(
        "deadline: the call expired while queued for the device; nothing was changed");
  if (life.is_cancelled && life.is_cancelled())
    return absl::CancelledError(
        "the call was cancelled while queued for the device; nothing was changed");
  return absl::OkStatus();
}

// Host memory is read and written by the CPU: if a client shrank a region's shared-memory object
// meanwhile, the guard (server/regions/host_guard.h) turned the region into zeros instead of
// letting the server die. Checked after the work: such a call is taken back and refused.
absl::Status CheckNotDamaged(std::initializer_list<const ResolvedTensor*> tensors) {
  for (const ResolvedTensor* t : tensors) {
    const auto* host = dynamic_cast<const HostRegion*>(t->region.get());
    if (host != nullptr && host->damaged())
      return absl::FailedPreconditionError(absl::StrCat(
          "region '", host->name(), "': its shared-memory object shrank under attnd while the "
          "call read or wrote it; nothing was appended, outputs are not valid; unregister and "
          "register the region again"));
  }
  return absl::OkStatus();
}

DataResult LengthsOf(const PreparedAppend& prepared) {
  DataResult result;
  result.lengths.reserve(prepared.starts.size());
  for (size_t i = 0; i < prepared.starts.size(); ++i)
    result.lengths.push_back(static_cast<uint64_t>(prepared.starts[i] + prepared.num_new[i]));
  return result;
}

}  // namespace

void Engine::Append(AppendCall call, Reply<DataResult> reply, RequestTrace* trace) {
  auto device_or = FindDevice(call.device);
  if (!device_or.ok()) return std::move(reply)(device_or.status());
  Device* device = *device_or;
  if (absl::Status s = CheckLayer(call.layer, config_); !s.ok()) return std::move(reply)(s);
  auto total = CheckItems(call.items, config_, /*decode=*/false);
  if (!total.ok()) return std::move(reply)(total.status());
  const ModelShape& m = config_.model;
  const uint64_t kv_shape[] = {*total, static_cast<uint64_t>(m.num_kv_heads),
                               static_cast<uint64_t>(m.head_dim)};
  const Placement placement = platform_->PlacementFor(device->id);
  const uint32_t owner = call.client.id;
  auto k = ResolveTensor(regions_, call.k_new, "k_new", m.dtype, kv_shape, placement, owner);
  if (!k.ok()) return std::move(reply)(k.status());
  auto v = ResolveTensor(regions_, call.v_new, "v_new", m.dtype, kv_shape, placement, owner);
  if (!v.ok()) return std::move(reply)(v.status());
  auto sync = ResolveEvents(call.sync, *device, call.client);
  if (!sync.ok()) return std::move(reply)(sync.status());
  metrics_->RecordBatch("Append", static_cast<int64_t>(call.items.size()));
  Post<DataResult>(
      device, std::move(reply),
      [this, layer = int64_t{call.layer}, items = std::move(call.items), k = *std::move(k),
       v = *std::move(v), total = *total, sync = *std::move(sync), life = std::move(call.life),
       owner, trace](Device& d) -> absl::StatusOr<DataResult> {
        if (absl::Status s = CheckStillWanted(life); !s.ok()) return s;
        auto prepared = d.pool->PrepareAppend(layer, items, owner);
        if (!prepared.ok()) return prepared.status();
        auto copies = d.pool->CommitAppend(*prepared);
        if (!copies.ok()) return copies.status();
        PublishPoolState(d);
        AppendWork work{layer, EntriesOf(*prepared), k.data, v.data, {sync.wait, sync.signal},
                        d.pool->table_epoch()};
        absl::Status s = d.backend->CopyPages(*copies);
        if (s.ok()) {
          auto launched = d.backend->Append(work);
          s = launched.status();
          if (launched.ok() && trace != nullptr) trace->enqueued = launched->enqueued;
        }
        // Replying at once (a signal event): the client memory stays mapped until the GPU is done.
        if (s.ok() && sync.signal != nullptr) s = KeepUntilDone(d, std::tuple{k, v, sync.owners});
        if (!s.ok())
          return MarkFaulted(d, s, absl::StrCat("Append layer=", layer, " items=", items.size()));
        if (absl::Status damaged = CheckNotDamaged({&k, &v}); !damaged.ok()) {
          d.pool->UndoAppend(*prepared);
          PublishPoolState(d);
          return damaged;
        }
        metrics_->AddTokens(d.index, static_cast<int64_t>(total), 0);
        return LengthsOf(*prepared);
      },
      trace);
}

void Engine::Prefill(AttentionCall call, Reply<DataResult> reply, RequestTrace* trace) {
  Attention(std::move(call), /*decode=*/false, std::move(reply), trace);
}

void Engine::Decode(AttentionCall call, Reply<DataResult> reply, RequestTrace* trace) {
  Attention(std::move(call), /*decode=*/true, std::move(reply), trace);
}

void Engine::Attention(AttentionCall call, bool decode, Reply<DataResult> reply,
                       RequestTrace* trace) {
  auto device_or = FindDevice(call.device);
  if (!device_or.ok()) return std::move(reply)(device_or.status());
  Device* device = *device_or;
  if (absl::Status s = CheckLayer(call.layer, config_); !s.ok()) return std::move(reply)(s);
  auto total = CheckItems(call.items, config_, decode);
  if (!total.ok()) return std::move(reply)(total.status());
  auto sync = ResolveEvents(call.sync, *device, call.client);
  if (!sync.ok()) return std::move(reply)(sync.status());

  const uint32_t owner = call.client.id;
  const ModelShape& m = config_.model;
  const uint64_t qo = static_cast<uint64_t>(m.num_qo_heads);
  const uint64_t kv = static_cast<uint64_t>(m.num_kv_heads);
  const uint64_t dim = static_cast<uint64_t>(m.head_dim);
  const uint64_t q_shape[] = {*total, qo, dim};
  const uint64_t kv_shape[] = {*total, kv, dim};
  const uint64_t lse_shape[] = {*total, qo};
  const Placement placement = platform_->PlacementFor(device->id);
  AttentionTensors t;
  t.has_lse = !call.lse.region.empty();
  struct Spec {
    const TensorName& name;
    const char* field;
    kernels::DType dtype;
    absl::Span<const uint64_t> shape;
    ResolvedTensor* dst;
  };
  const Spec specs[] = {{call.q, "q", m.dtype, q_shape, &t.q},
                        {call.k_new, "k_new", m.dtype, kv_shape, &t.k},
                        {call.v_new, "v_new", m.dtype, kv_shape, &t.v},
                        {call.out, "out", m.dtype, q_shape, &t.out},
                        {call.lse, "lse", kernels::DType::kFloat32, lse_shape, &t.lse}};
  for (const Spec& spec : specs) {
    if (spec.dst == &t.lse && !t.has_lse) continue;
    auto r = ResolveTensor(regions_, spec.name, spec.field, spec.dtype, spec.shape, placement,
                           owner);
    if (!r.ok()) return std::move(reply)(r.status());
    *spec.dst = *std::move(r);
  }
  if (absl::Status s = CheckOutputsDoNotAliasInputs(t); !s.ok()) return std::move(reply)(s);

  const char* rpc = decode ? "Decode" : "Prefill";
  metrics_->RecordBatch(rpc, static_cast<int64_t>(call.items.size()));
  Post<DataResult>(
      device, std::move(reply),
      [this, rpc, layer = int64_t{call.layer}, items = std::move(call.items), t = std::move(t),
       total = *total, decode, deterministic = call.deterministic, sync = *std::move(sync),
       life = std::move(call.life), owner, trace](Device& d) -> absl::StatusOr<DataResult> {
        if (absl::Status s = CheckStillWanted(life); !s.ok()) return s;
        auto prepared = d.pool->PrepareAppend(layer, items, owner);
        if (!prepared.ok()) return prepared.status();
        // Planned before any page is reserved: a batch the workspaces cannot hold is refused
        // with nothing changed.
        auto plan = d.backend->PlanAttention(
            {prepared->starts, prepared->num_new, deterministic, decode});
        if (!plan.ok()) return plan.status();
        auto copies = d.pool->CommitAppend(*prepared);
        if (!copies.ok()) return copies.status();
        PublishPoolState(d);
        AttentionWork work;
        work.append = AppendWork{layer, EntriesOf(*prepared), t.k.data, t.v.data,
                                 {sync.wait, sync.signal}, d.pool->table_epoch()};
        work.q = t.q.data;
        work.out = t.out.data;
        work.lse = t.has_lse ? reinterpret_cast<float*>(t.lse.data) : nullptr;
        work.deterministic = deterministic;
        absl::Status s = d.backend->CopyPages(*copies);
        LaunchResult launched;
        if (s.ok()) {
          auto r = d.backend->Attention(work, *plan);
          s = r.status();
          if (r.ok()) launched = *r;
        }
        if (s.ok() && trace != nullptr) trace->enqueued = launched.enqueued;
        if (s.ok() && sync.signal != nullptr) s = KeepUntilDone(d, std::tuple{t, sync.owners});
        if (!s.ok())
          return MarkFaulted(d, s, absl::StrCat(rpc, " layer=", layer, " items=", items.size()));
        if (absl::Status damaged = CheckNotDamaged({&t.q, &t.k, &t.v, &t.out, &t.lse});
            !damaged.ok()) {
          d.pool->UndoAppend(*prepared);
          PublishPoolState(d);
          return damaged;
        }
        metrics_->AddTokens(d.index, static_cast<int64_t>(total), static_cast<int64_t>(total));
        if (decode && launched.kernel != AttentionKernel::kHost)
          metrics_->RecordDecodeLaunch(d.index, launched.graph_bucket);
        return LengthsOf(*prepared);
      },
      trace);
}

}  // namespace attnd
