// Clients through a real attnd (issue 11's findings 2-7): a client sees and touches only what it
// made; quotas stop one client from taking the node's mappings, pages or sequences; a client's
// holdings go back when its lease runs out (it was killed) or when it asks; a second uid cannot
// make attnd open another uid's memory; calls cancelled while queued are not applied; a Stream
// that sends garbage is told so.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/shm_buffer.h"
#include "grpcpp/generic/generic_stub.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

std::vector<std::string> CpuModel(std::vector<std::string> extra = {}) {
  std::vector<std::string> flags = {"--backend=cpu", "--num_layers=1", "--num_qo_heads=8",
                                    "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16",
                                    "--page_size=16", "--pages_per_device=256"};
  flags.insert(flags.end(), extra.begin(), extra.end());
  return flags;
}

std::unique_ptr<client::Client> Connect(const ServerProcess& server, std::string name = "",
                                        std::string token = "") {
  client::ClientOptions options;
  options.client_name = std::move(name);
  options.token = std::move(token);
  auto c = client::Client::Connect(server.unix_target(), options);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

uint64_t Seed() { return std::random_device{}(); }

// ---- Finding 5: no client sees or touches another's ----

TEST(Tenancy, AClientSeesAndTouchesOnlyItsOwnRegionsAndSequences) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  auto a = Connect(**server, "a");
  auto b = Connect(**server, "b");
  ASSERT_TRUE(a && b);
  auto ha = Harness::Create(a.get(), "main", 0, 64, Seed());
  ASSERT_TRUE(ha.ok()) << ha.status();
  ASSERT_TRUE((*ha)->CreateSequence(7).ok());
  ASSERT_TRUE((*ha)->Attend(0, {{7, 20}}, /*decode=*/false).ok());

  // B sees nothing of A's ...
  auto regions = b->ListRegions();
  ASSERT_TRUE(regions.ok());
  EXPECT_EQ(regions->regions_size(), 0);
  auto seqs = b->ListSequences(0);
  ASSERT_TRUE(seqs.ok());
  EXPECT_EQ(seqs->sequences_size(), 0);
  EXPECT_EQ(b->GetSequence(0, 7).status().code(), absl::StatusCode::kNotFound);
  // ... and can change none of it.
  EXPECT_EQ(b->TruncateSequence(0, 7, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(b->ReleaseSequence(0, 7).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(b->ForkSequence(0, 7, 8).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(b->UnregisterRegion("main").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(b->CreateSequence(0, 7).ok());  // B's own sequence 7
  const v1::AttentionRequest a_request = (*ha)->BuildAttention(0, {{7, 1}}, /*decode=*/true);
  const absl::Status refused = b->Decode(a_request).status();  // names A's region
  EXPECT_EQ(refused.code(), absl::StatusCode::kNotFound) << refused;

  // A's sequence and region are as A left them: its next decode still matches the reference.
  auto mine = a->GetSequence(0, 7);
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(mine->layer_lengths(0), 20u);
  EXPECT_TRUE((*ha)->Attend(0, {{7, 1}}, /*decode=*/true).ok());
  EXPECT_EQ(b->GetSequence(0, 7)->layer_lengths(0), 0u);
}

// ---- Finding 2: quotas ----

TEST(Tenancy, RegionQuotaStopsOneClientFromTakingEveryMappingAndSparesOthers) {
  const std::string token_file = absl::StrCat(::testing::TempDir(), "/tokens-", getpid());
  std::ofstream(token_file) << "alice alice-0123456789abcdef\nbob bob-0123456789abcdef\n";
  auto server = ServerProcess::Start(CpuModel(
      {"--max_regions_per_client=16", absl::StrCat("--token_file=", token_file)}));
  ASSERT_TRUE(server.ok()) << server.status();
  auto alice = Connect(**server, "", "alice-0123456789abcdef");
  auto alice2 = Connect(**server, "second-instance", "alice-0123456789abcdef");
  auto bob = Connect(**server, "", "bob-0123456789abcdef");
  auto object = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey(), 4096);
  ASSERT_TRUE(object.ok());
  for (int i = 0; i < 16; ++i)
    ASSERT_TRUE(alice->RegisterHostRegion(absl::StrCat("r", i), (*object)->key(), 0, 4096).ok());
  const absl::Status over = alice->RegisterHostRegion("r16", (*object)->key(), 0, 4096);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
  // Another instance of the same principal shares the quota; another principal has its own.
  EXPECT_EQ(alice2->RegisterHostRegion("x", (*object)->key(), 0, 4096).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(bob->RegisterHostRegion("r0", (*object)->key(), 0, 4096).ok());
  EXPECT_EQ(*bob->Health(""), grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_TRUE(alice->UnregisterRegion("r3").ok());
  EXPECT_TRUE(alice->RegisterHostRegion("r16", (*object)->key(), 0, 4096).ok());
  EXPECT_EQ((*server)->Terminate(), 0);
}

TEST(Tenancy, SequenceAndPageQuotasRefuseWhatWouldPassThemAndChangeNothing) {
  auto server = ServerProcess::Start(
      CpuModel({"--max_sequences_per_client=4", "--max_pages_per_client=8"}));
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = Connect(**server);
  auto h = Harness::Create(c.get(), "main", 0, 256, Seed());
  ASSERT_TRUE(h.ok()) << h.status();
  for (uint64_t id = 1; id <= 4; ++id) ASSERT_TRUE((*h)->CreateSequence(id).ok());
  EXPECT_EQ(c->CreateSequence(0, 5).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(c->ForkSequence(0, 1, 5).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE((*h)->Attend(0, {{1, 100}}, /*decode=*/false).ok());  // 7 pages of 16
  const absl::Status over = (*h)->Attend(0, {{2, 40}}, /*decode=*/false);  // 3 more
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
  EXPECT_EQ(c->GetSequence(0, 2)->layer_lengths(0), 0u);
  EXPECT_TRUE((*h)->Attend(0, {{2, 16}}, /*decode=*/false).ok());  // exactly the 8th page
  auto info = c->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->devices(0).free_pages(), 256u - 8u);
}

// ---- Finding 6: leases ----

struct Probe {
  pid_t pid = -1;
  FILE* out = nullptr;
};

// The probe's path: ATTND_CLIENT_PROBE in the environment overrides the build's (bundles run
// elsewhere).
std::string ProbePath() {
  const char* from_env = getenv("ATTND_CLIENT_PROBE");
  return from_env != nullptr ? from_env : ATTND_CLIENT_PROBE;
}

// A copy of the probe another uid can run: the build folder may sit in a directory only root
// can enter (a checkout under `mktemp -d` is 0700).
std::string ProbeForAnyUid() {
  char dir[] = "/tmp/attnd-probe-XXXXXX";
  if (mkdtemp(dir) == nullptr || chmod(dir, 0755) != 0) return "";
  const std::string copy = std::string(dir) + "/client_probe";
  std::ifstream in(ProbePath(), std::ios::binary);
  std::ofstream(copy, std::ios::binary) << in.rdbuf();
  if (chmod(copy.c_str(), 0755) != 0) return "";
  return copy;
}

// Starts the probe (`binary`, default ProbePath()), as `uid` when given (the test runs as root).
Probe StartProbe(std::vector<std::string> args, std::optional<uid_t> uid = std::nullopt,
                 std::string binary = ProbePath()) {
  int pipe_fds[2];
  EXPECT_EQ(pipe(pipe_fds), 0);
  Probe probe;
  probe.pid = fork();
  if (probe.pid == 0) {
    dup2(pipe_fds[1], STDOUT_FILENO);
    close(pipe_fds[0]);
    if (uid.has_value() && (setgid(*uid) != 0 || setuid(*uid) != 0)) _exit(3);
    std::vector<char*> argv;
    argv.push_back(binary.data());
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(binary.c_str(), argv.data());
    _exit(4);
  }
  close(pipe_fds[1]);
  probe.out = fdopen(pipe_fds[0], "r");
  return probe;
}

std::string ReadLine(const Probe& probe) {
  char line[1024];
  if (fgets(line, sizeof line, probe.out) == nullptr) return "";
  return line;
}

TEST(Tenancy, AKilledClientsHoldingsAreReleasedWhenItsLeaseRunsOut) {
  auto server = ServerProcess::Start(CpuModel({"--lease_timeout_s=1"}));
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<Probe> probes;
  for (int i = 0; i < 10; ++i)
    probes.push_back(StartProbe({absl::StrCat("--target=", (*server)->unix_target()),
                                 absl::StrCat("--client_name=held-", i), "--mode=hold"}));
  for (Probe& p : probes) ASSERT_EQ(ReadLine(p), "READY\n");
  auto watcher = Connect(**server, "watcher");
  auto info = watcher->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->devices(0).live_sequences(), 40u);
  EXPECT_LT(info->devices(0).free_pages(), 256u);
  for (Probe& p : probes) {
    kill(p.pid, SIGKILL);
    waitpid(p.pid, nullptr, 0);
    fclose(p.out);
  }
  // The lease runs out a second after the connection ends; the lease thread looks four times a
  // timeout. Allow ten seconds on a loaded machine.
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (absl::Now() < give_up) {
    info = watcher->GetServerInfo();
    ASSERT_TRUE(info.ok());
    if (info->devices(0).live_sequences() == 0 && info->devices(0).free_pages() == 256u) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(info->devices(0).live_sequences(), 0u);
  EXPECT_EQ(info->devices(0).free_pages(), 256u);
  const std::string log = (*server)->Log();
  size_t expired = 0;
  for (size_t at = log.find("lease expired"); at != std::string::npos;
       at = log.find("lease expired", at + 1))
    ++expired;
  EXPECT_EQ(expired, 10u) << log;
}

TEST(Tenancy, ReleaseAllGivesBackEverythingTheCallerHoldsAndNothingElse) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  auto a = Connect(**server, "a");
  auto b = Connect(**server, "b");
  auto ha = Harness::Create(a.get(), "main", 0, 64, Seed());
  auto hb = Harness::Create(b.get(), "main", 0, 64, Seed());
  ASSERT_TRUE(ha.ok() && hb.ok());
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE((*ha)->CreateSequence(id).ok());
    ASSERT_TRUE((*ha)->Attend(0, {{id, 17}}, /*decode=*/false).ok());
  }
  ASSERT_TRUE((*hb)->CreateSequence(1).ok());
  ASSERT_TRUE((*hb)->Attend(0, {{1, 5}}, /*decode=*/false).ok());
  auto lease = a->GetLease();
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->sequences(), 3u);
  EXPECT_EQ(lease->pages(), 6u);
  EXPECT_EQ(lease->regions(), 1u);
  EXPECT_EQ(lease->client(), absl::StrCat("uid:", getuid(), "/a"));
  auto released = a->ReleaseAll();
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_EQ(released->sequences(), 3u);
  EXPECT_EQ(released->freed_pages(), 6u);
  EXPECT_EQ(released->regions(), 1u);
  EXPECT_EQ(a->ListSequences(0)->sequences_size(), 0);
  EXPECT_EQ(a->ListRegions()->regions_size(), 0);
  EXPECT_TRUE((*hb)->Attend(0, {{1, 1}}, /*decode=*/true).ok());  // B untouched
  EXPECT_EQ(a->GetServerInfo()->devices(0).free_pages(), 256u - 1u);
}

// ---- Finding 4: the confused deputy ----

TEST(Tenancy, ASecondUidCannotRegisterAnotherUidsObjectButCanRegisterItsOwn) {
  if (getuid() != 0) GTEST_SKIP() << "needs root to run a client as another uid";
  auto server = ServerProcess::Start(CpuModel({"--unix_socket_mode=0666"}));
  ASSERT_TRUE(server.ok()) << server.status();
  auto secret = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey(), 4096);
  ASSERT_TRUE(secret.ok());  // root's, mode 0600
  const std::string probe_copy = ProbeForAnyUid();
  ASSERT_FALSE(probe_copy.empty()) << "cannot copy the probe to /tmp";
  Probe probe = StartProbe({absl::StrCat("--target=", (*server)->unix_target()),
                            "--mode=register_foreign",
                            absl::StrCat("--shm_key=", (*secret)->key())},
                           /*uid=*/65534, probe_copy);
  const std::string foreign = ReadLine(probe);
  const std::string own = ReadLine(probe);
  waitpid(probe.pid, nullptr, 0);
  fclose(probe.out);
  EXPECT_TRUE(absl::StartsWith(foreign, "register_foreign code=7 ")) << foreign;  // PERMISSION_DENIED
  EXPECT_TRUE(absl::StartsWith(own, "register_own code=0 ")) << own;
  unlink(probe_copy.c_str());
  rmdir(probe_copy.substr(0, probe_copy.rfind('/')).c_str());
  auto root = Connect(**server);
  EXPECT_EQ(root->ListRegions()->regions_size(), 0);  // nobody's region is nobody's
}

TEST(Tenancy, ATcpCallerWithoutAUidGetsNoHostRegions) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = client::Client::Connect((*server)->tcp_target());
  ASSERT_TRUE(c.ok());
  auto object = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey(), 4096);
  ASSERT_TRUE(object.ok());
  const absl::Status s = (*c)->RegisterHostRegion("r", (*object)->key(), 0, 4096);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
}

// ---- Finding 3: cancellation ----

TEST(Tenancy, PrefillsCancelledWhileQueuedAreNotApplied) {
  if (E2eBackend() != "cpu")
    GTEST_SKIP() << "needs a call that holds the device worker for seconds: one CPU thread's "
                    "4096-token prefill does, a GPU's takes milliseconds";
  auto server = ServerProcess::Start(
      {"--backend=cpu", "--cpu_threads=1", "--num_layers=1", "--num_qo_heads=8",
       "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16", "--page_size=16",
       "--pages_per_device=1024"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = Connect(**server);
  auto h = Harness::Create(c.get(), "main", 0, 4096, Seed());
  ASSERT_TRUE(h.ok()) << h.status();
  for (uint64_t id = 1; id <= 6; ++id) ASSERT_TRUE((*h)->CreateSequence(id).ok());
  const v1::AttentionRequest long_prefill = (*h)->BuildAttention(0, {{1, 4096}}, false);
  std::thread long_call([&] { (void)c->Prefill(long_prefill); });
  absl::SleepFor(absl::Milliseconds(200));  // on the device worker by now

  auto channel = grpc::CreateChannel((*server)->unix_target(), grpc::InsecureChannelCredentials());
  auto stub = v1::Attention::NewStub(channel);
  std::vector<std::thread> cancelled;
  std::vector<grpc::Status> outcomes(5);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<v1::AttentionRequest> requests;
  for (uint64_t id = 2; id <= 6; ++id) requests.push_back((*h)->BuildAttention(0, {{id, 64}}, false));
  for (size_t i = 0; i < requests.size(); ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    cancelled.emplace_back([&, i, ctx = contexts.back().get()] {
      v1::AttentionResponse resp;
      outcomes[i] = stub->Prefill(ctx, requests[i], &resp);
    });
  }
  absl::SleepFor(absl::Milliseconds(200));  // queued behind the long prefill
  for (auto& ctx : contexts) ctx->TryCancel();
  for (std::thread& t : cancelled) t.join();
  long_call.join();
  for (const grpc::Status& s : outcomes) EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED);
  for (uint64_t id = 2; id <= 6; ++id)
    EXPECT_EQ(c->GetSequence(0, id)->layer_lengths(0), 0u) << "sequence " << id;
}

// ---- Finding 7: a Stream that sends garbage ----

TEST(Tenancy, AStreamThatSendsAnUnparsableMessageEndsWithInvalidArgument) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel((*server)->unix_target(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  grpc::CompletionQueue cq;
  void* tag;
  bool ok;
  auto call = stub.PrepareCall(&ctx, "/attnd.v1.Attention/Stream", &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  // A valid request (its answer: INVALID_ARGUMENT in-band, no op), then bytes no parser accepts.
  v1::StreamRequest valid;
  valid.set_tag(5);
  std::string bytes = valid.SerializeAsString();
  grpc::Slice valid_slice(bytes);
  grpc::ByteBuffer first(&valid_slice, 1);
  call->Write(first, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::Slice garbage_slice(std::string("\xff\xff\xff\xff\x0f", 5));
  grpc::ByteBuffer garbage(&garbage_slice, 1);
  call->Write(garbage, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::ByteBuffer reply;
  call->Read(&reply, reinterpret_cast<void*>(4));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  ASSERT_TRUE(ok) << "the valid request was not answered";
  v1::StreamResponse answered;
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(reply.Dump(&slices).ok());
  std::string text;
  for (const grpc::Slice& s : slices) text.append(reinterpret_cast<const char*>(s.begin()), s.size());
  ASSERT_TRUE(answered.ParseFromString(text));
  EXPECT_EQ(answered.tag(), 5u);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  EXPECT_TRUE((*server)->Running());
}

}  // namespace
}  // namespace attnd::testing
