// attnd: the attention server daemon. Parses flags, builds the engine, serves gRPC on a Unix
// socket (accepted here, for the peer's credentials) and/or TCP (TLS unless --insecure_tcp)
// with health and reflection, serves /metrics, and on SIGTERM or SIGINT reports NOT_SERVING,
// ends open Streams, drains the in-flight calls and exits 0 within --drain_timeout_s.
// --check_config only checks the flags: exit 0 and the resolved configuration, or exit 2.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "server/engine/engine.h"
#include "server/platform/factory.h"
#include "server/config/flags.h"
#include "server/metrics/metrics.h"
#include "server/regions/host_guard.h"
#include "server/wire/credentials.h"
#include "server/wire/service.h"
#include "server/wire/stream_registry.h"
#include "server/wire/unix_listener.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(bool, check_config, false,
          "Check the flags (and --flagfile) as a start would, TLS and token files included, print "
          "the resolved configuration and exit: 0 if attnd would start with them, 2 if not. "
          "Touches no device, socket or port");

namespace attnd {
namespace {

constexpr char kServiceName[] = "attnd.v1.Attention";

std::string DeviceHealthName(int device) { return absl::StrCat(kServiceName, "/device/", device); }

void SetUpLogging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("attnd");
  // One event per line, key=value fields, UTC timestamps: easy for log shippers to parse.
  logger->set_pattern("ts=%Y-%m-%dT%H:%M:%S.%fZ level=%l %v", spdlog::pattern_time_type::utc);
  logger->set_level(spdlog::level::from_str(level));
  spdlog::set_default_logger(logger);
}

// Every health name SERVING ("" the server, the service, each device), then kept in step
// with the devices.
void SetUpHealth(const ServerConfig& config, grpc::Server* server, Engine* engine) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  for (int d : config.devices) health->SetServingStatus(DeviceHealthName(d), true);
  engine->SetServingListener([health, &config, engine](int index, bool serving) {
    health->SetServingStatus(DeviceHealthName(config.devices[index]), serving);
    bool any = false;
    for (int i = 0; i < engine->num_devices(); ++i) any = any || engine->device_serving(i);
    health->SetServingStatus(kServiceName, any);
    health->SetServingStatus(any);
  });
}

// Blocks until SIGTERM or SIGINT (blocked in every thread since main) arrives.
int WaitForStopSignal() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  return signal_number;
}

// The stop signal's drain, all within --drain_timeout_s of the signal: health says NOT_SERVING
// while calls are still served, then open Streams end, then gRPC stops and the device workers
// finish what is queued.
void Drain(const ServerConfig& config, grpc::Server* server, UnixListener* listener,
           Metrics* metrics) {
  const auto start = std::chrono::system_clock::now();
  const auto drain = std::chrono::milliseconds(static_cast<int64_t>(config.drain_timeout_s * 1000));
  // Every name, devices included, reads NOT_SERVING from now on, and a device that recovers
  // cannot flip one back.
  server->GetHealthCheckService()->Shutdown();
  // civetweb takes up to 2 s to stop /metrics; in parallel with the drain it adds nothing to
  // the exit unless --drain_timeout_s is under a second. Scrapes during the drain fail.
  std::thread stop_metrics([metrics] { metrics->StopExposer(); });
  // Calls are still served for a moment so that load balancers and probes see NOT_SERVING and
  // route new work elsewhere; stopping at once would show them only refused connections.
  std::this_thread::sleep_for(std::min<std::chrono::system_clock::duration>(
      std::chrono::seconds(1), drain / 4));
  if (listener != nullptr) listener->StopAccepting();
  // A Stream never ends by itself: each is told to end (UNAVAILABLE) once the requests it has
  // in flight are answered, or gRPC's shutdown would wait on it until the deadline.
  wire::StreamRegistry::Global().CloseAll();
  // Refuses new calls, waits for those in flight, and cancels whatever is left at the deadline.
  server->Shutdown(start + drain);
  spdlog::debug("grpc server shut down");
  server->Wait();
  stop_metrics.join();
}

// Who is at the other end of a call's Unix-socket connection, for the Authenticator.
wire::PeerLookup PeerLookupOf(const UnixListener* listener) {
  if (listener == nullptr) return {};
  const PeerTable* peers = &listener->peers();
  return [peers](absl::string_view grpc_peer) -> std::optional<wire::PeerIdentity> {
    std::optional<Peer> peer = peers->Find(grpc_peer);
    if (!peer.has_value()) return std::nullopt;
    return wire::PeerIdentity{peer->connection_id, static_cast<uint32_t>(peer->uid)};
  };
}

// What a start checks before it touches a device or a port: the TLS files and the token file.
// Exit 2 with a message, as the start itself would; else the configuration on stdout and 0.
int CheckConfig(const ServerConfig& config) {
  if (!config.tcp_address.empty()) {
    if (auto credentials = TcpServerCredentials(config); !credentials.ok()) {
      spdlog::error("bad configuration: {}", std::string(credentials.status().message()));
      return 2;
    }
  }
  if (auto auth = wire::Authenticator::FromFile(config.token_file, {}); !auth.ok()) {
    spdlog::error("bad configuration: {}", auth.status().ToString());
    return 2;
  }
  std::fputs(Describe(config).c_str(), stdout);
  std::puts("config OK");
  return 0;
}

