// The prefill + decode schedule of a workload: prompts prefilled in chunks that mix several
// sequences per request, one prompt imported with Append only, then decode steps over every
// sequence that alternate the unary RPC and the stream, with a fork a third of the way in and
// two truncates (a speculative rollback, and one into a page the fork child shares with its
// parent) two thirds of the way in.
#ifndef ATTND_CLIENT_WORKLOAD_GENERATOR_H_
#define ATTND_CLIENT_WORKLOAD_GENERATOR_H_

#include "absl/status/status.h"
#include "client/workload/sequence.h"
#include "client/workload/session.h"

namespace attnd::workload {

// Prefills every prompt of `seqs` not marked imported: Prefill requests of at most
// options.prefill_tokens tokens, at most options.prefill_chunk of any one sequence, every layer.
absl::Status PrefillPrompts(Session& s, SequenceList& seqs);

// Writes `seq`'s prompt KV with Append only, then checks the server's lengths.
absl::Status ImportPrompt(Session& s, Sequence& seq);

// options.steps decode steps over every sequence of `seqs` (a fork child joins them).
absl::Status DecodeSteps(Session& s, SequenceList& seqs);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_GENERATOR_H_
