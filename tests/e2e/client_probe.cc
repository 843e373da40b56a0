// A client in a process of its own, for e2e tests that need one: one that runs as another uid,
// or one that is killed mid-work. Prints one line per step ("register_foreign code=7") and
// "READY" when it holds what it was asked to; --mode=hold then sleeps until killed.
//   --mode=register_foreign --shm_key=K : registers K (someone else's object), then an object of
//                                         its own, printing each outcome
//   --mode=hold                         : a region, 4 sequences with prefilled tokens, then sleep
#include <unistd.h>

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/shm_buffer.h"
#include "testing/harness.h"

ABSL_FLAG(std::string, target, "", "attnd target");
ABSL_FLAG(std::string, client_name, "", "attnd-client metadata");
ABSL_FLAG(std::string, mode, "", "register_foreign or hold");
ABSL_FLAG(std::string, shm_key, "", "register_foreign: the object to try");

namespace {

void Say(const std::string& step, const absl::Status& s) {
  std::printf("%s code=%d msg=%s\n", step.c_str(), static_cast<int>(s.code()),
              std::string(s.message()).c_str());
  std::fflush(stdout);
}

int RegisterForeign(attnd::client::Client& c) {
  Say("register_foreign", c.RegisterHostRegion("foreign", absl::GetFlag(FLAGS_shm_key), 0, 4096));
  auto own = attnd::client::SharedMemoryBuffer::Create(
      attnd::client::SharedMemoryBuffer::UniqueKey("attnd-probe"), 4096);
  if (!own.ok()) {
    Say("create_own", own.status());
    return 1;
  }
  Say("register_own", c.RegisterHostRegion("own", (*own)->key(), 0, 4096));
  return 0;
}

int Hold(attnd::client::Client& c) {
  auto h = attnd::testing::Harness::Create(&c, "held", 0, 64, /*seed=*/getpid());
  if (!h.ok()) {
    Say("harness", h.status());
    return 1;
  }
  for (uint64_t id = 1; id <= 4; ++id) {
    absl::Status s = (*h)->CreateSequence(id);
    if (s.ok()) s = (*h)->Attend(0, {{id, 20}}, /*decode=*/false);
    if (!s.ok()) {
      Say("sequence", s);
      return 1;
    }
  }
  std::printf("READY\n");
  std::fflush(stdout);
  for (;;) pause();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  attnd::client::ClientOptions options;
  options.client_name = absl::GetFlag(FLAGS_client_name);
  auto c = attnd::client::Client::Connect(absl::GetFlag(FLAGS_target), options);
  if (!c.ok()) {
    Say("connect", c.status());
    return 1;
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "register_foreign") return RegisterForeign(**c);
  if (mode == "hold") return Hold(**c);
  std::fprintf(stderr, "unknown --mode=%s\n", mode.c_str());
  return 2;
}