int Run(ServerConfig config) {
  spdlog::info("layers={} qo_heads={} kv_heads={} head_dim={} page_size={} kv_cache={}",
               config.model.num_layers, config.model.num_qo_heads, config.model.num_kv_heads,
               config.model.head_dim, config.model.page_size,
               KvCacheDTypeFlagValue(config.model.kv_storage));
  std::shared_ptr<grpc::ServerCredentials> tcp_credentials;
  if (!config.tcp_address.empty()) {
    auto credentials = TcpServerCredentials(config);
    if (!credentials.ok()) {
      spdlog::error("bad configuration: {}", std::string(credentials.status().message()));
      return 2;
    }
    tcp_credentials = *std::move(credentials);
  }

  auto platform = CreateDevicePlatform(config);
  if (!platform.ok()) {
    spdlog::error("cannot start: {}", platform.status().ToString());
    return 1;
  }
  if (config.devices.empty()) config.devices = (*platform)->VisibleDevices();  // --devices=all
  Metrics metrics(config.devices);
  auto engine_or = Engine::Create(config, *std::move(platform), &metrics);
  if (!engine_or.ok()) {
    spdlog::error("cannot start: {}", engine_or.status().ToString());
    return 1;
  }
  std::unique_ptr<Engine> engine = *std::move(engine_or);
  spdlog::info("backend={}", engine->cuda() ? "cuda" : "cpu");

  // attnd accepts the Unix socket itself, to learn each connection's uid (UnixListener); gRPC
  // listens only on TCP, if at all. A connection's end starts its clients' lease countdown.
  std::unique_ptr<UnixListener> listener;
  if (!config.unix_socket.empty()) {
    auto created = UnixListener::Create(config.unix_socket, config.unix_socket_mode);
    if (!created.ok()) {
      spdlog::error("cannot listen on --unix_socket: {}", created.status().ToString());
      return 1;
    }
    listener = *std::move(created);
    listener->set_close_callback([clients = &engine->clients()](uint64_t connection) {
      clients->ConnectionClosed(connection, absl::Now());
    });
  }
  auto auth = wire::Authenticator::FromFile(config.token_file, PeerLookupOf(listener.get()));
  if (!auth.ok()) {
    spdlog::error("cannot start: {}", auth.status().ToString());
    return 2;
  }
  auto kv_transfer = wire::KvTransfer::Create(engine.get());
  if (!kv_transfer.ok()) {
    spdlog::error("bad configuration: {}", kv_transfer.status().ToString());
    return 2;
  }
  AttentionService service(engine.get(), &metrics, auth->get());
  service.SetKvTransfer(kv_transfer->get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int tcp_port = 0;
  if (!config.tcp_address.empty())
    builder.AddListeningPort(config.tcp_address, tcp_credentials, &tcp_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!config.tcp_address.empty() && tcp_port == 0)) {
    spdlog::error("cannot listen on tcp_address='{}'", config.tcp_address);
    return 1;
  }
  if (listener != nullptr) listener->Start(server.get());
  SetUpHealth(config, server.get(), engine.get());

  if (absl::Status s = metrics.StartExposer(config.metrics_bind, config.metrics_port); !s.ok()) {
    spdlog::error("{}", s.ToString());
    if (listener != nullptr) listener->StopAccepting();
    server->Shutdown();
    return 1;
  }
  spdlog::info("listening unix={} tcp={} tls={} metrics={}:{} devices={}", config.unix_socket,
               config.tcp_address.empty() ? "off" : absl::StrCat(config.tcp_address, " port=", tcp_port),
               config.tls_cert_file.empty() ? "off"
               : config.tls_client_ca_file.empty() ? "on" : "on+client_certs",
               config.metrics_bind, config.metrics_port, config.devices.size());

  const int signal_number = WaitForStopSignal();
  spdlog::info("signal={} draining, deadline={}s", signal_number, config.drain_timeout_s);
  Drain(config, server.get(), listener.get(), &metrics);
  listener.reset();  // stops watching connections (the socket file went at StopAccepting)
  kv_transfer->reset();  // pulls end before the pools they write go
  engine.reset();    // finishes work still queued on the device workers
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace attnd

int main(int argc, char** argv) {
  // A crash (SIGSEGV, SIGABRT, ...) prints the faulting thread's stack to stderr, the log.
  absl::InitializeSymbolizer(argv[0]);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions());
  // After absl's handler, so that a SIGBUS outside client memory still reaches it. A client
  // that shrinks its shm object under attnd must not kill the server (host_guard.h).
  const absl::Status guarded = attnd::InstallHostGuard();
  // Block the stop signals before any thread starts, so every thread inherits the mask and
  // the main thread alone receives them through sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // Debian's abseil is built without NDEBUG, which leaves absl::Mutex deadlock detection on:
  // every nested lock (gRPC's own included) then updates one global lock-order graph under a
  // global lock, ~60 ns each and a point of contention between gRPC's threads and the device
  // workers. attnd's lock order is fixed by design; the tests' builds keep the check.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::SetProgramUsageMessage(
      "attnd: attention server. Flags may also come from a config file: --flagfile=PATH.");
  // Unknown flags and malformed values end here, in absl's parser (exit 1, the flag named).
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  auto config = attnd::ConfigFromFlags();
  // A word without dashes (a manifest's "insecure_tcp") would otherwise be dropped silently.
  if (config.ok() && positional.size() > 1)
    config = absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", positional[1], "': flags are --name=value"));
  attnd::SetUpLogging(config.ok() ? config->log_level : "info");
  if (!config.ok()) {
    spdlog::error("bad configuration: {}", std::string(config.status().message()));
    return 2;
  }
  if (absl::GetFlag(FLAGS_check_config)) return attnd::CheckConfig(*config);
  if (!guarded.ok()) {
    spdlog::error("cannot guard client memory: {}", std::string(guarded.message()));
    return 1;
  }
  return attnd::Run(*config);
}
