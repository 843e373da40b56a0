// Tests of what client/client.h sends besides requests: the token and client name as metadata
// on every call, unary and Stream, and TLS options it cannot use refused at Connect. A tiny
// in-process server on a Unix socket records each call's metadata.
#include <unistd.h>

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "grpcpp/grpcpp.h"

namespace attnd::client {
namespace {

using Metadata = std::map<std::string, std::string>;

class MetadataEcho final : public v1::Attention::CallbackService {
 public:
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo*) override {
    Record(*ctx);
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* Stream(
      grpc::CallbackServerContext* ctx) override {
    Record(*ctx);
    // Ends at once: the test only needs the stream's metadata.
    class Ended final : public grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse> {
     public:
      Ended() { Finish(grpc::Status::OK); }
      void OnDone() override { delete this; }
    };
    return new Ended();
  }

  Metadata last() {
    absl::MutexLock lock(&mu_);
    return last_;
  }

 private:
  void Record(const grpc::CallbackServerContext& ctx) {
    Metadata seen;
    for (const auto& [key, value] : ctx.client_metadata()) {
      seen[std::string(key.data(), key.size())] = std::string(value.data(), value.size());
    }
    absl::MutexLock lock(&mu_);
    last_ = std::move(seen);
  }

  absl::Mutex mu_;
  Metadata last_;
};

class ClientTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/attnd-client-transport-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
    target_ = "unix://" + dir_ + "/s.sock";
    grpc::ServerBuilder builder;
    builder.AddListeningPort(target_, grpc::InsecureServerCredentials());
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
    unlink((dir_ + "/s.sock").c_str());
    rmdir(dir_.c_str());
  }

  std::unique_ptr<Client> Connect(const ClientOptions& options) {
    auto c = Client::Connect(target_, options);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

  std::string dir_;
  std::string target_;
  MetadataEcho service_;
  std::unique_ptr<grpc::Server> server_;
};

ClientOptions Named() {
  ClientOptions options;
  options.token = "s3cret";
  options.client_name = "worker-3";
  return options;
}

TEST_F(ClientTransportTest, AUnaryCallCarriesTheTokenAndTheClientName) {
  auto c = Connect(Named());
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->GetServerInfo().ok());
  const Metadata seen = service_.last();
  EXPECT_EQ(seen.count("authorization") ? seen.at("authorization") : "", "Bearer s3cret");
  EXPECT_EQ(seen.count("attnd-client") ? seen.at("attnd-client") : "", "worker-3");
}

TEST_F(ClientTransportTest, AStreamCarriesTheTokenAndTheClientName) {
  auto c = Connect(Named());
  ASSERT_NE(c, nullptr);
  auto stream = c->OpenStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_TRUE((*stream)->Close().ok());
  const Metadata seen = service_.last();
  EXPECT_EQ(seen.count("authorization") ? seen.at("authorization") : "", "Bearer s3cret");
  EXPECT_EQ(seen.count("attnd-client") ? seen.at("attnd-client") : "", "worker-3");
}

TEST_F(ClientTransportTest, WithoutATokenOrANameNeitherIsSent) {
  auto c = Connect(ClientOptions());
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->GetServerInfo().ok());
  const Metadata seen = service_.last();
  EXPECT_EQ(seen.count("authorization"), 0u);
  EXPECT_EQ(seen.count("attnd-client"), 0u);
}

TEST_F(ClientTransportTest, AnUnreadableTlsFileIsRefusedNamingItsOption) {
  ClientOptions options;
  options.tls_ca_file = dir_ + "/missing-ca.pem";
  auto c = Client::Connect(target_, options);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("tls_ca_file"), absl::string_view::npos) << c.status();
}

TEST_F(ClientTransportTest, AClientCertificateWithoutItsKeyIsRefused) {
  ClientOptions options;
  options.tls_cert_file = dir_ + "/client.pem";
  auto c = Client::Connect(target_, options);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("tls_key_file"), absl::string_view::npos) << c.status();
}

}  // namespace
}  // namespace attnd::client
