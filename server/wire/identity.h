// Who is calling: the wire layer's answer for every call, from the bearer token (a token file
// maps tokens to client names), the peer's uid on the Unix socket (attnd accepts those
// connections itself and reads SO_PEERCRED), and the `attnd-client` metadata (an instance name
// within the principal). The engine never sees metadata or peers, only the Caller.
#ifndef ATTND_SERVER_WIRE_IDENTITY_H_
#define ATTND_SERVER_WIRE_IDENTITY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "server/engine/clients.h"

namespace attnd::wire {

// A Unix-socket connection as the listener recorded it.
struct PeerIdentity {
  uint64_t connection = 0;
  uint32_t uid = 0;
};
// Maps ServerContext::peer() to the connection's identity; nullopt for TCP peers.
using PeerLookup = std::function<std::optional<PeerIdentity>(absl::string_view grpc_peer)>;

// One line of the token file: "name token [uid=N]". The uid, when given, is what a TCP caller
// with this token counts as for host-region owner checks.
struct TokenEntry {
  std::string name;
  std::string token;
  std::optional<uint32_t> uid;
};

absl::StatusOr<std::vector<TokenEntry>> ParseTokenFile(absl::string_view text);

class Authenticator {
 public:
  // `tokens` empty: no bearer tokens (TCP callers are all the client "tcp").
  Authenticator(std::vector<TokenEntry> tokens, PeerLookup peers)
      : tokens_(std::move(tokens)), peers_(std::move(peers)) {}
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFile(const std::string& token_file,
                                                                 PeerLookup peers);

  // UNAUTHENTICATED for a bad or missing token (missing matters on TCP when tokens are set);
  // INVALID_ARGUMENT for a malformed `attnd-client`.
  absl::StatusOr<Caller> Identify(const grpc::CallbackServerContext& ctx) const;
  // The same from the parts (tests): metadata values (empty: absent) and the peer.
  absl::StatusOr<Caller> Identify(absl::string_view authorization, absl::string_view instance,
                                  absl::string_view grpc_peer) const;

 private:
  const TokenEntry* FindToken(absl::string_view token) const;

  const std::vector<TokenEntry> tokens_;
  const PeerLookup peers_;
};

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_IDENTITY_H_
