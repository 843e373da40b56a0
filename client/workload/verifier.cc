#include "client/workload/verifier.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/reference.h"

namespace attnd::workload {

const char* OpName(Op op) { return op == Op::kPrefill ? "Prefill" : "Decode"; }

void Verifier::SetModel(const Model& model) {
  model_ = model;
  stats_.tolerance = model.tolerance;
  stats_.lse_tolerance = model.lse_tolerance;
}

void Verifier::Fail(std::string what) {
  // The first failures say what is wrong; hundreds more of the same would bury them.
  constexpr size_t kPrinted = 20;
  if (failures_.size() < kPrinted) {
    out_("CHECK FAILED: %s\n", what);
  } else if (failures_.size() == kPrinted) {
    out_("CHECK FAILED: (more failures; only the first %d are printed)\n", kPrinted);
  }
  out_.Flush();
  failures_.push_back(std::move(what));
}

void Verifier::Check(const std::string& label, Op op, uint32_t layer, const Items& items,
                     const float* q, absl::Span<const float> out, absl::Span<const float> lse) {
  const int64_t q_row = model_.q_row();
  const int64_t heads = model_.qo_heads;
  const int64_t t = TotalTokens(items);
  std::vector<double> ref(t * q_row), lse_ref(t * heads);
  int64_t row = 0;
  for (const auto& [seq, n] : items) {
    client::DenseAttentionReference(model_.params, q + row * q_row, n, seq->k[layer].data(),
                                    seq->v[layer].data(), seq->len[layer], ref.data() + row * q_row,
                                    lse_ref.data() + row * heads);
    row += n;
  }
  const double err = client::RelativeL2Error(out, ref);
  double& max_error = stats_.max_error[static_cast<int>(op)];
  max_error = std::max(max_error, err);
  ++stats_.outputs;
  if (!(err <= model_.tolerance)) {
    Fail(absl::StrFormat("%s: ||out-ref||/||ref|| = %.3g > %.0e; %s", label, err, model_.tolerance,
                         BadItems(layer, items, out, ref)));
  }
  if (!lse.empty()) CheckLse(label, lse, lse_ref);
}

std::string Verifier::BadItems(uint32_t layer, const Items& items, absl::Span<const float> out,
                               const std::vector<double>& ref) const {
  // Name the items that are off, so a failure points at a sequence and a length.
  const int64_t q_row = model_.q_row();
  std::vector<std::string> bad;
  int64_t row = 0;
  for (const auto& [seq, n] : items) {
    const double item_err =
        client::RelativeL2Error(out.subspan(row * q_row, n * q_row),
                                absl::MakeConstSpan(ref).subspan(row * q_row, n * q_row));
    if (!(item_err <= model_.tolerance) && bad.size() < 8) {
      bad.push_back(
          absl::StrFormat("seq %d (len %d, +%d): %.3g", seq->id, seq->len[layer], n, item_err));
    }
    row += n;
  }
  return absl::StrJoin(bad, "; ");
}

void Verifier::CheckLse(const std::string& label, absl::Span<const float> lse,
                        const std::vector<double>& ref) {
  const double err = client::MaxAbsError(lse, ref);
  stats_.max_lse_error = std::max(stats_.max_lse_error, err);
  ++stats_.lse;
  if (!(err < model_.lse_tolerance)) {
    Fail(absl::StrFormat("%s: lse max |err| = %.3g >= %.0e", label, err, model_.lse_tolerance));
  }
}

}  // namespace attnd::workload
