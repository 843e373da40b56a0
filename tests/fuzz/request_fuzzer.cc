// request_fuzzer: libFuzzer over what attnd does with a request before (and while) it touches
// memory: protobuf parsing, the wire conversion (server/wire/convert.h), the engine's limits
// (server/engine/limits.h), region-name validation, and a real in-process Engine on the CPU
// platform, so every check of Append/Prefill/Decode/ExportKv/ImportKv and the sequence calls
// runs on fuzzed fields, and valid requests go on to page reservation and attention.
//
// An input is one request: byte 0 picks the message (request_kinds.h), the rest is parsed with
// ParseFromArray. Beyond crashes and sanitizer reports, these are failures (abort):
//  - a request the limits refuse succeeds in the engine;
//  - a refused request changes anything (sequences, lengths, pages, regions): the wire
//    contract says a rejected request changes nothing;
//  - a sequence holds more than max_seq_len tokens, or pages past its longest layer;
//  - releasing every sequence leaves a page in use, or a request stops the device serving.
// Every input starts from the same engine state (request_kinds.h), restored after any input
// that changed it, so a crash replays from its input alone.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "attnd/v1/attention.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "server/config/config.h"
#include "server/cpu/cpu_platform.h"
#include "server/engine/engine.h"
#include "server/engine/limits.h"
#include "server/metrics/metrics.h"
#include "server/regions/region.h"
#include "server/wire/convert.h"
#include "spdlog/spdlog.h"
#include "tests/fuzz/request_kinds.h"

namespace attnd::fuzz {
namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "request_fuzzer: %s\n", what.c_str());
  std::abort();
}

// ---- The engine adapter ------------------------------------------------------------------
// Every call into Engine is in this section, each one waiting for its reply, so a change of
// the Engine API (e.g. a leading client/owner argument on each method) is a change here only.
class EngineAdapter {
 public:
  static std::unique_ptr<EngineAdapter> Create(const ServerConfig& config) {
    auto adapter = std::unique_ptr<EngineAdapter>(new EngineAdapter(config));
    auto engine = Engine::Create(config, CreateCpuPlatform(), adapter->metrics_.get());
    if (!engine.ok()) Fail(absl::StrCat("Engine::Create: ", engine.status().ToString()));
    adapter->engine_ = *std::move(engine);
    return adapter;
  }

  const ServerConfig& config() const { return engine_->config(); }
  EngineInfo Info() const { return engine_->Info(); }
  std::vector<RegionSummary> ListRegions() const { return engine_->ListRegions(client_); }

  // Only the fixture's own region goes through here: registering fuzzed specs would open
  // arbitrary shared-memory objects.
  absl::Status RegisterHostRegion(const HostRegionSpec& spec) {
    return engine_->RegisterHostRegion(client_, spec);
  }
  absl::Status RegisterIpcRegion(const IpcRegionSpec& spec) {
    return WaitDone([&](Engine::Done d) { engine_->RegisterIpcRegion(client_, spec, std::move(d)); });
  }
  absl::Status UnregisterRegion(const std::string& name) {
    return engine_->UnregisterRegion(client_, name);
  }
  absl::Status RegisterIpcEvent(const IpcEventSpec& spec) {
    return WaitDone([&](Engine::Done d) { engine_->RegisterIpcEvent(client_, spec, std::move(d)); });
  }
  absl::Status UnregisterIpcEvent(const std::string& name) {
    return engine_->UnregisterIpcEvent(client_, name);
  }

  absl::StatusOr<SequenceState> CreateSequence(uint32_t device, uint64_t id) {
    return Wait<SequenceState>([&](auto r) { engine_->CreateSequence(client_, device, id, std::move(r)); });
  }
  absl::StatusOr<SequenceState> ForkSequence(uint32_t device, uint64_t parent, uint64_t child) {
    return Wait<SequenceState>(
        [&](auto r) { engine_->ForkSequence(client_, device, parent, child, std::move(r)); });
  }
  absl::StatusOr<SequenceState> TruncateSequence(uint32_t device, uint64_t id, uint64_t length) {
    return Wait<SequenceState>(
        [&](auto r) { engine_->TruncateSequence(client_, device, id, length, std::move(r)); });
  }
  absl::StatusOr<int64_t> ReleaseSequence(uint32_t device, uint64_t id) {
    return Wait<int64_t>([&](auto r) { engine_->ReleaseSequence(client_, device, id, std::move(r)); });
  }
  absl::StatusOr<SequenceState> GetSequence(uint32_t device, uint64_t id) {
    return Wait<SequenceState>([&](auto r) { engine_->GetSequence(client_, device, id, std::move(r)); });
  }
  absl::StatusOr<std::vector<SequenceState>> ListSequences(uint32_t device) {
    return Wait<std::vector<SequenceState>>(
        [&](auto r) { engine_->ListSequences(client_, device, std::move(r)); });
  }

