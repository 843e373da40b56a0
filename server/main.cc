// attnd: the attention server daemon. Parses flags, builds the engine, serves gRPC on a Unix
// socket and/or TCP with health and reflection, serves /metrics, and on SIGTERM or SIGINT
// stops taking new calls, drains the in-flight ones and exits 0.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <memory>

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
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
#include "server/wire/service.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

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

// Removes a stale socket file left by a process that died; refuses to touch anything else.
absl::Status PrepareUnixSocket(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode))
    return absl::FailedPreconditionError(
        absl::StrCat("--unix_socket=", path, " exists and is not a socket"));
  unlink(path.c_str());
  return absl::OkStatus();
}

int Run(const ServerConfig& config) {
  spdlog::info("layers={} qo_heads={} kv_heads={} head_dim={} page_size={}",
               config.model.num_layers, config.model.num_qo_heads, config.model.num_kv_heads,
               config.model.head_dim, config.model.page_size);

  Metrics metrics(config.devices);
  auto platform = CreateDevicePlatform(config);
  if (!platform.ok()) {
    spdlog::error("cannot start: {}", platform.status().ToString());
    return 1;
  }
  auto engine_or = Engine::Create(config, *std::move(platform), &metrics);
  if (!engine_or.ok()) {
    spdlog::error("cannot start: {}", engine_or.status().ToString());
    return 1;
  }
  std::unique_ptr<Engine> engine = *std::move(engine_or);
  spdlog::info("backend={}", engine->cuda() ? "cuda" : "cpu");
  // Peers of the Unix socket are not identified yet (no PeerLookup): callers are told apart
  // by bearer token only.
  auto auth = wire::Authenticator::FromFile(config.token_file, wire::PeerLookup());
  if (!auth.ok()) {
    spdlog::error("cannot start: {}", auth.status().ToString());
    return 2;
  }
  AttentionService service(engine.get(), &metrics, auth->get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.unix_socket.empty()) {
    if (absl::Status s = PrepareUnixSocket(config.unix_socket); !s.ok()) {
      spdlog::error("{}", s.ToString());
      return 1;
    }
    builder.AddListeningPort("unix:" + config.unix_socket, grpc::InsecureServerCredentials());
  }
  int tcp_port = 0;
  if (!config.tcp_address.empty())
    builder.AddListeningPort(config.tcp_address, grpc::InsecureServerCredentials(), &tcp_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!config.tcp_address.empty() && tcp_port == 0)) {
    spdlog::error("cannot listen on unix_socket='{}' tcp_address='{}'", config.unix_socket,
                  config.tcp_address);
    return 1;
  }

  if (!config.unix_socket.empty() &&
      chmod(config.unix_socket.c_str(), static_cast<mode_t>(config.unix_socket_mode)) != 0) {
    spdlog::error("cannot set --unix_socket_mode={:o} on {}", config.unix_socket_mode,
                  config.unix_socket);
    server->Shutdown();
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  for (int d : config.devices) health->SetServingStatus(DeviceHealthName(d), true);
  engine->SetServingListener([health, &config, &engine](int index, bool serving) {
    health->SetServingStatus(DeviceHealthName(config.devices[index]), serving);
    bool any = false;
    for (int i = 0; i < engine->num_devices(); ++i) any = any || engine->device_serving(i);
    health->SetServingStatus(kServiceName, any);
    health->SetServingStatus(any);
  });

  if (absl::Status s = metrics.StartExposer(config.metrics_bind, config.metrics_port); !s.ok()) {
    spdlog::error("{}", s.ToString());
    server->Shutdown();
    return 1;
  }
  spdlog::info("listening unix={} tcp={} metrics={}:{} devices={}", config.unix_socket,
               config.tcp_address.empty() ? "off" : absl::StrCat(config.tcp_address, " port=", tcp_port),
               config.metrics_bind, config.metrics_port, config.devices.size());

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  int signal_number = 0;
  sigwait(&signals, &signal_number);

  spdlog::info("signal={} draining, deadline={}s", signal_number, config.drain_timeout_s);
  health->Shutdown();  // probes see NOT_SERVING while we drain
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(config.drain_timeout_s * 1000));
  server->Shutdown(deadline);
  spdlog::debug("grpc server shut down");
  server->Wait();
  engine.reset();  // finishes work still queued on the device workers
  if (!config.unix_socket.empty()) unlink(config.unix_socket.c_str());
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
  absl::ParseCommandLine(argc, argv);
  auto config = attnd::ConfigFromFlags();
  attnd::SetUpLogging(config.ok() ? config->log_level : "info");
  if (!config.ok()) {
    spdlog::error("bad configuration: {}", std::string(config.status().message()));
    return 2;
  }
  if (!guarded.ok()) {
    spdlog::error("cannot guard client memory: {}", std::string(guarded.message()));
    return 1;
  }
  return attnd::Run(*config);
}
