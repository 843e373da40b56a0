#include "server/wire/unix_listener.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/server_posix.h"
#include "spdlog/spdlog.h"

namespace attnd {

// ---- PeerTable ----

std::string PeerTable::GrpcPeerName(int fd) {
  // What grpc::AddInsecureChannelFromFd names the connection (gRPC's server_chttp2_posix.cc);
  // unix_listener_test checks it against ServerContext::peer().
  return absl::StrCat("fd:", fd);
}

std::optional<Peer> PeerTable::Find(absl::string_view grpc_peer) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = peers_.find(grpc_peer);
  if (it == peers_.end()) return std::nullopt;
  return it->second;
}

size_t PeerTable::size() const {
  absl::ReaderMutexLock lock(&mu_);
  return peers_.size();
}

void PeerTable::Insert(std::string grpc_peer, const Peer& peer) {
  absl::MutexLock lock(&mu_);
  peers_.insert_or_assign(std::move(grpc_peer), peer);
}

void PeerTable::Erase(absl::string_view grpc_peer, uint64_t connection_id) {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(grpc_peer);
  if (it != peers_.end() && it->second.connection_id == connection_id) peers_.erase(it);
}

// ---- UnixListener ----

namespace {

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " ", path, ": ", strerror(errno)));
}

sockaddr_un Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// True when a process accepts connections on the socket file at `path`.
bool SomeoneListens(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const sockaddr_un addr = Address(path);
  const bool listening = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return listening;
}

// Removes a socket file left by a process that died; refuses to touch anything else.
absl::Status RemoveStaleSocket(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode))
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a socket"));
  if (SomeoneListens(path))
    return absl::FailedPreconditionError(
        absl::StrCat(path, " is a socket another process listens on"));
  if (unlink(path.c_str()) != 0) return Errno("cannot remove the stale socket", path);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Create(const std::string& path,
                                                                   int mode) {
  if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path))
    return absl::InvalidArgumentError(absl::StrCat("Unix socket path '", path, "' must have 1..",
                                                   sizeof(sockaddr_un::sun_path) - 1, " bytes"));
  if (absl::Status s = RemoveStaleSocket(path); !s.ok()) return s;
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("cannot create a socket for", path);
  const sockaddr_un addr = Address(path);
  struct stat st;
  // Until listen() a connect() is refused, so the mode is in place before anyone gets in,
  // whatever the umask let bind() create.
  if (bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    absl::Status s = Errno("cannot bind", path);
    close(fd);
    return s;
  }
  if (lstat(path.c_str(), &st) != 0 || chmod(path.c_str(), static_cast<mode_t>(mode)) != 0 ||
      listen(fd, SOMAXCONN) != 0) {
    absl::Status s = Errno("cannot set the mode of or listen on", path);
    close(fd);
    unlink(path.c_str());
    return s;
  }
  std::unique_ptr<UnixListener> listener(new UnixListener(path, fd, st.st_dev, st.st_ino));
  listener->epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  listener->accept_stop_fd_ = eventfd(0, EFD_CLOEXEC);
  listener->watch_stop_fd_ = eventfd(0, EFD_CLOEXEC);
  if (listener->epoll_fd_ < 0 || listener->accept_stop_fd_ < 0 || listener->watch_stop_fd_ < 0)
    return Errno("cannot create the epoll set or eventfds of", path);
  epoll_event stop{};
  stop.events = EPOLLIN;
  stop.data.u64 = 0;
  if (epoll_ctl(listener->epoll_fd_, EPOLL_CTL_ADD, listener->watch_stop_fd_, &stop) != 0)
    return Errno("cannot watch the stop eventfd of", path);
  return listener;
}

UnixListener::UnixListener(std::string path, int listen_fd, dev_t dev, ino_t ino)
    : path_(std::move(path)), dev_(dev), ino_(ino), listen_fd_(listen_fd) {}

