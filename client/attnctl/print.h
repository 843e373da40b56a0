// Human-readable renderings of the server's info and stats messages for attnctl.
#ifndef ATTND_CLIENT_ATTNCTL_PRINT_H_
#define ATTND_CLIENT_ATTNCTL_PRINT_H_

#include <string>

#include "attnd/v1/attention.pb.h"

namespace attnd::attnctl {

std::string FormatServerInfo(const v1::ServerInfo& info);
std::string FormatStats(const v1::Stats& stats);

}  // namespace attnd::attnctl

#endif  // ATTND_CLIENT_ATTNCTL_PRINT_H_
