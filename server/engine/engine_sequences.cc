// The engine's sequences: create, fork, truncate, release and read them, on the device's worker
// (which owns the device's pool).
#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"

namespace attnd {

SequenceState Engine::StateOf(const Device& device, const Sequence& seq) const {
  SequenceState state;
  state.device = device.id;
  state.seq_id = seq.id;
  state.layer_lengths = seq.lengths;
  state.num_pages = seq.pages.size();
  state.shared_pages = static_cast<uint64_t>(device.pool->SharedPages(seq));
  return state;
}

void Engine::CreateSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                            Reply<SequenceState> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  Post<SequenceState>(*d, std::move(reply),
                      [this, owner = client.id, principal = client.principal,
                       seq_id](Device& d) -> absl::StatusOr<SequenceState> {
                        if (absl::Status s = d.pool->Create(seq_id, owner, principal); !s.ok())
                          return s;
                        PublishPoolState(d);
                        return StateOf(d, *d.pool->Find(seq_id, owner));
                      });
}

void Engine::ForkSequence(const ClientRef& client, uint32_t device, uint64_t parent_id,
                          uint64_t child_id, Reply<SequenceState> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  Post<SequenceState>(*d, std::move(reply),
                      [this, owner = client.id, parent_id,
                       child_id](Device& d) -> absl::StatusOr<SequenceState> {
                        if (absl::Status s = d.pool->Fork(parent_id, child_id, owner); !s.ok())
                          return s;
                        PublishPoolState(d);
                        return StateOf(d, *d.pool->Find(child_id, owner));
                      });
}

void Engine::TruncateSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                              uint64_t length, Reply<SequenceState> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  // Lengths above max_seq_len truncate nothing; clamp so the pool sees a sane int64.
  const int64_t clamped = static_cast<int64_t>(
      std::min<uint64_t>(length, static_cast<uint64_t>(config_.max_seq_len)));
  Post<SequenceState>(*d, std::move(reply),
                      [this, owner = client.id, seq_id,
                       clamped](Device& d) -> absl::StatusOr<SequenceState> {
                        if (absl::Status s = d.pool->Truncate(seq_id, clamped, owner); !s.ok())
                          return s;
                        PublishPoolState(d);
                        return StateOf(d, *d.pool->Find(seq_id, owner));
                      });
}

void Engine::ReleaseSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                             Reply<int64_t> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  Post<int64_t>(*d, std::move(reply),
                [this, owner = client.id, seq_id](Device& d) -> absl::StatusOr<int64_t> {
    auto freed = d.pool->Release(seq_id, owner);
    if (freed.ok()) PublishPoolState(d);
    return freed;
  });
}

void Engine::GetSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                         Reply<SequenceState> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  Post<SequenceState>(*d, std::move(reply),
                      [this, owner = client.id, seq_id](Device& d) -> absl::StatusOr<SequenceState> {
                        const Sequence* seq = d.pool->Find(seq_id, owner);
                        if (seq == nullptr)
                          return absl::NotFoundError(
                              absl::StrCat("seq_id: no sequence ", seq_id, " on device ", d.id));
                        return StateOf(d, *seq);
                      });
}

void Engine::ListSequences(const ClientRef& client, uint32_t device,
                           Reply<std::vector<SequenceState>> reply) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(reply)(d.status());
  Post<std::vector<SequenceState>>(
      *d, std::move(reply),
      [this, owner = client.id](Device& d) -> absl::StatusOr<std::vector<SequenceState>> {
        std::vector<SequenceState> out;
        for (const Sequence* seq : d.pool->ListOwned(owner)) out.push_back(StateOf(d, *seq));
        return out;
      });
}

}  // namespace attnd
