// Human-readable renderings of the server's info and stats messages for attnctl.
#ifndef ATTND_CLIENT_ATTNCTL_PRINT_H_
#define ATTND_CLIENT_ATTNCTL_PRINT_H_

#include <string>

#include "attnd/v1/attention.pb.h"

namespace attnd::attnctl {

std::string FormatServerInfo(const v1::ServerInfo& info);
std::string FormatStats(const v1::Stats& stats);
// One line: "layers=2 qo_heads=8 kv_heads=2 head_dim=64 dtype=bfloat16 page_size=16 ...".
std::string FormatModel(const v1::ModelConfig& model);

}  // namespace attnd::attnctl

#endif  // ATTND_CLIENT_ATTNCTL_PRINT_H_
