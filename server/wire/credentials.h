// The credentials of attnd's TCP listener, from its flags: TLS through gRPC's own SSL
// credentials when --tls_cert_file and --tls_key_file are set (client certificates required
// and verified when --tls_client_ca_file is), plaintext only with --insecure_tcp.
#ifndef ATTND_SERVER_WIRE_CREDENTIALS_H_
#define ATTND_SERVER_WIRE_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/server_credentials.h"
#include "server/config/config.h"

namespace attnd {

// The whole file a flag names (TLS files, the token file); INVALID_ARGUMENT naming the flag and
// the path when it cannot be read.
absl::StatusOr<std::string> ReadFlagFile(absl::string_view flag, const std::string& path);

// Reads and checks the TLS files now, so a bad one stops attnd at start with a message that
// names its flag: unreadable, no PEM certificate (or key) in it, or a key that does not match
// the certificate. (gRPC would only fail the listener, without saying which file.)
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpServerCredentials(
    const ServerConfig& config);

}  // namespace attnd

#endif  // ATTND_SERVER_WIRE_CREDENTIALS_H_
