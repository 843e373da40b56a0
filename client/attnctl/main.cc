// attnctl: the operator's and developer's tool for a running attnd.
//
//   attnctl [--target=unix:///tmp/attnd.sock] health [--service=NAME]
//   attnctl --target=host:port --tls_ca_file=ca.pem [--token=...] health
//   attnctl info | stats
//   attnctl demo [--demo_sequences=16 --demo_steps=32 --seed=0 ...]
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "client/attnctl/demo.h"
#include "client/attnctl/print.h"
#include "client/client.h"
#include "client/workload/options.h"

ABSL_FLAG(std::string, target, "unix:///tmp/attnd.sock",
          "attnd address: unix:///path for a Unix socket or host:port for TCP");
ABSL_FLAG(int64_t, timeout_ms, 30000, "deadline of each RPC in milliseconds; 0 = none");
ABSL_FLAG(int64_t, connect_timeout_ms, 5000,
          "how long to wait for the server to accept the connection");
ABSL_FLAG(std::string, tls_ca_file, "",
          "TLS to a TCP target: CA certificates (PEM) the server's certificate must chain to");
ABSL_FLAG(std::string, tls_cert_file, "",
          "TLS: this client's certificate chain (PEM), for a server that requires one");
ABSL_FLAG(std::string, tls_key_file, "", "TLS: the private key (PEM) of --tls_cert_file");
ABSL_FLAG(std::string, tls_server_name, "",
          "TLS: the name the server's certificate must carry, when not the target's host");
ABSL_FLAG(std::string, token, "", "sent as 'authorization: Bearer <token>' with every call");
ABSL_FLAG(std::string, client_name, "", "sent as 'attnd-client: <name>' with every call");
ABSL_FLAG(std::string, service, "",
          "health: check only this service name (default: the server, the service and every "
          "device)");

// demo
ABSL_FLAG(uint32_t, device, 0, "demo: the server device to run on");
ABSL_FLAG(int32_t, demo_sequences, 16, "demo: sequences to prefill and decode");
ABSL_FLAG(int32_t, demo_steps, 32, "demo: decode steps (one Decode per layer each)");
ABSL_FLAG(int32_t, demo_max_prompt, 300, "demo: longest random prompt, tokens");
ABSL_FLAG(int32_t, prefill_chunk, 64, "demo: most tokens of one sequence in one Prefill item");
ABSL_FLAG(int32_t, prefill_tokens, 256, "demo: most tokens in one Prefill request");
ABSL_FLAG(uint64_t, seed, 0, "demo: random seed for shapes and data; 0 = random (printed)");
ABSL_FLAG(int32_t, bench_batch, 64, "demo: sequences in the Decode latency benchmark; 0 = skip");
ABSL_FLAG(int32_t, bench_context, 512, "demo: tokens per sequence in the benchmark");
ABSL_FLAG(int32_t, bench_calls, 200, "demo: timed Decode calls per transport in the benchmark");

namespace attnd::attnctl {
namespace {

using client::CallOptions;
using client::Client;
using grpc::health::v1::HealthCheckResponse;

absl::StatusOr<std::unique_ptr<Client>> ConnectFromFlags() {
  client::ClientOptions options;
  const int64_t timeout_ms = absl::GetFlag(FLAGS_timeout_ms);
  options.default_timeout =
      timeout_ms > 0 ? absl::Milliseconds(timeout_ms) : absl::InfiniteDuration();
  options.connect_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_connect_timeout_ms));
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.token = absl::GetFlag(FLAGS_token);
  options.client_name = absl::GetFlag(FLAGS_client_name);
  return Client::Connect(absl::GetFlag(FLAGS_target), options);
}

std::string ServingName(HealthCheckResponse::ServingStatus status) {
  switch (status) {
    case HealthCheckResponse::SERVING:
      return "SERVING";
    case HealthCheckResponse::NOT_SERVING:
      return "NOT_SERVING";
    case HealthCheckResponse::SERVICE_UNKNOWN:
      return "SERVICE_UNKNOWN";
    default:
      return "UNKNOWN";
  }
}

