// One-line, human-readable descriptions of the wire's model messages, for tools and logs.
#ifndef ATTND_CLIENT_DESCRIBE_H_
#define ATTND_CLIENT_DESCRIBE_H_

#include <string>

#include "attnd/v1/attention.pb.h"

namespace attnd::client {

// "NHD", "HND" or "unspecified".
std::string KvLayoutName(v1::KvLayout layout);

// One line: "layers=2 qo_heads=8 kv_heads=2 head_dim=64 dtype=bfloat16 page_size=16 ...
// kv_cache=model" (kv_cache=fp8_e4m3 for an fp8 pool with per-layer scales, fp8_per_token for
// one with per-token scales).
std::string DescribeModel(const v1::ModelConfig& model);

}  // namespace attnd::client

#endif  // ATTND_CLIENT_DESCRIBE_H_
