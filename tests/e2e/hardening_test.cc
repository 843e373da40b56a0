// What a client on this host can do to attnd's process through its front door: who may open the
// socket, how large a request may be, and whether its strings can forge log lines.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "client/client.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

std::vector<std::string> CpuModel() {
  return {"--backend=cpu", "--num_layers=1", "--num_qo_heads=8", "--num_kv_heads=2",
          "--head_dim=64", "--dtype=bf16", "--page_size=16", "--pages_per_device=64",
          "--log_level=debug"};
}

mode_t SocketMode(const ServerProcess& server) {
  std::string path = server.unix_target();
  path = path.substr(path.find("//") + 2);
  struct stat st;
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 0777;
}

TEST(Hardening, TheSocketIsOpenToOwnerAndGroupOnlyByDefault) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(SocketMode(**server), 0660u);
  EXPECT_EQ((*server)->Terminate(), 0);
}

TEST(Hardening, TheSocketModeFollowsTheFlag) {
  std::vector<std::string> flags = CpuModel();
  flags.push_back("--unix_socket_mode=0600");
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(SocketMode(**server), 0600u);
  EXPECT_EQ((*server)->Terminate(), 0);
}

TEST(Hardening, AnOversizedRequestIsRefusedAndTheServerServesOn) {
  std::vector<std::string> flags = CpuModel();
  flags.push_back("--max_message_bytes=65536");
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = client::Client::Connect((*server)->unix_target());
  ASSERT_TRUE(c.ok()) << c.status();
  // A 1 MiB "handle": far over the limit, refused before attnd parses it.
  const absl::Status s =
      (*c)->RegisterCudaRegion("big", std::string(1 << 20, 'x'), 0, 64);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_TRUE((*c)->GetServerInfo().ok());
  c->reset();
  EXPECT_EQ((*server)->Terminate(), 0);
}

TEST(Hardening, ANewlineInAClientsShmKeyCannotForgeALogLine) {
  auto server = ServerProcess::Start(CpuModel());
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = client::Client::Connect((*server)->unix_target());
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string key = absl::StrCat("/attnd-forge-", getpid(), "\nts=0 level=error forged");
  const int fd = shm_open(key.c_str(), O_CREAT | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  close(fd);
  EXPECT_TRUE((*c)->RegisterHostRegion("forge", key, 0, 4096).ok());
  // Refused calls are logged at debug level with the client's text in their messages.
  EXPECT_FALSE((*c)->RegisterHostRegion("forge2", key + "\nlevel=error forged2", 0, 64).ok());
  EXPECT_TRUE((*c)->UnregisterRegion("forge").ok());
  shm_unlink(key.c_str());
  c->reset();
  EXPECT_EQ((*server)->Terminate(), 0);
  // Unescaped, the text after each newline would start a line of its own.
  for (absl::string_view line : absl::StrSplit((*server)->Log(), '\n'))
    EXPECT_FALSE(absl::StartsWith(line, "ts=0 level=error forged") ||
                 absl::StartsWith(line, "level=error forged2"))
        << "forged line: " << line;
}

}  // namespace
}  // namespace attnd::testing