  absl::StatusOr<DataResult> Append(AppendCall call) {
    return Wait<DataResult>([&](auto r) { engine_->Append(std::move(call), std::move(r)); });
  }
  absl::StatusOr<DataResult> Prefill(AttentionCall call) {
    return Wait<DataResult>([&](auto r) { engine_->Prefill(std::move(call), std::move(r)); });
  }
  absl::StatusOr<DataResult> Decode(AttentionCall call) {
    return Wait<DataResult>([&](auto r) { engine_->Decode(std::move(call), std::move(r)); });
  }
  absl::Status ExportKv(KvTransferCall call) {
    return WaitDone([&](Engine::Done d) { engine_->ExportKv(std::move(call), std::move(d)); });
  }
  absl::StatusOr<std::vector<int64_t>> ImportKv(KvTransferCall call) {
    return Wait<std::vector<int64_t>>(
        [&](auto r) { engine_->ImportKv(std::move(call), std::move(r)); });
  }

 private:
  explicit EngineAdapter(const ServerConfig& config)
      : metrics_(std::make_unique<Metrics>(config.devices)) {}

  // Calls `call` with a reply callback and waits until the engine has answered through it.
  template <typename T, typename Call>
  static absl::StatusOr<T> Wait(Call&& call) {
    absl::Notification answered;
    absl::StatusOr<T> result = absl::UnknownError("the engine never replied");
    call(Engine::Reply<T>([&](absl::StatusOr<T> r) {
      result = std::move(r);
      answered.Notify();
    }));
    answered.WaitForNotification();
    return result;
  }
  template <typename Call>
  static absl::Status WaitDone(Call&& call) {
    absl::Notification answered;
    absl::Status result = absl::UnknownError("the engine never replied");
    call(Engine::Done([&](absl::Status s) {
      result = std::move(s);
      answered.Notify();
    }));
    answered.WaitForNotification();
    return result;
  }

  const ClientRef client_;  // every call acts for the in-process client
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;  // after metrics_: destroyed first
};
// ---- End of the engine adapter -----------------------------------------------------------

// What a refused request must leave as it was. KV bytes are not compared (too slow per input).
struct Snapshot {
  std::vector<std::tuple<uint64_t, std::vector<int64_t>, uint64_t, uint64_t>> sequences;
  std::vector<std::pair<std::string, uint64_t>> regions;
  int64_t free_pages = 0;
  bool serving = true;

  bool operator==(const Snapshot&) const = default;
  std::string ToString() const {
    std::string s = absl::StrCat("free_pages=", free_pages, " serving=", serving, " sequences:");
    for (const auto& [id, lengths, pages, shared] : sequences) {
      absl::StrAppend(&s, " ", id, "(pages=", pages, " shared=", shared, " lengths=");
      for (int64_t len : lengths) absl::StrAppend(&s, len, ",");
      absl::StrAppend(&s, ")");
    }
    absl::StrAppend(&s, " regions:");
    for (const auto& [name, bytes] : regions) absl::StrAppend(&s, " ", name, "/", bytes);
    return s;
  }
};

ServerConfig FuzzConfig() {
  ServerConfig config;
  config.model.num_layers = kLayers;
  config.model.num_qo_heads = kQoHeads;
  config.model.num_kv_heads = kKvHeads;
  config.model.head_dim = kHeadDim;
  config.model.dtype = kernels::DType::kBFloat16;
  config.model.page_size = kPageSize;
  config.pages_per_device = kPages;
  config.max_batch_size = kMaxBatch;
  config.max_seq_len = kMaxSeqLen;
  config.max_tokens_per_request = kMaxTokensPerRequest;
  config.metrics_port = 0;
  config.cpu_threads = 1;
  if (absl::Status s = config.Validate(); !s.ok()) Fail(s.ToString());
  return config;
}

// The engine every input runs against, and the state each input starts from.
class Fixture {
 public:
  static Fixture& Get() {
    static Fixture* fixture = new Fixture();  // never destroyed: libFuzzer exits from anywhere
    return *fixture;
  }

  EngineAdapter& engine() { return *engine_; }
  const ServerConfig& config() const { return engine_->config(); }

