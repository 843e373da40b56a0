// attnd's transport through a real process: TLS on TCP (with and without client certificates,
// from throwaway certificates the openssl CLI makes here), the refusal of clear-text TCP that
// was not asked for, and the SIGTERM drain: health reads NOT_SERVING while calls are still
// served, open Streams end with UNAVAILABLE, and busy clients do not hold the exit past
// --drain_timeout_s.
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "grpcpp/grpcpp.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

using grpc::health::v1::HealthCheckResponse;

constexpr char kServerName[] = "attnd.test";  // the only name in the server's certificate

std::vector<std::string> CpuModel() {
  return {"--backend=cpu", "--num_layers=1", "--num_qo_heads=8", "--num_kv_heads=2",
          "--head_dim=64",  "--dtype=bf16",  "--page_size=16",    "--pages_per_device=2048"};
}

// A CA, a server certificate for kServerName and a client certificate, all signed by the CA,
// made in a fresh temp dir and removed with it.
class Pki {
 public:
  Pki() {
    char dir[] = "/tmp/attnd-pki-XXXXXX";
    if (mkdtemp(dir) == nullptr) return;
    dir_ = dir;
    std::ofstream(dir_ + "/server.ext") << "subjectAltName=DNS:" << kServerName << "\n"
                                        << "extendedKeyUsage=serverAuth\n";
    std::ofstream(dir_ + "/client.ext") << "extendedKeyUsage=clientAuth\n";
    const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string script = absl::StrCat(
        "cd ", dir_, " && (set -e; ",
        "openssl req -x509 ", ec, " -days 2 -subj /CN=attnd-test-ca -keyout ca.key -out ca.pem ",
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign; ",
        "for who in server client; do ",
        "openssl req ", ec, " -subj /CN=$who -keyout $who.key -out $who.csr; ",
        "openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 ",
        "-extfile $who.ext -out $who.pem; done) > openssl.log 2>&1");
    ok_ = std::system(script.c_str()) == 0;
  }
  ~Pki() {
    if (!dir_.empty()) std::system(absl::StrCat("rm -rf ", dir_).c_str());
  }

  bool ok() const { return ok_; }
  std::string Log() const {
    std::ifstream in(dir_ + "/openssl.log");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  std::string File(const std::string& name) const { return dir_ + "/" + name; }

  // attnd's flags for TLS on a free loopback port.
  std::vector<std::string> ServerFlags() const {
    std::vector<std::string> flags = CpuModel();
    flags.push_back(absl::StrCat("--tcp_address=127.0.0.1:", PickFreePort()));
    flags.push_back("--tls_cert_file=" + File("server.pem"));
    flags.push_back("--tls_key_file=" + File("server.key"));
    return flags;
  }

  // A client that trusts the CA; with a certificate of its own when `with_cert`.
  client::ClientOptions ClientOptions(bool with_cert) const {
    client::ClientOptions options;
    options.tls_ca_file = File("ca.pem");
    options.tls_server_name = kServerName;
    if (with_cert) {
      options.tls_cert_file = File("client.pem");
      options.tls_key_file = File("client.key");
    }
    return options;
  }

 private:
  std::string dir_;
  bool ok_ = false;
};

// Connects without waiting (a refused handshake shows on the first call) and checks health.
absl::Status HealthOver(const std::string& target, client::ClientOptions options) {
  options.connect_timeout = absl::ZeroDuration();
  options.default_timeout = absl::Seconds(5);
  auto c = client::Client::Connect(target, options);
  if (!c.ok()) return c.status();
  auto health = (*c)->Health("");
  if (!health.ok()) return health.status();
  if (*health != HealthCheckResponse::SERVING) return absl::UnavailableError("not SERVING");
  return absl::OkStatus();
}

class Tls : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(pki_.ok()) << "openssl failed:\n" << pki_.Log(); }
  Pki pki_;
};