UnixListener::~UnixListener() {
  StopAccepting();
  if (watch_thread_.joinable()) {
    eventfd_write(watch_stop_fd_, 1);
    watch_thread_.join();
  }
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, watched] : watched_) close(watched.dup_fd);
    watched_.clear();
  }
  for (int fd : {epoll_fd_, accept_stop_fd_, watch_stop_fd_})
    if (fd >= 0) close(fd);
}

void UnixListener::Start(grpc::Server* server) {
  server_ = server;
  watch_thread_ = std::thread([this] { WatchLoop(); });
  accept_thread_ = std::thread([this] { AcceptLoop(); });
}

void UnixListener::StopAccepting() {
  if (accept_thread_.joinable()) {
    eventfd_write(accept_stop_fd_, 1);
    accept_thread_.join();
  }
  if (listen_fd_ < 0) return;
  close(listen_fd_);
  listen_fd_ = -1;
  // A newer process may have replaced the file with its own socket: leave that one alone.
  struct stat st;
  if (lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_)
    unlink(path_.c_str());
}

void UnixListener::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {accept_stop_fd_, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("unix_socket={} poll failed: {}; no longer accepting", path_, strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    for (;;) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        Adopt(fd);
        continue;
      }
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        // Out of descriptors or memory: the pending connection stays in the backlog and the
        // socket stays readable, so back off instead of spinning (a stop still ends the wait).
        spdlog::warn("unix_socket={} accept failed: {}", path_, strerror(errno));
        pollfd stop = {accept_stop_fd_, POLLIN, 0};
        if (poll(&stop, 1, 100) > 0) return;
      }
      break;
    }
  }
}

void UnixListener::Adopt(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    spdlog::warn("unix_socket={} SO_PEERCRED failed: {}; connection dropped", path_,
                 strerror(errno));
    close(fd);
    return;
  }
  const int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) {
    spdlog::warn("unix_socket={} dup failed: {}; connection dropped", path_, strerror(errno));
    close(fd);
    return;
  }
  std::string grpc_peer = PeerTable::GrpcPeerName(fd);
  uint64_t id;
  {
    absl::MutexLock lock(&mu_);
    id = next_id_++;
    watched_.emplace(id, Watched{dup_fd, grpc_peer});
  }
  // In the table before gRPC sees the connection, so its first call finds it.
  peers_.Insert(grpc_peer, Peer{id, cred.uid, cred.gid, cred.pid});
  epoll_event event{};
  // EPOLLHUP and EPOLLERR are always reported; EPOLLRDHUP adds the client's close.
  event.events = EPOLLRDHUP;
  event.data.u64 = id;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, dup_fd, &event) != 0) {
    spdlog::warn("unix_socket={} epoll_ctl failed: {}; connection dropped", path_,
                 strerror(errno));
    Forget(id);
    close(fd);
    return;
  }
  spdlog::debug("unix_socket connection={} {} uid={} pid={}", id, grpc_peer, cred.uid, cred.pid);
  grpc::AddInsecureChannelFromFd(server_, fd);  // gRPC owns fd from here
}

void UnixListener::WatchLoop() {
  epoll_event events[64];
  for (;;) {
    const int n = epoll_wait(epoll_fd_, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::error("unix_socket={} epoll_wait failed: {}; no longer watching", path_,
                    strerror(errno));
      return;
    }
    for (int i = 0; i < n; ++i) {
      if (events[i].data.u64 == 0) return;  // watch_stop_fd_
      Forget(events[i].data.u64);
    }
  }
}

void UnixListener::Forget(uint64_t connection_id) {
  Watched watched;
  {
    absl::MutexLock lock(&mu_);
    auto it = watched_.find(connection_id);
    if (it == watched_.end()) return;
    watched = std::move(it->second);
    watched_.erase(it);
  }
  // Out of the set before closing: epoll keys on the open file, which gRPC's fd still holds.
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, watched.dup_fd, nullptr);
  close(watched.dup_fd);
  peers_.Erase(watched.grpc_peer, connection_id);
  spdlog::debug("unix_socket connection={} closed", connection_id);
  if (on_close_) on_close_(connection_id);
}

}  // namespace attnd
