// Builds the ServerConfig from attnd's command-line flags (a --flagfile is the config file).
#ifndef ATTND_SERVER_CONFIG_FLAGS_H_
#define ATTND_SERVER_CONFIG_FLAGS_H_

#include "absl/status/statusor.h"
#include "server/config/config.h"

namespace attnd {

absl::StatusOr<ServerConfig> ConfigFromFlags();

}  // namespace attnd

#endif  // ATTND_SERVER_CONFIG_FLAGS_H_
