// The workload's verdict: every output the server writes is compared with a dense fp64
// reference (client/reference.h) computed over the client's copies of the sequences, and every
// other check that fails is collected here too, with the first ones printed as they happen.
#ifndef ATTND_CLIENT_WORKLOAD_VERIFIER_H_
#define ATTND_CLIENT_WORKLOAD_VERIFIER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "client/workload/model.h"
#include "client/workload/printer.h"
#include "client/workload/sequence.h"

namespace attnd::workload {

enum class Op { kPrefill, kDecode };

const char* OpName(Op op);

// What the checks found so far.
struct CheckStats {
  int64_t outputs = 0;           // out tensors checked
  int64_t lse = 0;               // lse tensors checked
  double max_error[2] = {0, 0};  // max ||out-ref||/||ref||, by Op
  double max_lse_error = 0;      // max |lse-ref|
  double tolerance = 0, lse_tolerance = 0;
};

class Verifier {
 public:
  explicit Verifier(Printer out) : out_(out) {}

  // The model whose outputs are checked next; before it is set, no output can be checked.
  void SetModel(const Model& model);

  // Checks one call's out ([tokens][qo_heads][head_dim]) and, when not empty, its lse
  // ([tokens][qo_heads]) against the reference over `items`' copies of `layer`, which already
  // hold the call's new tokens. q: the call's queries as sent. A mismatch is recorded as a
  // failure naming the items that are off.
  void Check(const std::string& label, Op op, uint32_t layer, const Items& items, const float* q,
             absl::Span<const float> out, absl::Span<const float> lse);

  // Records a failed check; the first ones are printed at once.
  void Fail(std::string what);

  const std::vector<std::string>& failures() const { return failures_; }
  const CheckStats& stats() const { return stats_; }

 private:
  void CheckLse(const std::string& label, absl::Span<const float> lse,
                const std::vector<double>& ref);
  std::string BadItems(uint32_t layer, const Items& items, absl::Span<const float> out,
                       const std::vector<double>& ref) const;

  Printer out_;
  Model model_;
  CheckStats stats_;
  std::vector<std::string> failures_;
};

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_VERIFIER_H_