int Health(Client& client) {
  std::vector<std::string> services;
  if (const std::string only = absl::GetFlag(FLAGS_service); !only.empty()) {
    services.push_back(only);
  } else {
    services = {"", "attnd.v1.Attention"};
    // Devices come from ServerInfo; a server too broken to answer it still gets its overall
    // status checked and reported.
    absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
    if (info.ok()) {
      for (const v1::DeviceInfo& device : info->devices()) {
        services.push_back(absl::StrCat("attnd.v1.Attention/device/", device.device()));
      }
    } else {
      std::fprintf(stderr, "GetServerInfo: %s (device checks skipped)\n",
                   info.status().ToString().c_str());
    }
  }
  bool all_serving = true;
  for (const std::string& service : services) {
    absl::StatusOr<HealthCheckResponse::ServingStatus> status = client.Health(service);
    const std::string shown = service.empty() ? "\"\" (server)" : service;
    if (!status.ok()) {
      absl::PrintF("%-36s ERROR %s\n", shown.c_str(), status.status().ToString().c_str());
      all_serving = false;
      continue;
    }
    absl::PrintF("%-36s %s\n", shown.c_str(), ServingName(*status).c_str());
    all_serving &= *status == HealthCheckResponse::SERVING;
  }
  return all_serving ? 0 : 1;
}

int Info(Client& client) {
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  if (!info.ok()) {
    std::fprintf(stderr, "GetServerInfo: %s\n", info.status().ToString().c_str());
    return 1;
  }
  std::fputs(FormatServerInfo(*info).c_str(), stdout);
  return 0;
}

int Stats(Client& client) {
  absl::StatusOr<v1::Stats> stats = client.GetStats();
  if (!stats.ok()) {
    std::fprintf(stderr, "GetStats: %s\n", stats.status().ToString().c_str());
    return 1;
  }
  std::fputs(FormatStats(*stats).c_str(), stdout);
  return 0;
}

int Demo(Client& client) {
  workload::WorkloadOptions options;
  options.device = absl::GetFlag(FLAGS_device);
  options.sequences = absl::GetFlag(FLAGS_demo_sequences);
  options.steps = absl::GetFlag(FLAGS_demo_steps);
  options.max_prompt = absl::GetFlag(FLAGS_demo_max_prompt);
  options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  options.prefill_tokens = absl::GetFlag(FLAGS_prefill_tokens);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.bench_batch = absl::GetFlag(FLAGS_bench_batch);
  options.bench_context = absl::GetFlag(FLAGS_bench_context);
  options.bench_calls = absl::GetFlag(FLAGS_bench_calls);
  return RunDemo(client, options);
}

}  // namespace
}  // namespace attnd::attnctl

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "attnctl [flags] <command>\n"
      "commands:\n"
      "  health   grpc.health.v1 status of the server, the service and each device\n"
      "           (--service=NAME checks one name); exits 1 unless all are SERVING\n"
      "  info     the server's model shape, limits, features and devices\n"
      "  stats    request counts and mean latency per rpc and code; pages per device\n"
      "  demo     drives a prefill + decode workload and checks every output against an\n"
      "           fp64 reference computed here; then a Decode latency benchmark");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = args[1];
  if (command != "health" && command != "info" && command != "stats" && command != "demo") {
    std::fprintf(stderr, "unknown command \"%s\"\n%s\n", command.c_str(),
                 absl::ProgramUsageMessage().data());
    return 2;
  }

  absl::StatusOr<std::unique_ptr<attnd::client::Client>> client =
      attnd::attnctl::ConnectFromFlags();
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    if (command == "demo") absl::PrintF("demo: FAIL (%s)\n", client.status().ToString().c_str());
    return 1;
  }
  if (command == "health") return attnd::attnctl::Health(**client);
  if (command == "info") return attnd::attnctl::Info(**client);
  if (command == "stats") return attnd::attnctl::Stats(**client);
  return attnd::attnctl::Demo(**client);
}
