#include "testing/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace attnd::testing {

std::string E2eBackend() {
  const char* b = getenv("ATTND_E2E_BACKEND");
  return b != nullptr && std::string(b) == "cuda" ? "cuda" : "cpu";
}

int E2eCudaDevices() {
  const char* n = getenv("ATTND_E2E_CUDA_DEVICES");
  return n == nullptr ? 1 : std::max(1, atoi(n));
}

UidToken MakeUidToken() {
  static std::atomic<int> counter{0};
  const std::string token = absl::StrCat("e2e-", std::random_device{}(), "-", getpid(), "-",
                                         counter++, "-token");
  const std::string path = absl::StrCat("/tmp/attnd-tokens-", getpid(), "-",
                                        counter.load());
  std::ofstream(path) << "e2e " << token << " uid=" << getuid() << "\n";
  return UidToken{absl::StrCat("--token_file=", path), token};
}

// Below the ephemeral range (32768+): a port bind(0) handed out could be handed again, before
// attnd binds it, to a test running beside this one (UCX's tcp transport in the KV transfer
// tests takes ephemeral ports for its listeners and connections).
int PickFreePort() {
  static std::mutex mu;
  static std::mt19937 rng(std::random_device{}() ^ static_cast<unsigned>(getpid()));
  std::lock_guard<std::mutex> lock(mu);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int port = 20000 + static_cast<int>(rng() % 12000);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    const bool free = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    close(fd);
    if (free) return port;
  }
  return 0;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect to port ", port, ": ", strerror(errno)));
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("short write");
  }
  std::string response;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || body == std::string::npos)
    return absl::InternalError("not an HTTP response");
  return response.substr(body + 4);
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(std::vector<std::string> flags) {
  std::unique_ptr<ServerProcess> p(new ServerProcess());
  static int counter = 0;
  const std::string stem = absl::StrCat("/tmp/attnd-e2e-", getpid(), "-", counter++);
  p->socket_path_ = stem + ".sock";
  p->log_path_ = stem + ".log";
  // /metrics only where a test asks for it ("--metrics_port=auto"): stopping its HTTP server
  // costs a second or two at exit.
  for (std::string& f : flags) {
    if (f == "--backend=cpu") f = "--backend=" + E2eBackend();  // the suite's default
    if (f == "--metrics_port=auto") {
      p->metrics_port_ = PickFreePort();
      f = absl::StrCat("--metrics_port=", p->metrics_port_);
    }
  }
  if (p->metrics_port_ == 0) flags.push_back("--metrics_port=0");
  p->unix_target_ = "unix://" + p->socket_path_;
  flags.push_back("--unix_socket=" + p->socket_path_);
  // A test that passes --tcp_address= or --tls_cert_file= sets TCP up itself (TLS, or clear
  // text refused without --insecure_tcp); every other gets clear text on a free loopback port.
  if (std::none_of(flags.begin(), flags.end(), [](const std::string& f) {
        return absl::StartsWith(f, "--tcp_address=") || absl::StartsWith(f, "--tls_cert_file=");
      })) {
    const int tcp_port = PickFreePort();
    p->tcp_target_ = absl::StrCat("127.0.0.1:", tcp_port);
    flags.push_back(absl::StrCat("--tcp_address=", p->tcp_target_));
    flags.push_back("--insecure_tcp");  // loopback only
  }
  for (const std::string& f : flags) {
    if (absl::StartsWith(f, "--tcp_address=")) p->tcp_target_ = f.substr(strlen("--tcp_address="));
  }
  flags.push_back("--metrics_bind=127.0.0.1");

  // ATTND_BINARY in the environment overrides the build's path (bundles run elsewhere).
  const char* binary = getenv("ATTND_BINARY");
  std::vector<std::string> argv_storage = {binary != nullptr ? binary : ATTND_BINARY};
  argv_storage.insert(argv_storage.end(), flags.begin(), flags.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);

  pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    int log = open(p->log_path_.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    dup2(log, STDERR_FILENO);
    dup2(log, STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  p->pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (!p->Running())
      return absl::InternalError(absl::StrCat("attnd exited during start-up with status ",
                                              p->exit_status_, ":\n", p->Log()));
    // Connect only once it listens: a refused connection puts gRPC's shared subchannel into
    // a reconnect backoff of a second or more.
    if (p->Log().find("level=info listening ") == std::string::npos) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    client::ClientOptions options;
    options.connect_timeout = absl::Milliseconds(200);
    auto c = client::Client::Connect(p->unix_target_, options);
    if (c.ok()) {
      auto health = (*c)->Health("");
      if (health.ok() && *health == grpc::health::v1::HealthCheckResponse::SERVING) return p;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat("attnd did not become ready:\n", p->Log()));
}

ServerProcess::~ServerProcess() {
  if (Running()) Terminate();
  if (getenv("ATTND_E2E_KEEP_LOGS") == nullptr) unlink(log_path_.c_str());
}

bool ServerProcess::Running() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return true;
  pid_ = -1;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return false;
}

int ServerProcess::Terminate(int timeout_ms) {
  if (!Running()) return exit_status_;
  kill(pid_, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return -1;
}

std::string ServerProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace attnd::testing
