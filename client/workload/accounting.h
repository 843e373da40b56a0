// What a workload's data calls cost: how many, how many tokens, and the latency of each kind.
#ifndef ATTND_CLIENT_WORKLOAD_ACCOUNTING_H_
#define ATTND_CLIENT_WORKLOAD_ACCOUNTING_H_

#include <cstdint>

#include "client/workload/latencies.h"

namespace attnd::workload {

struct Accounting {
  int64_t calls = 0;   // data calls sent, answered or not
  int64_t tokens = 0;  // query tokens attended + K/V tokens appended, all layers
  Latencies prefill, decode_unary, decode_stream, append;

  // Time spent inside the timed data calls.
  double rpc_seconds() const {
    return prefill.total() + decode_unary.total() + decode_stream.total() + append.total();
  }
};

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_ACCOUNTING_H_
