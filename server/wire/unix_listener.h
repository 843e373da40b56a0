// attnd's Unix socket, accepted by attnd itself rather than by gRPC: gRPC tells a handler only
// its peer's address, and on a Unix socket the caller's identity is the uid the kernel vouches
// for (SO_PEERCRED). UnixListener accepts each connection, records its credentials in a
// PeerTable under the name gRPC gives the connection (ServerContext::peer()), hands the socket
// to the gRPC server, and reports when the connection ends.
#ifndef ATTND_SERVER_WIRE_UNIX_LISTENER_H_
#define ATTND_SERVER_WIRE_UNIX_LISTENER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/server.h"

namespace attnd {

// Who is at the other end of one accepted Unix-socket connection.
struct Peer {
  uint64_t connection_id;  // unique for the listener's life, never reused
  uid_t uid;
  gid_t gid;
  pid_t pid;
};

// The peers of the open Unix-socket connections, by gRPC peer name. Thread-safe; Find may be
// called from any RPC handler with its ServerContext::peer().
class PeerTable {
 public:
  // The gRPC peer name of a connection handed to gRPC as file descriptor `fd`: "fd:<fd>".
  static std::string GrpcPeerName(int fd);

  // The peer of the connection a call arrived on; nullopt for TCP calls, and for a connection
  // whose client has already hung up.
  std::optional<Peer> Find(absl::string_view grpc_peer) const;
  size_t size() const;

 private:
  friend class UnixListener;

  // Replaces any entry of the same name: gRPC names a connection after its fd, and a number is
  // reused only once gRPC has closed the connection that had it (after its last call).
  void Insert(std::string grpc_peer, const Peer& peer);
  // Removes the entry only if it still belongs to `connection_id`, not to a later connection
  // that reuses the fd number.
  void Erase(absl::string_view grpc_peer, uint64_t connection_id);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);
};

// Not thread-safe itself (one owner calls Start, StopAccepting and the destructor); its
// PeerTable is.
class UnixListener {
 public:
  // Called on the listener's watcher thread when a connection ends (the client hung up, or
  // gRPC closed it), after its PeerTable entry is gone.
  using CloseCallback = std::function<void(uint64_t connection_id)>;

  // Binds and listens on `path` with permission bits `mode`, set before the socket accepts any
  // connection. A stale socket file at `path` (left by a process that died) is replaced; a
  // socket someone still listens on, or any other file, is refused. Connections wait in the
  // backlog until Start.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Create(const std::string& path, int mode);

  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;
  // Stops accepting, then stops watching; connections still open get no callback.
  ~UnixListener();

  const PeerTable& peers() const { return peers_; }
  const std::string& path() const { return path_; }

  // Set before Start.
  void set_close_callback(CloseCallback callback) { on_close_ = std::move(callback); }

  // Starts accepting connections into `server`, which must be started and must not be shut
  // down before StopAccepting has returned.
  void Start(grpc::Server* server);

  // Stops accepting and unlinks the socket file (if it is still ours). Connections already
  // accepted stay open and watched. Idempotent.
  void StopAccepting();

 private:
  struct Watched {
    int dup_fd;  // keeps the socket's hang-up visible to epoll, whatever gRPC does with its fd
    std::string grpc_peer;
  };

  UnixListener(std::string path, int listen_fd, dev_t dev, ino_t ino);

  void AcceptLoop();
  void WatchLoop();
  // Records one accepted connection, then hands it to gRPC.
  void Adopt(int fd);
  // Forgets a connection that ended and tells the owner.
  void Forget(uint64_t connection_id);

  const std::string path_;
  const dev_t dev_;  // of the socket file we bound, so StopAccepting unlinks only ours
  const ino_t ino_;
  int listen_fd_;
  int epoll_fd_ = -1;          // the dup of every open connection, and watch_stop_fd_
  int accept_stop_fd_ = -1;    // eventfds: readable once their thread should return
  int watch_stop_fd_ = -1;
  grpc::Server* server_ = nullptr;
  CloseCallback on_close_;
  PeerTable peers_;
  std::thread accept_thread_;
  std::thread watch_thread_;

  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Watched> watched_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;  // 0 marks watch_stop_fd_ in the epoll set
};

}  // namespace attnd

#endif  // ATTND_SERVER_WIRE_UNIX_LISTENER_H_
