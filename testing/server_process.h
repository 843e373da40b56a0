// Starts a real attnd process for end-to-end tests and stops it with SIGTERM.
#ifndef ATTND_TESTING_SERVER_PROCESS_H_
#define ATTND_TESTING_SERVER_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"

namespace attnd::testing {

class ServerProcess {
 public:
  // Starts attnd with `flags` plus a fresh Unix socket and plaintext TCP on a free loopback
  // port, and waits until it reports SERVING over the socket. Flags holding --tcp_address= or
  // --tls_cert_file= get no TCP flags added (tcp_target() is their --tcp_address, if any).
  // /metrics is off unless `flags` holds "--metrics_port=auto", which becomes a free port. If
  // attnd exits during start-up, the error names its exit status and holds its log.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(std::vector<std::string> flags);
  // Sends SIGTERM if still running.
  ~ServerProcess();

  const std::string& unix_target() const { return unix_target_; }
  const std::string& tcp_target() const { return tcp_target_; }
  int metrics_port() const { return metrics_port_; }
  pid_t pid() const { return pid_; }

  // Sends SIGTERM and returns the exit status (-1 if it did not exit by itself in time).
  int Terminate(int timeout_ms = 20000);
  bool Running();
  // What the server wrote to stderr so far.
  std::string Log() const;

 private:
  ServerProcess() = default;

  pid_t pid_ = -1;
  std::string socket_path_;
  std::string log_path_;
  std::string unix_target_;
  std::string tcp_target_;
  int metrics_port_ = 0;
  int exit_status_ = -1;  // once reaped
};

// The backend the e2e suite runs against: "cpu" unless ATTND_E2E_BACKEND says "cuda" (the GPU
// host runs the same suite against the CUDA backend with host regions page-locked by attnd).
std::string E2eBackend();
// CUDA devices the suite may name when running against CUDA (ATTND_E2E_CUDA_DEVICES, 1).
int E2eCudaDevices();

// A token file with one entry that stands for this process's uid ("e2e <token> uid=<uid>"):
// TCP callers have no uid of their own, and attnd opens host regions only for a known uid.
// Start attnd with `flag`; clients send `token` (ClientOptions::token).
struct UidToken {
  std::string flag;   // --token_file=...
  std::string token;
};
UidToken MakeUidToken();

// A TCP port that was free a moment ago.
int PickFreePort();

// GET http://127.0.0.1:port/path; the response body, or an error.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

}  // namespace attnd::testing

#endif  // ATTND_TESTING_SERVER_PROCESS_H_
