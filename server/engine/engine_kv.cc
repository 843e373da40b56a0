// The engine's KV export and import: a head range of a sequence's pages to or from a client
// buffer, in the documented dense layout.
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"
#include "server/engine/limits.h"

namespace attnd {
namespace {

KvTransferWork MakeTransfer(const KvTransferCall& call, const Sequence& seq, void* buffer,
                            bool to_pool) {
  KvTransferWork w;
  w.page_table = absl::MakeConstSpan(seq.pages);
  w.layer_begin = call.layer_begin;
  w.layer_end = call.layer_end;
  w.head_begin = call.head_begin;
  w.head_end = call.head_end;
  w.num_tokens = static_cast<int64_t>(call.num_tokens);
  w.buffer = buffer;
  w.to_pool = to_pool;
  return w;
}

}  // namespace

void Engine::ExportKv(KvTransferCall call, Done done) {
  auto device = FindDevice(call.device);
  if (!device.ok()) return std::move(done)(device.status());
  auto shape = CheckTransfer(call, config_);
  if (!shape.ok()) return std::move(done)(shape.status());
  auto dst = ResolveTensor(regions_, call.buffer, "dst", config_.model.dtype, *shape,
                           platform_->PlacementFor((*device)->id), call.client.id);
  if (!dst.ok()) return std::move(done)(dst.status());
  PostDone(*device, std::move(done), [this, call, dst = *std::move(dst)](Device& d) -> absl::Status {
    const Sequence* seq = d.pool->Find(call.seq_id, call.client.id);
    if (seq == nullptr)
      return absl::NotFoundError(
          absl::StrCat("seq_id: no sequence ", call.seq_id, " on device ", d.id));
    for (uint32_t layer = call.layer_begin; layer < call.layer_end; ++layer) {
      if (static_cast<uint64_t>(seq->lengths[layer]) < call.num_tokens)
        return absl::FailedPreconditionError(
            absl::StrCat("num_tokens: ", call.num_tokens, " exceeds the ", seq->lengths[layer],
                         " tokens sequence ", call.seq_id, " holds at layer ", layer));
    }
    absl::Status s = d.backend->TransferKv(MakeTransfer(call, *seq, dst.data, /*to_pool=*/false));
    if (!s.ok()) return MarkFaulted(d, s, "ExportKv");
    return absl::OkStatus();
  });
}

void Engine::ImportKv(KvTransferCall call, Reply<std::vector<int64_t>> reply) {
  auto device = FindDevice(call.device);
  if (!device.ok()) return std::move(reply)(device.status());
  auto shape = CheckTransfer(call, config_);
  if (!shape.ok()) return std::move(reply)(shape.status());
  auto src = ResolveTensor(regions_, call.buffer, "src", config_.model.dtype, *shape,
                           platform_->PlacementFor((*device)->id), call.client.id);
  if (!src.ok()) return std::move(reply)(src.status());
  Post<std::vector<int64_t>>(
      *device, std::move(reply),
      [this, call, src = *std::move(src)](Device& d) -> absl::StatusOr<std::vector<int64_t>> {
        const Sequence* seq = d.pool->Find(call.seq_id, call.client.id);
        if (seq == nullptr)
          return absl::NotFoundError(
              absl::StrCat("seq_id: no sequence ", call.seq_id, " on device ", d.id));
        std::vector<PageWrite> writes;
        const int64_t n = static_cast<int64_t>(call.num_tokens);
        for (uint32_t layer = call.layer_begin; layer < call.layer_end; ++layer) {
          const int64_t len = seq->lengths[layer];
          if (len != 0 && len != n)
            return absl::FailedPreconditionError(absl::StrCat(
                "num_tokens: sequence ", call.seq_id, " holds ", len, " tokens at layer ", layer,
                "; an import needs 0 or exactly ", n));
          writes.push_back({call.seq_id, layer, 0, n});
        }
        auto copies = d.pool->ReserveWrites(writes, call.client.id);
        if (!copies.ok()) return copies.status();
        PublishPoolState(d);
        absl::Status s = d.backend->CopyPages(*copies);
        if (s.ok())
          s = d.backend->TransferKv(MakeTransfer(call, *seq, src.data, /*to_pool=*/true));
        if (!s.ok()) return MarkFaulted(d, s, "ImportKv");
        metrics_->AddTokens(d.index, n * (call.layer_end - call.layer_begin), 0);
        return seq->lengths;
      });
}

}  // namespace attnd
