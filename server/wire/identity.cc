#include "server/wire/identity.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/wire/credentials.h"

namespace attnd::wire {
namespace {

bool IsNameChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
}

bool IsName(absl::string_view s, size_t max) {
  if (s.empty() || s.size() > max) return false;
  for (char c : s)
    if (!IsNameChar(c)) return false;
  return true;
}

// Compares without an early exit, so the time taken does not tell how much of a guess matched.
bool SameSecret(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

std::string MetadataValue(const grpc::CallbackServerContext& ctx, absl::string_view key) {
  const auto& md = ctx.client_metadata();
  auto it = md.find(grpc::string_ref(key.data(), key.size()));
  if (it == md.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

}  // namespace

absl::StatusOr<std::vector<TokenEntry>> ParseTokenFile(absl::string_view text) {
  std::vector<TokenEntry> entries;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    auto bad = [line_number](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat("--token_file line ", line_number, ": ", why));
    };
    if (fields.size() < 2 || fields.size() > 3) return bad("expected 'name token [uid=N]'");
    TokenEntry e{std::string(fields[0]), std::string(fields[1]), std::nullopt};
    if (!IsName(e.name, 64)) return bad("the name must be 1..64 of [A-Za-z0-9._-]");
    if (e.token.size() < 16) return bad("the token must be at least 16 characters");
    if (fields.size() == 3) {
      uint32_t uid;
      if (!absl::ConsumePrefix(&fields[2], "uid=") || !absl::SimpleAtoi(fields[2], &uid))
        return bad("the third field must be uid=<number>");
      e.uid = uid;
    }
    for (const TokenEntry& other : entries) {
      if (other.name == e.name) return bad(absl::StrCat("the name '", e.name, "' appears twice"));
      if (other.token == e.token) return bad("a token appears twice");
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFile(
    const std::string& token_file, PeerLookup peers) {
  std::vector<TokenEntry> tokens;
  if (!token_file.empty()) {
    absl::StatusOr<std::string> text = ReadFlagFile("token_file", token_file);
    if (!text.ok()) return text.status();
    auto parsed = ParseTokenFile(*text);
    if (!parsed.ok()) return parsed.status();
    if (parsed->empty())
      return absl::InvalidArgumentError(absl::StrCat("--token_file=", token_file, ": no tokens"));
    tokens = *std::move(parsed);
  }
  return std::make_unique<Authenticator>(std::move(tokens), std::move(peers));
}

const TokenEntry* Authenticator::FindToken(absl::string_view token) const {
  const TokenEntry* found = nullptr;
  for (const TokenEntry& e : tokens_)  // every entry, whatever matches
    if (SameSecret(e.token, token)) found = &e;
  return found;
}

absl::StatusOr<Caller> Authenticator::Identify(const grpc::CallbackServerContext& ctx) const {
  return Identify(MetadataValue(ctx, "authorization"), MetadataValue(ctx, "attnd-client"),
                  ctx.peer());
}

absl::StatusOr<Caller> Authenticator::Identify(absl::string_view authorization,
                                               absl::string_view instance,
                                               absl::string_view grpc_peer) const {
  Caller caller;
  if (!instance.empty() && !IsName(instance, 64))
    return absl::InvalidArgumentError(
        "attnd-client: the client name must be 1..64 of [A-Za-z0-9._-]");
  caller.instance = std::string(instance);
  std::optional<PeerIdentity> peer = peers_ ? peers_(grpc_peer) : std::nullopt;
  if (peer.has_value()) {
    caller.uid = peer->uid;
    caller.connection = peer->connection;
  }
  if (!authorization.empty()) {
    absl::string_view token = authorization;
    if (!absl::ConsumePrefix(&token, "Bearer "))
      return absl::UnauthenticatedError("authorization: expected 'Bearer <token>'");
    const TokenEntry* entry = FindToken(token);
    if (entry == nullptr) return absl::UnauthenticatedError("authorization: unknown token");
    caller.principal = absl::StrCat("token:", entry->name);
    if (!peer.has_value()) caller.uid = entry->uid;
    return caller;
  }
  if (peer.has_value()) {
    caller.principal = absl::StrCat("uid:", peer->uid);
    return caller;
  }
  if (!tokens_.empty())
    return absl::UnauthenticatedError(
        "authorization: this server needs a bearer token ('authorization: Bearer <token>') "
        "from callers it cannot identify by their Unix-socket uid");
  caller.principal = absl::StartsWith(grpc_peer, "unix:") ? "unix" : "tcp";
  return caller;
}

}  // namespace attnd::wire