  // Checks the engine is back where every input starts, restoring it if the input changed it
  // (which only an accepted request may do).
  void AfterRequest(const absl::Status& status, const char* what) {
    const Snapshot now = Take();
    if (now == baseline_) return;
    if (!status.ok())
      Fail(absl::StrCat(what, " was refused (", status.ToString(), ") but changed the engine\n",
                        " before: ", baseline_.ToString(), "\n after:  ", now.ToString()));
    Restore();
  }

 private:
  Fixture() : engine_(EngineAdapter::Create(FuzzConfig())) {
    Restore();
    baseline_ = Take();
  }

  Snapshot Take() {
    Snapshot s;
    auto seqs = engine_->ListSequences(0);
    if (!seqs.ok()) Fail(absl::StrCat("ListSequences: ", seqs.status().ToString()));
    for (const SequenceState& seq : *seqs) {
      const int64_t longest = *std::max_element(seq.layer_lengths.begin(), seq.layer_lengths.end());
      if (longest > kMaxSeqLen)
        Fail(absl::StrCat("sequence ", seq.seq_id, " holds ", longest, " > max_seq_len tokens"));
      if (seq.num_pages != static_cast<uint64_t>((longest + kPageSize - 1) / kPageSize))
        Fail(absl::StrCat("sequence ", seq.seq_id, " holds ", seq.num_pages, " pages for ",
                          longest, " tokens"));
      s.sequences.emplace_back(seq.seq_id, seq.layer_lengths, seq.num_pages, seq.shared_pages);
    }
    std::sort(s.sequences.begin(), s.sequences.end());
    for (const RegionSummary& r : engine_->ListRegions())
      s.regions.emplace_back(r.name, r.byte_size);
    std::sort(s.regions.begin(), s.regions.end());
    const EngineInfo info = engine_->Info();
    s.free_pages = info.devices.at(0).free_pages;
    s.serving = info.devices.at(0).serving;
    if (!s.serving) Fail("device 0 stopped serving");
    return s;
  }

  // Releases every sequence (every page must come back), re-registers the region if an input
  // unregistered it, and rebuilds the two sequences.
  void Restore() {
    auto seqs = engine_->ListSequences(0);
    if (!seqs.ok()) Fail(seqs.status().ToString());
    for (const SequenceState& seq : *seqs) {
      if (auto r = engine_->ReleaseSequence(0, seq.seq_id); !r.ok()) Fail(r.status().ToString());
    }
    const DeviceState device = engine_->Info().devices.at(0);
    if (device.free_pages != device.total_pages)
      Fail(absl::StrCat("every sequence released, yet ", device.total_pages - device.free_pages,
                        " pages are in use"));
    const std::vector<RegionSummary> regions = engine_->ListRegions();
    if (std::none_of(regions.begin(), regions.end(),
                     [](const RegionSummary& r) { return r.name == kRegion; }))
      RegisterRegion();
    for (uint64_t id : {kEmptySeq, kFilledSeq}) {
      if (auto r = engine_->CreateSequence(0, id); !r.ok()) Fail(r.status().ToString());
    }
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      AppendCall call;
      call.layer = layer;
      call.items = {{kFilledSeq, kFilledTokens}};
      call.k_new = TensorName{kRegion, 0, config().model.dtype,
                              {kFilledTokens, kKvHeads, kHeadDim}};
      call.v_new = call.k_new;
      call.v_new.offset = kRegionBytes / 2;
      if (auto r = engine_->Append(std::move(call)); !r.ok()) Fail(r.status().ToString());
    }
  }

  // A fresh shared-memory object, registered then unlinked at once: the engine's mapping keeps
  // it alive, and no name is left behind in /dev/shm however the fuzzer exits.
  void RegisterRegion() {
    const std::string key = absl::StrCat("/attnd-fuzz-", getpid(), "-", ++regions_made_);
    const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) Fail("shm_open " + key);
    const bool sized = ftruncate(fd, kRegionBytes) == 0;
    close(fd);
    const absl::Status s =
        sized ? engine_->RegisterHostRegion({kRegion, key, 0, kRegionBytes})
              : absl::InternalError("ftruncate " + key);
    shm_unlink(key.c_str());
    if (!s.ok()) Fail(s.ToString());
  }

  std::unique_ptr<EngineAdapter> engine_;
  Snapshot baseline_;
  int regions_made_ = 0;
};

