#include "server/wire/credentials.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"

namespace attnd {
namespace {

absl::Status BadFile(absl::string_view flag, const std::string& path, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": ", why));
}

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using Cert = std::unique_ptr<X509, X509Free>;
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;

Bio MemoryBio(const std::string& pem) {
  return Bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// The first certificate in `pem` (a chain's leaf).
absl::StatusOr<Cert> FirstCertificate(absl::string_view flag, const std::string& path,
                                      const std::string& pem) {
  Bio bio = MemoryBio(pem);
  Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return BadFile(flag, path, "holds no PEM certificate");
  return cert;
}

}  // namespace

absl::StatusOr<std::string> ReadFlagFile(absl::string_view flag, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return BadFile(flag, path, absl::StrCat("cannot be read: ", strerror(errno)));
  std::string contents;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) contents.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return BadFile(flag, path, "cannot be read");
  return contents;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpServerCredentials(
    const ServerConfig& config) {
  if (config.tls_cert_file.empty()) {
    // Validate() refuses this already; checked again so no caller serves clear text by mistake.
    if (!config.insecure_tcp)
      return absl::InvalidArgumentError("--tcp_address needs TLS, or --insecure_tcp");
    return grpc::InsecureServerCredentials();
  }
  absl::StatusOr<std::string> chain = ReadFlagFile("tls_cert_file", config.tls_cert_file);
  if (!chain.ok()) return chain.status();
  absl::StatusOr<std::string> key_pem = ReadFlagFile("tls_key_file", config.tls_key_file);
  if (!key_pem.ok()) return key_pem.status();
  absl::StatusOr<Cert> leaf = FirstCertificate("tls_cert_file", config.tls_cert_file, *chain);
  if (!leaf.ok()) return leaf.status();
  Bio key_bio = MemoryBio(*key_pem);
  Key key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr)
    return BadFile("tls_key_file", config.tls_key_file, "holds no unencrypted PEM private key");
  if (X509_check_private_key(leaf->get(), key.get()) != 1)
    return BadFile("tls_key_file", config.tls_key_file,
                   absl::StrCat("does not match the certificate in --tls_cert_file=",
                                config.tls_cert_file));

  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({*key_pem, *chain});
  if (!config.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFlagFile("tls_client_ca_file", config.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
    absl::StatusOr<Cert> ca_cert =
        FirstCertificate("tls_client_ca_file", config.tls_client_ca_file, *ca);
    if (!ca_cert.ok()) return ca_cert.status();
    options.pem_root_certs = *ca;
    options.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace attnd