TEST_F(Tls, AClientTrustingTheCaIsServedAndItsCallsWork) {
  // A token naming this uid lets the TCP client share memory (host regions).
  const UidToken uid_token = MakeUidToken();
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back(uid_token.flag);
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  client::ClientOptions options = pki_.ClientOptions(false);
  options.token = uid_token.token;
  EXPECT_TRUE(HealthOver((*server)->tcp_target(), options).ok());

  auto c = client::Client::Connect((*server)->tcp_target(), options);
  ASSERT_TRUE(c.ok()) << c.status();
  auto h = Harness::Create(c->get(), "main", 0, 64, std::random_device{}());
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE((*h)->CreateSequence(1).ok());
  EXPECT_TRUE((*h)->Attend(0, {{1, 20}}, /*decode=*/false).ok());
  EXPECT_TRUE((*h)->Attend(0, {{1, 1}}, /*decode=*/true).ok());
  h->reset();
  c->reset();
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST_F(Tls, APlaintextClientIsRefusedByTheTlsPort) {
  auto server = ServerProcess::Start(pki_.ServerFlags());
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_FALSE(HealthOver((*server)->tcp_target(), client::ClientOptions()).ok());
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST_F(Tls, AClientThatDoesNotTrustTheServersCaIsRefused) {
  auto server = ServerProcess::Start(pki_.ServerFlags());
  ASSERT_TRUE(server.ok()) << server.status();
  client::ClientOptions options = pki_.ClientOptions(false);
  options.tls_ca_file = pki_.File("client.pem");  // a certificate, but not the server's CA
  EXPECT_FALSE(HealthOver((*server)->tcp_target(), options).ok());
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST_F(Tls, WithAClientCaAClientWithoutACertificateIsRefused) {
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back("--tls_client_ca_file=" + pki_.File("ca.pem"));
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_FALSE(HealthOver((*server)->tcp_target(), pki_.ClientOptions(false)).ok());
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST_F(Tls, WithAClientCaAClientWithACertificateIsServed) {
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back("--tls_client_ca_file=" + pki_.File("ca.pem"));
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  const absl::Status health = HealthOver((*server)->tcp_target(), pki_.ClientOptions(true));
  EXPECT_TRUE(health.ok()) << health;
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

// attnd that must refuse to start: the message of ServerProcess::Start names the exit status.
void ExpectExitTwoNaming(const std::vector<std::string>& flags, const std::string& named) {
  auto server = ServerProcess::Start(flags);
  ASSERT_FALSE(server.ok());
  const std::string message(server.status().message());
  EXPECT_NE(message.find("with status 2:"), std::string::npos) << message;
  EXPECT_NE(message.find(named), std::string::npos) << message;
}

TEST(TcpWithoutTls, AttndExitsTwoNamingTheFlagsItNeeds) {
  std::vector<std::string> flags = CpuModel();
  flags.push_back(absl::StrCat("--tcp_address=127.0.0.1:", PickFreePort()));
  ExpectExitTwoNaming(flags, "--tls_cert_file");
  ExpectExitTwoNaming(flags, "--insecure_tcp");
}

TEST_F(Tls, AnUnreadableCertificateFileExitsTwoNamingItsFlag) {
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back("--tls_cert_file=" + pki_.File("missing.pem"));  // the later flag wins
  ExpectExitTwoNaming(flags, "--tls_cert_file=" + pki_.File("missing.pem"));
}

TEST_F(Tls, AKeyThatIsNotTheCertificatesExitsTwoNamingItsFlag) {
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back("--tls_key_file=" + pki_.File("client.key"));
  ExpectExitTwoNaming(flags, "--tls_key_file=" + pki_.File("client.key"));
}

TEST_F(Tls, AClientCaFileWithoutACertificateExitsTwoNamingItsFlag) {
  std::vector<std::string> flags = pki_.ServerFlags();
  flags.push_back("--tls_client_ca_file=" + pki_.File("server.ext"));
  ExpectExitTwoNaming(flags, "--tls_client_ca_file=" + pki_.File("server.ext"));
}

// ---- Drain ----

// Sends SIGTERM without waiting for the exit.
void SendSigterm(const ServerProcess& server) { ASSERT_EQ(kill(server.pid(), SIGTERM), 0); }

TEST(Drain, HealthReadsNotServingWhileCallsAreStillServed) {
  std::vector<std::string> flags = CpuModel();
  flags.push_back("--drain_timeout_s=8");  // a grace of 1 s before calls are refused
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = client::Client::Connect((*server)->unix_target());
  ASSERT_TRUE(c.ok()) << c.status();
  auto before = (*c)->Health("attnd.v1.Attention/device/0");
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(*before, HealthCheckResponse::SERVING);

  SendSigterm(**server);
  // The first probes may still beat the signal; one within the grace must read NOT_SERVING.
  absl::StatusOr<HealthCheckResponse::ServingStatus> seen = HealthCheckResponse::SERVING;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(900);
  while (seen.ok() && *seen == HealthCheckResponse::SERVING &&
         std::chrono::steady_clock::now() < give_up) {
    seen = (*c)->Health("");
  }
  ASSERT_TRUE(seen.ok()) << seen.status();
  EXPECT_EQ(*seen, HealthCheckResponse::NOT_SERVING);
  for (const char* name : {"attnd.v1.Attention", "attnd.v1.Attention/device/0"}) {
    auto status = (*c)->Health(name);
    ASSERT_TRUE(status.ok()) << name << ": " << status.status();
    EXPECT_EQ(*status, HealthCheckResponse::NOT_SERVING) << name;
  }
  c->reset();
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST(Drain, AnOpenIdleStreamEndsWithUnavailable) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  grpc::Status status;
  {
    auto channel =
        grpc::CreateChannel((*server)->unix_target(), grpc::InsecureChannelCredentials());
    auto stub = v1::Attention::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    auto stream = stub->Stream(&context);
    // One round trip, so the stream is open on the server before the signal: a request with
    // no op is refused in its answer and the stream goes on.
    v1::StreamRequest request;
    request.set_tag(1);
    ASSERT_TRUE(stream->Write(request));
    v1::StreamResponse response;
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_EQ(response.code(), grpc::StatusCode::INVALID_ARGUMENT);

    SendSigterm(**server);
    EXPECT_FALSE(stream->Read(&response));  // blocks until attnd ends the stream
    status = stream->Finish();
  }  // hung up (the context holds the connection too): attnd need not wait for it to leave
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_EQ(status.error_message(), "attnd is shutting down");
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

TEST(Drain, BusyStreamsDoNotHoldTheExitPastTheDrainTimeout) {
  std::vector<std::string> flags = CpuModel();
  flags.push_back("--drain_timeout_s=3");
  flags.push_back("--metrics_port=auto");  // its HTTP server is slow to stop
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = client::Client::Connect((*server)->unix_target());
  ASSERT_TRUE(c.ok()) << c.status();

  // Each client thread decodes on a Stream in a loop, and opens a new one when a Stream ends,
  // until the test stops it.
  std::atomic<bool> stop{false};
  std::atomic<int> decoded[2] = {0, 0};  // per client: the drain must find both busy
  std::atomic<int> wrong{0};
  std::string ended[2];  // how each client's first Stream ended
  std::vector<std::thread> clients;
  for (int t = 0; t < 2; ++t) {
    clients.emplace_back([&, t] {
      auto h = Harness::Create(c->get(), absl::StrCat("busy", t), 0, 64, std::random_device{}());
      if (!h.ok() || !(*h)->CreateSequence(t + 1).ok()) return;
      while (!stop) {
        auto stream = (*c)->OpenStream();
        while (!stop && stream.ok()) {
          const absl::Status s =
              (*h)->Attend(0, {{static_cast<uint64_t>(t + 1), 1}}, /*decode=*/true,
                           /*with_lse=*/false, Path::kStream, stream->get());
          if (s.code() == absl::StatusCode::kInternal) ++wrong;  // a wrong output or length
          if (!s.ok() && ended[t].empty()) ended[t] = s.ToString();
          if (!s.ok()) break;
          ++decoded[t];
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    });
  }
  // Both clients streaming: on a loaded machine one client's set-up (regions, sequence) can
  // take longer than the other's first 20 decodes, and a client the drain finds not yet
  // streaming ends some other way (its first Stream refused, or none opened).
  const auto busy_by = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  const auto both_busy = [&] { return decoded[0] >= 10 && decoded[1] >= 10; };
  while (!both_busy() && std::chrono::steady_clock::now() < busy_by)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const bool busy = both_busy();

  const auto signalled = std::chrono::steady_clock::now();
  const int exit_status = (*server)->Terminate(10000);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count();
  stop = true;
  for (std::thread& t : clients) t.join();
  ASSERT_TRUE(busy) << "the clients did not get going:\n" << (*server)->Log();
  EXPECT_EQ(exit_status, 0) << (*server)->Log();
  EXPECT_LT(seconds, 4.0) << (*server)->Log();
  EXPECT_EQ(wrong, 0);
  // Ended by the drain, not cancelled at the deadline.
  for (const std::string& how : ended) EXPECT_EQ(how, "UNAVAILABLE: attnd is shutting down");
  RecordProperty("exit_seconds", absl::StrCat(seconds));
}

}  // namespace
}  // namespace attnd::testing