// The conversion keeps every item, and clamps expected lengths into int64.
void CheckItemsConverted(const google::protobuf::RepeatedPtrField<v1::BatchItem>& wire,
                         const std::vector<AppendItem>& items) {
  if (items.size() != static_cast<size_t>(wire.size())) Fail("conversion dropped items");
  for (size_t i = 0; i < items.size(); ++i) {
    const v1::BatchItem& w = wire[static_cast<int>(i)];
    if (items[i].seq_id != w.seq_id() || items[i].num_new_tokens != w.num_new_tokens() ||
        items[i].expected_length.has_value() != w.has_expected_length() ||
        (items[i].expected_length.has_value() && *items[i].expected_length < 0))
      Fail(absl::StrCat("items[", i, "] converted wrongly"));
  }
}

// A data request the limits refuse must not succeed; one that succeeds reports each item's new
// length, within max_seq_len.
void CheckDataOutcome(const absl::Status& limits, const absl::StatusOr<DataResult>& result,
                      size_t items, const char* what) {
  if (!result.ok()) return;
  if (!limits.ok())
    Fail(absl::StrCat(what, " succeeded though the limits refuse it: ", limits.ToString()));
  if (result->lengths.size() != items) Fail(absl::StrCat(what, " answered the wrong lengths"));
  for (uint64_t len : result->lengths)
    if (len < 1 || len > static_cast<uint64_t>(kMaxSeqLen))
      Fail(absl::StrCat(what, " answered length ", len));
}

void RunAppend(const v1::AppendRequest& req) {
  Fixture& f = Fixture::Get();
  AppendCall call = wire::ToAppendCall(req);
  CheckItemsConverted(req.items(), call.items);
  absl::Status limits = CheckLayer(call.layer, f.config());
  if (limits.ok()) limits = CheckItems(call.items, f.config(), /*decode=*/false).status();
  const size_t items = call.items.size();
  auto result = f.engine().Append(std::move(call));
  CheckDataOutcome(limits, result, items, "Append");
  f.AfterRequest(result.status(), "Append");
}

void RunAttention(const v1::AttentionRequest& req, bool decode) {
  Fixture& f = Fixture::Get();
  AttentionCall call = wire::ToAttentionCall(req);
  CheckItemsConverted(req.items(), call.items);
  if (call.lse.region != (req.has_lse() ? req.lse().region() : "")) Fail("lse converted wrongly");
  absl::Status limits = CheckLayer(call.layer, f.config());
  if (limits.ok()) limits = CheckItems(call.items, f.config(), decode).status();
  const size_t items = call.items.size();
  auto result = decode ? f.engine().Decode(std::move(call)) : f.engine().Prefill(std::move(call));
  const char* what = decode ? "Decode" : "Prefill";
  CheckDataOutcome(limits, result, items, what);
  f.AfterRequest(result.status(), what);
}

template <typename Req>
void RunTransfer(const Req& req, bool import) {
  Fixture& f = Fixture::Get();
  KvTransferCall call = wire::ToTransferCall(req);
  const auto shape = CheckTransfer(call, f.config());
  if (shape.ok()) {
    // The buffer's shape: the ranges' sizes, never wrapped.
    if ((*shape)[0] == 0 || (*shape)[0] > static_cast<uint64_t>(kLayers) || (*shape)[3] == 0 ||
        (*shape)[3] > static_cast<uint64_t>(kKvHeads))
      Fail("CheckTransfer accepted an empty or oversized range");
  }
  absl::Status status;
  if (import) {
    auto lengths = f.engine().ImportKv(std::move(call));
    status = lengths.status();
    if (lengths.ok() && lengths->size() != static_cast<size_t>(kLayers))
      Fail("ImportKv answered the wrong number of layer lengths");
  } else {
    status = f.engine().ExportKv(std::move(call));
  }
  if (status.ok() && !shape.ok())
    Fail(absl::StrCat("a KV transfer the limits refuse succeeded: ", shape.status().ToString()));
  f.AfterRequest(status, import ? "ImportKv" : "ExportKv");
}

void RunSequenceCall(Kind kind, const uint8_t* data, size_t size) {
  Fixture& f = Fixture::Get();
  EngineAdapter& e = f.engine();
  absl::Status status;
  switch (kind) {
    case Kind::kCreateSequence: {
      v1::CreateSequenceRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.CreateSequence(req.device(), req.seq_id()).status();
      break;
    }
    case Kind::kForkSequence: {
      v1::ForkSequenceRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.ForkSequence(req.device(), req.parent_id(), req.child_id()).status();
      break;
    }
    case Kind::kTruncateSequence: {
      v1::TruncateSequenceRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.TruncateSequence(req.device(), req.seq_id(), req.length()).status();
      break;
    }
    case Kind::kReleaseSequence: {
      v1::ReleaseSequenceRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.ReleaseSequence(req.device(), req.seq_id()).status();
      break;
    }
    case Kind::kGetSequence: {
      v1::GetSequenceRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.GetSequence(req.device(), req.seq_id()).status();
      break;
    }
    default: {
      v1::ListSequencesRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.ListSequences(req.device()).status();
      break;
    }
  }
  f.AfterRequest(status, "a sequence call");
}

