// Tests of server/wire/unix_listener.h on a real socket in a temp dir, served by a real gRPC
// server that has no listening port of its own: every connection reaches it through the
// listener. A tiny Attention service answers GetServerInfo and records what its handler saw.
#include "server/wire/unix_listener.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attnd/v1/attention.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace attnd {
namespace {

// What the last GetServerInfo handler saw of its caller.
struct Seen {
  std::string grpc_peer;
  std::optional<Peer> peer;
};

class PeerEcho final : public v1::Attention::CallbackService {
 public:
  explicit PeerEcho(const PeerTable* peers) : peers_(peers) {}

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo*) override {
    {
      absl::MutexLock lock(&mu_);
      seen_ = Seen{ctx->peer(), peers_->Find(ctx->peer())};
    }
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  Seen seen() {
    absl::MutexLock lock(&mu_);
    return seen_;
  }

 private:
  const PeerTable* const peers_;
  absl::Mutex mu_;
  Seen seen_;
};

class UnixListenerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/attnd-unix-listener-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
    path_ = dir_ + "/attnd.sock";
  }

  void TearDown() override {
    StopServing();
    unlink(path_.c_str());
    rmdir(dir_.c_str());
  }

  // Creates the listener on path_ and serves PeerEcho through it.
  void Serve(int mode = 0660) {
    auto listener = UnixListener::Create(path_, mode);
    ASSERT_TRUE(listener.ok()) << listener.status();
    listener_ = *std::move(listener);
    listener_->set_close_callback([this](uint64_t id) {
      absl::MutexLock lock(&closed_mu_);
      closed_.push_back(id);
    });
    service_ = std::make_unique<PeerEcho>(&listener_->peers());
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();  // no listening port: the listener is the way in
    ASSERT_NE(server_, nullptr);
    listener_->Start(server_.get());
  }

  void StopServing() {
    if (listener_ != nullptr) listener_->StopAccepting();
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
    listener_.reset();
    server_.reset();
  }

  // A channel of its own (not sharing a connection with other channels), so dropping it
  // closes its connection.
  std::shared_ptr<grpc::Channel> Channel() {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return grpc::CreateCustomChannel("unix:" + path_, grpc::InsecureChannelCredentials(), args);
  }

  grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ServerInfo info;
    return v1::Attention::NewStub(channel)->GetServerInfo(&context, v1::GetServerInfoRequest(),
                                                          &info);
  }

  // Waits up to 5 s for the close callback to report `id`.
  bool ClosedWithin5s(uint64_t id) {
    absl::MutexLock lock(&closed_mu_);
    auto reported = [this, id] {
      closed_mu_.AssertHeld();
      return std::find(closed_.begin(), closed_.end(), id) != closed_.end();
    };
    return closed_mu_.AwaitWithTimeout(absl::Condition(&reported), absl::Seconds(5));
  }

  std::string dir_;
  std::string path_;
  std::unique_ptr<UnixListener> listener_;
  std::unique_ptr<PeerEcho> service_;
  std::unique_ptr<grpc::Server> server_;
  absl::Mutex closed_mu_;
  std::vector<uint64_t> closed_ ABSL_GUARDED_BY(closed_mu_);
};

mode_t ModeOf(const std::string& path) {
  struct stat st;
  EXPECT_EQ(lstat(path.c_str(), &st), 0) << path;
  return st.st_mode;
}

// A socket file with nobody listening on it, as a process that died leaves it.
void LeaveStaleSocket(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  close(fd);
}

TEST_F(UnixListenerTest, AHandlerSeesItsConnectionNamedByFdAndFindsItsPeer) {
  Serve();
  ASSERT_TRUE(Call(Channel()).ok());
  const Seen seen = service_->seen();
  // What gRPC 1.51 calls a connection it was handed as a file descriptor.
  EXPECT_TRUE(std::regex_match(seen.grpc_peer, std::regex("fd:[0-9]+"))) << seen.grpc_peer;
  RecordProperty("grpc_peer", seen.grpc_peer);
  EXPECT_TRUE(seen.peer.has_value()) << "no peer for " << seen.grpc_peer;
}

TEST_F(UnixListenerTest, APeersCredentialsAreTheConnectingProcesss) {
  Serve();
  ASSERT_TRUE(Call(Channel()).ok());
  const std::optional<Peer> peer = service_->seen().peer;
  ASSERT_TRUE(peer.has_value());
  EXPECT_EQ(peer->uid, getuid());
  EXPECT_EQ(peer->gid, getgid());
  EXPECT_EQ(peer->pid, getpid());
}

TEST_F(UnixListenerTest, EachConnectionHasItsOwnId) {
  Serve();
  auto first = Channel();
  ASSERT_TRUE(Call(first).ok());
  const std::optional<Peer> a = service_->seen().peer;
  auto second = Channel();
  ASSERT_TRUE(Call(second).ok());
  const std::optional<Peer> b = service_->seen().peer;
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_NE(a->connection_id, b->connection_id);
  EXPECT_EQ(listener_->peers().size(), 2u);
}

TEST_F(UnixListenerTest, TheCloseCallbackReportsAConnectionTheClientDropped) {
  Serve();
  auto channel = Channel();
  ASSERT_TRUE(Call(channel).ok());
  const Seen seen = service_->seen();
  ASSERT_TRUE(seen.peer.has_value());
  channel.reset();
  EXPECT_TRUE(ClosedWithin5s(seen.peer->connection_id));
  EXPECT_FALSE(listener_->peers().Find(seen.grpc_peer).has_value());
}

TEST_F(UnixListenerTest, TheSocketHasTheModeAskedFor) {
  Serve(0640);
  EXPECT_TRUE(S_ISSOCK(ModeOf(path_)));
  EXPECT_EQ(ModeOf(path_) & 07777, 0640u);
}

TEST_F(UnixListenerTest, AStaleSocketFileIsReplaced) {
  LeaveStaleSocket(path_);
  Serve();
  EXPECT_TRUE(Call(Channel()).ok());
}

TEST_F(UnixListenerTest, AFileThatIsNotASocketIsRefusedAndKept) {
  std::ofstream(path_) << "not a socket";
  auto listener = UnixListener::Create(path_, 0660);
  EXPECT_EQ(listener.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(listener.status().message().find("not a socket"), absl::string_view::npos);
  std::ifstream in(path_);
  std::string contents;
  std::getline(in, contents);
  EXPECT_EQ(contents, "not a socket");
}

TEST_F(UnixListenerTest, ASocketAnotherListenerServesIsRefused) {
  Serve();
  auto second = UnixListener::Create(path_, 0660);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Call(Channel()).ok());  // the first one still serves
}

TEST_F(UnixListenerTest, StopAcceptingRemovesTheSocketFile) {
  Serve();
  listener_->StopAccepting();
  struct stat st;
  EXPECT_NE(lstat(path_.c_str(), &st), 0);
}

TEST_F(UnixListenerTest, StopAcceptingLeavesAnotherProcesssNewSocketAlone) {
  Serve();
  // A newer server replaced the file (as after an unclean restart): ours must not remove it.
  ASSERT_EQ(unlink(path_.c_str()), 0);
  LeaveStaleSocket(path_);
  listener_->StopAccepting();
  EXPECT_TRUE(S_ISSOCK(ModeOf(path_)));
}

}  // namespace
}  // namespace attnd
