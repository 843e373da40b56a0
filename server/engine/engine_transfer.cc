// The engine's side of KV transfer between attnd processes: grants and pulls on the source,
// page reservation and adoption on the destination. The bytes move elsewhere (server/transport);
// here every page a transfer reads or writes is kept out of every other writer's way: a grant's
// pages are held (refcounted, so writes copy them first) and a pull's pages are in no sequence
// until they are full.
#include <algorithm>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "server/engine/engine.h"
#include "spdlog/spdlog.h"

namespace attnd {
namespace {

struct PendingGrant {
  Engine::Reply<KvGrantInfo> reply;
  KvGrantSpec spec;
};

}  // namespace

void Engine::GrantKv(KvGrantCall call, Reply<KvGrantInfo> reply) {
  auto device = FindDevice(call.device);
  if (!device.ok()) return std::move(reply)(device.status());
  if (call.ttl <= absl::ZeroDuration())
    return std::move(reply)(absl::InvalidArgumentError("ttl_ms: a grant must last some time"));
  Device* d = *device;
  d->worker->Post([this, d, call = std::move(call), reply = std::move(reply)]() mutable {
    if (!d->serving.load())
      return std::move(reply)(absl::UnavailableError(
          absl::StrCat("device: ", d->id, " is not serving after a fault")));
    const Sequence* seq = d->pool->Find(call.seq_id, call.client.id);
    if (seq == nullptr)
      return std::move(reply)(absl::NotFoundError(
          absl::StrCat("seq_id: no sequence ", call.seq_id, " on device ", d->id)));
    const int64_t shortest = *std::min_element(seq->lengths.begin(), seq->lengths.end());
    const int64_t n = call.num_tokens == 0 ? shortest : static_cast<int64_t>(call.num_tokens);
    if (n <= 0)
      return std::move(reply)(absl::FailedPreconditionError(absl::StrCat(
          "num_tokens: sequence ", call.seq_id, " holds no token at every layer to grant")));
    auto pages = d->pool->Hold(call.seq_id, n, call.client.id);
    if (!pages.ok()) return std::move(reply)(pages.status());
    d->grants_in_making.fetch_add(1);  // until grants_ has it: SetKvScales must see the hold
    auto pending = std::make_shared<PendingGrant>();
    pending->reply = std::move(reply);
    pending->spec = KvGrantSpec{call.client.id, d->index, call.seq_id, n, *pages,
                                absl::Now() + call.ttl, call.max_pulls};
    // Published once the device has finished writing those pages: a peer reads them directly.
    absl::Status s = d->backend->WhenDone([this, d, pending]() {
      const absl::Time expires = pending->spec.expires;
      const uint64_t tokens = static_cast<uint64_t>(pending->spec.num_tokens);
      const int index = pending->spec.device_index;
      std::vector<int32_t> pages = pending->spec.pages;
      absl::StatusOr<std::string> id = grants_.Add(std::move(pending->spec));
      d->grants_in_making.fetch_sub(1);
      if (!id.ok()) {
        DropHolds({{index, std::move(pages)}});
        return std::move(pending->reply)(id.status());
      }
      std::move(pending->reply)(KvGrantInfo{*std::move(id), tokens, expires});
    });
    if (!s.ok()) {
      d->grants_in_making.fetch_sub(1);
      d->pool->DropPages(*pages);
      std::move(pending->reply)(MarkFaulted(*d, s, "GrantKv"));
    }
  });
}

absl::Status Engine::RevokeKv(const ClientRef& client, const std::string& grant) {
  auto ended = grants_.Revoke(client.id, grant);
  if (!ended.ok()) return ended.status();
  DropHolds(*std::move(ended));
  return absl::OkStatus();
}

absl::StatusOr<KvPullSource> Engine::OpenKvPull(const std::string& grant, uint64_t num_tokens,
                                                absl::Duration max_time) {
  const absl::Time now = absl::Now();
  auto opened = grants_.Open(grant, static_cast<int64_t>(num_tokens), now, now + max_time);
  if (!opened.ok()) return opened.status();
  Device& d = *devices_[opened->device_index];
  if (!d.serving.load()) {
    (void)CloseKvPull(opened->pull_id, /*completed=*/false);
    return absl::UnavailableError(
        absl::StrCat("the grant's device ", d.id, " is not serving after a fault"));
  }
  KvPullSource source;
  source.pull_id = opened->pull_id;
  source.device = static_cast<uint32_t>(d.id);
  source.device_index = d.index;
  source.num_tokens = opened->num_tokens;
  source.pages = std::move(opened->pages);
  source.shape = config_.model.CacheShape(d.backend->num_pages());
  if (layer_scaled_pool()) source.scales = ScalesOf(d);
  return source;
}

absl::Status Engine::CloseKvPull(uint64_t pull_id, bool completed) {
  auto ended = grants_.Close(pull_id, completed);
  if (!ended.ok()) return ended.status();
  DropHolds(*std::move(ended));
  return absl::OkStatus();
}

void Engine::DropHolds(std::vector<EndedHold> ended) {
  for (EndedHold& hold : ended) {
    Device* d = devices_[hold.device_index].get();
    d->worker->Post([this, d, pages = std::move(hold.pages)]() {
      d->pool->DropPages(pages);
      PublishPoolState(*d);
    });
  }
}

absl::StatusOr<std::vector<int32_t>> Engine::ReserveKvPull(const KvPullTarget& target) {
  auto device = FindDevice(target.device);
  if (!device.ok()) return device.status();
  Device& d = **device;
  const int64_t ps = config_.model.page_size;
  std::vector<int32_t> pages;
  absl::Notification idle;
  absl::Status s = RunOnWorker(d, [&]() -> absl::Status {
    const ClientRef& c = target.client;
    if (absl::Status a = d.pool->CheckAdoptable(target.seq_id, c.id, c.principal); !a.ok())
      return a;
    if (absl::Status a = CheckPullScalesOn(d, target); !a.ok()) return a;
    auto reserved = d.pool->AllocateDetached((target.num_tokens + ps - 1) / ps, c.principal);
    if (!reserved.ok()) return reserved.status();
    pages = *std::move(reserved);
    PublishPoolState(d);
    // Pages just freed may still be read by work in flight (a copy-on-write source, a kernel
    // of a released sequence): the transport writes them only once that work is done.
    absl::Status w = d.backend->WhenDone([&idle]() { idle.Notify(); });
    if (!w.ok()) {
      d.pool->DropPages(pages);
      PublishPoolState(d);
      return MarkFaulted(d, w, "ReserveKvPull");
    }
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  idle.WaitForNotification();
  return pages;
}

absl::StatusOr<std::vector<int64_t>> Engine::CommitKvPull(const KvPullTarget& target,
                                                          std::vector<int32_t> pages) {
  auto device = FindDevice(target.device);
  if (!device.ok()) {
    AbortKvPull(target.device, std::move(pages));
    return device.status();
  }
  Device& d = **device;
  std::vector<int64_t> lengths;
  absl::Status s = RunOnWorker(d, [&]() -> absl::Status {
    const ClientRef& c = target.client;
    // Checked again here, atomic with the adoption: a SetKvScales since the reserve would leave
    // the copied bytes under scales they were not quantized with.
    absl::Status a = CheckPullScalesOn(d, target);
    if (a.ok())
      a = d.pool->Adopt(target.seq_id, c.id, c.principal, pages, target.layer_begin,
                        target.layer_end, target.num_tokens);
    if (!a.ok()) {
      d.pool->DropPages(pages);  // a sequence made meanwhile took the id, or scales changed
    } else {
      lengths = d.pool->Find(target.seq_id, c.id)->lengths;
      metrics_->AddTokens(d.index, target.num_tokens * (target.layer_end - target.layer_begin), 0);
    }
    PublishPoolState(d);
    return a;
  });
  if (!s.ok()) return s;
  return lengths;
}

void Engine::AbortKvPull(uint32_t device, std::vector<int32_t> pages) {
  for (auto& d : devices_) {
    if (static_cast<uint32_t>(d->id) != device) continue;
    (void)RunOnWorker(*d, [&]() -> absl::Status {
      d->pool->DropPages(pages);
      PublishPoolState(*d);
      return absl::OkStatus();
    });
  }
}

absl::StatusOr<kernels::KvCacheShape> Engine::PoolShape(uint32_t device) const {
  auto d = FindDevice(device);
  if (!d.ok()) return d.status();
  return config_.model.CacheShape((*d)->backend->num_pages());
}

absl::StatusOr<KvPoolMemory> Engine::PoolMemoryOf(uint32_t device) const {
  auto d = FindDevice(device);
  if (!d.ok()) return d.status();
  return (*d)->backend->pool_memory();
}

absl::Status Engine::BindThreadToDevice(uint32_t device) {
  return platform_->BindWorkerThread(static_cast<int>(device));
}

absl::StatusOr<std::string> Engine::PoolIpcHandle(uint32_t device) {
  auto d = FindDevice(device);
  if (!d.ok()) return d.status();
  absl::StatusOr<std::string> handle;
  (void)RunOnWorker(**d, [&]() -> absl::Status {
    handle = (*d)->backend->PoolIpcHandle();
    return absl::OkStatus();
  });
  return handle;
}

absl::StatusOr<std::shared_ptr<Region>> Engine::MapPeerPool(uint32_t device,
                                                            const std::string& handle,
                                                            uint64_t bytes) {
  auto d = FindDevice(device);
  if (!d.ok()) return d.status();
  absl::StatusOr<std::shared_ptr<Region>> mapped;
  (void)RunOnWorker(**d, [&]() -> absl::Status {
    auto region = platform_->OpenIpcRegion("kv-peer-pool", handle, (*d)->id, bytes,
                                           PosterFor(**d));
    if (region.ok()) mapped = std::shared_ptr<Region>(*std::move(region));
    else mapped = region.status();
    return absl::OkStatus();
  });
  return mapped;
}

absl::Status Engine::PullFromPeerPool(uint32_t device, const PeerPoolPull& pull) {
  auto d = FindDevice(device);
  if (!d.ok()) return d.status();
  Device& dev = **d;
  absl::Notification done;
  absl::Status s = RunOnWorker(dev, [&]() -> absl::Status {
    absl::Status c = dev.backend->PullFromPeerPool(pull);
    if (c.ok()) c = dev.backend->WhenDone([&done]() { done.Notify(); });
    if (!c.ok() && c.code() != absl::StatusCode::kInvalidArgument &&
        c.code() != absl::StatusCode::kUnimplemented)
      return MarkFaulted(dev, c, "PullFromPeerPool");
    return c;
  });
  if (!s.ok()) return s;
  // A fault in the copy itself (a peer's mapping gone bad) is sticky; the device's next call
  // finds it and marks the device, as for any kernel.
  done.WaitForNotification();
  return absl::OkStatus();
}

}  // namespace attnd