void RunRegionCall(Kind kind, const uint8_t* data, size_t size) {
  Fixture& f = Fixture::Get();
  EngineAdapter& e = f.engine();
  absl::Status status;
  switch (kind) {
    case Kind::kRegisterHostRegion: {
      // Converted and checked only: registering would open whatever object the input names.
      v1::RegisterHostRegionRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      const HostRegionSpec spec = wire::ToHostRegionSpec(req);
      if (spec.name != req.name() || spec.shm_key != req.shm_key() ||
          spec.offset != req.offset() || spec.byte_size != req.byte_size())
        Fail("RegisterHostRegionRequest converted wrongly");
      (void)ValidateRegionName(spec.name);
      return;
    }
    case Kind::kRegisterCudaRegion: {
      v1::RegisterCudaRegionRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      const IpcRegionSpec spec = wire::ToIpcRegionSpec(req);
      (void)ValidateRegionName(spec.name);
      status = e.RegisterIpcRegion(spec);
      break;
    }
    case Kind::kRegisterCudaEvent: {
      v1::RegisterCudaEventRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.RegisterIpcEvent(wire::ToIpcEventSpec(req));
      break;
    }
    case Kind::kUnregisterRegion: {
      v1::UnregisterRegionRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.UnregisterRegion(req.name());
      break;
    }
    default: {
      v1::UnregisterCudaEventRequest req;
      if (!req.ParseFromArray(data, static_cast<int>(size))) return;
      status = e.UnregisterIpcEvent(req.name());
      break;
    }
  }
  // The CPU platform has no CUDA memory or events: those registrations never succeed.
  if (status.ok() && (kind == Kind::kRegisterCudaRegion || kind == Kind::kRegisterCudaEvent))
    Fail("the CPU platform registered CUDA memory or an event");
  f.AfterRequest(status, "a region or event call");
}

template <typename Req>
bool Parse(Req* req, const uint8_t* data, size_t size) {
  return req->ParseFromArray(data, static_cast<int>(size));
}

void RunOne(Kind kind, const uint8_t* data, size_t size) {
  switch (kind) {
    case Kind::kAppend: {
      v1::AppendRequest req;
      if (Parse(&req, data, size)) RunAppend(req);
      return;
    }
    case Kind::kPrefill:
    case Kind::kDecode: {
      v1::AttentionRequest req;
      if (Parse(&req, data, size)) RunAttention(req, kind == Kind::kDecode);
      return;
    }
    case Kind::kStream: {
      v1::StreamRequest req;
      if (!Parse(&req, data, size)) return;
      if (req.has_append()) RunAppend(req.append());
      if (req.has_prefill()) RunAttention(req.prefill(), /*decode=*/false);
      if (req.has_decode()) RunAttention(req.decode(), /*decode=*/true);
      return;
    }
    case Kind::kExportKv: {
      v1::ExportKvRequest req;
      if (Parse(&req, data, size)) RunTransfer(req, /*import=*/false);
      return;
    }
    case Kind::kImportKv: {
      v1::ImportKvRequest req;
      if (Parse(&req, data, size)) RunTransfer(req, /*import=*/true);
      return;
    }
    case Kind::kRegisterHostRegion:
    case Kind::kRegisterCudaRegion:
    case Kind::kRegisterCudaEvent:
    case Kind::kUnregisterRegion:
    case Kind::kUnregisterCudaEvent:
      return RunRegionCall(kind, data, size);
    default:
      return RunSequenceCall(kind, data, size);
  }
}

}  // namespace
}  // namespace attnd::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  // Invalid UTF-8 in a string field is a parse failure, logged by protobuf each time: noise.
  google::protobuf::SetLogHandler(nullptr);
  attnd::fuzz::Fixture::Get();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto kind = static_cast<attnd::fuzz::Kind>(data[0] % attnd::fuzz::kNumKinds);
  attnd::fuzz::RunOne(kind, data + 1, size - 1);
  return 0;
}
