#include "client/workload/session.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/describe.h"

namespace attnd::workload {
namespace {

// GetServerInfo, the model, and the device's state at the start.
absl::Status LearnServer(Session& s) {
  absl::StatusOr<v1::ServerInfo> info = s.client.GetServerInfo();
  if (!info.ok()) {
    return absl::Status(info.status().code(), "GetServerInfo: " + info.status().ToString());
  }
  s.info = *std::move(info);
  s.out("server: attnd %s at %s\n", s.info.version(), s.client.target());
  s.out("model:  %s\n", client::DescribeModel(s.info.model()));
  absl::StatusOr<Model> model = ModelFromServerInfo(s.info);
  if (!model.ok()) return model.status();
  s.model = *std::move(model);

  const uint32_t want = s.options.device;
  const auto device = std::find_if(s.info.devices().begin(), s.info.devices().end(),
                                   [&](const v1::DeviceInfo& d) { return d.device() == want; });
  if (device == s.info.devices().end()) {
    return absl::FailedPreconditionError(absl::StrCat("the server has no device ", want));
  }
  if (!device->serving()) {
    return absl::FailedPreconditionError(absl::StrCat("device ", want, " is not serving"));
  }
  if (s.info.model().kv_cache_dtype() == v1::KV_CACHE_DTYPE_FP8_E4M3) {
    if (device->k_scales_size() != s.model.layers || device->v_scales_size() != s.model.layers)
      return absl::FailedPreconditionError(
          absl::StrCat("device ", want, " has an fp8 pool but not one scale per layer"));
    s.model.k_scales.assign(device->k_scales().begin(), device->k_scales().end());
    s.model.v_scales.assign(device->v_scales().begin(), device->v_scales().end());
  }
  s.model.token_scales =
      s.info.model().kv_cache_dtype() == v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN;
  s.verifier.SetModel(s.model);
  s.pages_free_at_start = device->free_pages();
  s.live_at_start = device->live_sequences();
  const auto& features = s.info.features();
  if (!features.empty() &&
      std::find(features.begin(), features.end(), "host_regions") == features.end()) {
    return absl::FailedPreconditionError("the server does not list the host_regions feature");
  }
  return absl::OkStatus();
}

absl::Status ShareRegion(Session& s) {
  absl::StatusOr<std::unique_ptr<Buffers>> buffers =
      Buffers::Create(s.model, PlanBuffers(s.model, s.options), s.options.shm_prefix,
                      s.options.unlink_shm_on_signal);
  if (!buffers.ok()) return buffers.status();
  s.buffers = *std::move(buffers);
  // The key is unique and '/'-prefixed.
  s.region = absl::StrCat(s.options.region_prefix, s.buffers->key());
  const uint64_t bytes = s.buffers->bytes();
  if (absl::Status st = s.client.RegisterHostRegion(s.region, s.buffers->key(), 0, bytes);
      !st.ok()) {
    return absl::Status(st.code(), "RegisterHostRegion: " + st.ToString());
  }
  s.region_registered = true;
  s.out("region: %s, shm %s, %.2f MiB\n", s.region, s.buffers->key(), bytes / 1048576.0);
  return absl::OkStatus();
}

// Sequence ids come from a source apart from the seed, so a rerun with the same seed never
// collides with the sequences of a run that is still going (or crashed).
uint64_t FirstSequenceId() {
  std::random_device entropy;
  uint64_t id = ((static_cast<uint64_t>(entropy()) << 20) ^ entropy()) & ((uint64_t{1} << 48) - 1);
  return (id + 1) << 12;
}

void ReleaseLive(Session& s) {
  size_t left = s.live_ids.size();
  for (uint64_t id : s.live_ids) {
    absl::StatusOr<uint64_t> released = s.client.ReleaseSequence(s.options.device, id);
    --left;
    if (released.ok()) continue;
    s.verifier.Fail(
        absl::StrCat("ReleaseSequence ", id, " at clean-up: ", released.status().ToString()));
    if (absl::IsUnavailable(released.status()) || absl::IsDeadlineExceeded(released.status())) {
      // The server is gone; the other sequences went with it (or will time out the same).
      if (left > 0) s.verifier.Fail(absl::StrCat(left, " more sequences not released"));
      break;
    }
  }
  s.live_ids.clear();
}

void Unregister(Session& s) {
  if (absl::Status st = s.client.UnregisterRegion(s.region); !st.ok()) {
    s.verifier.Fail("UnregisterRegion: " + st.ToString());
  } else {
    absl::StatusOr<v1::ListRegionsResponse> regions = s.client.ListRegions();
    if (regions.ok()) {
      for (const v1::RegionInfo& r : regions->regions()) {
        if (r.name() == s.region)
          s.verifier.Fail("ListRegions still lists the unregistered region");
      }
    }
  }
  s.region_registered = false;
}

}  // namespace

Session::Session(client::Client& client, const WorkloadOptions& options)
    : client(client), options(options), out(options.log), rng(options.seed), verifier(out) {}

absl::Status Open(Session& s) {
  if (absl::Status st = LearnServer(s); !st.ok()) return st;
  if (absl::Status st = ShareRegion(s); !st.ok()) return st;
  s.next_id = FirstSequenceId();
  // No deadline on the stream: it lives as long as the run; each call on it is short.
  absl::StatusOr<std::unique_ptr<client::DataStream>> stream =
      s.client.OpenStream({.timeout = absl::InfiniteDuration()});
  if (!stream.ok()) return stream.status();
  s.stream = *std::move(stream);
  return absl::OkStatus();
}

void Close(Session& s) {
  if (s.stream != nullptr) {
    if (absl::Status st = s.stream->Close(); !st.ok()) {
      s.verifier.Fail("closing the Stream: " + st.ToString());
    }
    s.stream.reset();
  }
  ReleaseLive(s);
  if (s.region_registered) Unregister(s);
  s.buffers.reset();
}

}  // namespace attnd::workload
