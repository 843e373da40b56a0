// Authenticator: who a call is from, by bearer token, Unix-socket peer and attnd-client name.
#include "server/wire/identity.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace attnd::wire {
namespace {

constexpr char kAliceToken[] = "alice-0123456789abcdef";
constexpr char kBobToken[] = "bob-0123456789abcdef-x";

std::vector<TokenEntry> Tokens() {
  auto parsed = ParseTokenFile(absl::StrCat("# name token [uid]\nalice ", kAliceToken,
                                            " uid=1000\n\nbob ", kBobToken, "\n"));
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *parsed : std::vector<TokenEntry>{};
}

// Unix-socket peers "fd:5" (uid 1000) and "fd:6" (uid 0); everything else is TCP.
PeerLookup Peers() {
  return [](absl::string_view peer) -> std::optional<PeerIdentity> {
    if (peer == "fd:5") return PeerIdentity{11, 1000};
    if (peer == "fd:6") return PeerIdentity{12, 0};
    return std::nullopt;
  };
}

TEST(TokenFileTest, ParsesNamesTokensAndOptionalUids) {
  const std::vector<TokenEntry> t = Tokens();
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].name, "alice");
  EXPECT_EQ(t[0].uid, 1000u);
  EXPECT_EQ(t[1].token, kBobToken);
  EXPECT_FALSE(t[1].uid.has_value());
}

TEST(TokenFileTest, RefusesShortTokensBadNamesDuplicatesAndBadUidsNamingTheLine) {
  for (const char* text : {"alice short", "al/ice 0123456789abcdefgh", "a 0123456789abcdefgh uid=x",
                           "a 0123456789abcdefgh\na 0123456789abcdefgX",
                           "a 0123456789abcdefgh\nb 0123456789abcdefgh", "lonely"}) {
    auto parsed = ParseTokenFile(text);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_NE(parsed.status().message().find("--token_file line"), absl::string_view::npos);
  }
}

TEST(AuthenticatorTest, AUnixPeerIsItsUidWithItsConnection) {
  Authenticator auth({}, Peers());
  auto c = auth.Identify("", "", "fd:5");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->principal, "uid:1000");
  EXPECT_EQ(c->uid, 1000u);
  EXPECT_EQ(c->connection, 11u);
}

TEST(AuthenticatorTest, ABearerTokenNamesTheClientAndAPeerKeepsItsRealUid) {
  Authenticator auth(Tokens(), Peers());
  auto c = auth.Identify(absl::StrCat("Bearer ", kAliceToken), "", "fd:6");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->principal, "token:alice");
  EXPECT_EQ(c->uid, 0u);  // the socket's, not the token file's
}

TEST(AuthenticatorTest, OverTcpATokenBringsItsUidOrNone) {
  Authenticator auth(Tokens(), Peers());
  auto alice = auth.Identify(absl::StrCat("Bearer ", kAliceToken), "", "ipv4:127.0.0.1:5000");
  ASSERT_TRUE(alice.ok()) << alice.status();
  EXPECT_EQ(alice->uid, 1000u);
  auto bob = auth.Identify(absl::StrCat("Bearer ", kBobToken), "", "ipv4:127.0.0.1:5001");
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ(bob->principal, "token:bob");
  EXPECT_FALSE(bob->uid.has_value());
}

TEST(AuthenticatorTest, AnUnknownOrMalformedTokenIsUnauthenticated) {
  Authenticator auth(Tokens(), Peers());
  EXPECT_EQ(auth.Identify("Bearer nope-nope-nope-nope", "", "fd:5").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth.Identify(kAliceToken, "", "fd:5").status().code(),
            absl::StatusCode::kUnauthenticated);
  // A prefix of a real token is not the token.
  EXPECT_EQ(auth.Identify("Bearer alice-0123", "", "fd:5").status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(AuthenticatorTest, WithTokensATcpCallWithoutOneIsUnauthenticated) {
  Authenticator auth(Tokens(), Peers());
  EXPECT_EQ(auth.Identify("", "", "ipv4:10.0.0.2:4000").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(auth.Identify("", "", "fd:5").ok());  // the Unix socket's uid suffices
}

TEST(AuthenticatorTest, WithoutTokensTcpCallersShareOneAnonymousPrincipal) {
  Authenticator auth({}, Peers());
  auto c = auth.Identify("", "", "ipv6:[::1]:4000");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->principal, "tcp");
  EXPECT_FALSE(c->uid.has_value());
}

TEST(AuthenticatorTest, TheClientNameIsAnInstanceWithinThePrincipalAndIsChecked) {
  Authenticator auth({}, Peers());
  auto c = auth.Identify("", "worker-3", "fd:5");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->principal, "uid:1000");
  EXPECT_EQ(c->instance, "worker-3");
  EXPECT_EQ(auth.Identify("", "a\nb", "fd:5").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(auth.Identify("", std::string(65, 'x'), "fd:5").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnd::wire
