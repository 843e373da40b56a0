// The workload's sequence operations besides data calls: creating the prompts' sequences,
// forking one, truncating one, checking the server's list against the client's copies, and
// releasing them. Each checks what the server answers against the copies and keeps the copies
// in step.
#ifndef ATTND_CLIENT_WORKLOAD_LIFECYCLE_H_
#define ATTND_CLIENT_WORKLOAD_LIFECYCLE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/workload/sequence.h"
#include "client/workload/session.h"

namespace attnd::workload {

// Draws options.sequences prompt lengths (1, one page, one page plus one, then random up to
// options.max_prompt; all leaving room for the decode steps), checks the device has the pages
// for them at their final lengths, and creates one server sequence per prompt into `seqs`. The
// last one (of two or more) is marked for import with Append. Also checks that a live id
// cannot be created twice.
absl::Status CreateSequences(Session& s, SequenceList& seqs);

// Forks a sequence of `seqs` that ends mid-page (so the child shares full pages and copies the
// partial one) onto a fresh id and returns the child, added to `seqs`. Also checks that a fork
// onto a live id is refused.
absl::StatusOr<Sequence*> ForkOne(Session& s, SequenceList& seqs, int step);

// Truncates `seq` to `target` tokens; `why` goes into the printed line.
absl::Status TruncateOne(Session& s, Sequence& seq, int64_t target, const std::string& why);

// ListSequences must list every one of `seqs` with the copies' lengths and page counts.
absl::Status CheckServerLengths(Session& s, const SequenceList& seqs);

// Releases `seqs`, checks a released id is gone and, when nobody else uses the device, that
// every page came back.
absl::Status ReleaseAll(Session& s, SequenceList& seqs);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_LIFECYCLE_H_
