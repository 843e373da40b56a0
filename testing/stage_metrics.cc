#include "testing/stage_metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

constexpr absl::string_view kFamily = "attnd_request_stage_seconds";

// Parses `name{k="v",...} value`; false for anything else (comments, other shapes).
bool ParseSample(absl::string_view line, std::string* name, std::map<std::string, std::string>* labels,
                 double* value) {
  const size_t open = line.find('{');
  const size_t close = line.rfind('}');
  if (open == absl::string_view::npos || close == absl::string_view::npos || close < open)
    return false;
  *name = std::string(line.substr(0, open));
  labels->clear();
  absl::string_view body = line.substr(open + 1, close - open - 1);
  while (!body.empty()) {
    const size_t eq = body.find("=\"");
    if (eq == absl::string_view::npos) return false;
    const size_t end = body.find('"', eq + 2);  // attnd's label values hold no quotes
    if (end == absl::string_view::npos) return false;
    (*labels)[std::string(body.substr(0, eq))] = std::string(body.substr(eq + 2, end - eq - 2));
    body.remove_prefix(end + 1);
    if (!body.empty() && body.front() == ',') body.remove_prefix(1);
  }
  const std::string rest(line.substr(close + 1));
  char* parsed_end = nullptr;
  *value = std::strtod(rest.c_str(), &parsed_end);
  return parsed_end != rest.c_str();
}

}  // namespace

StageHistograms ParseStageHistograms(const std::string& text) {
  StageHistograms out;
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, kFamily)) continue;
    if (!ParseSample(line, &name, &labels, &value)) continue;
    Histogram& h = out[{labels["rpc"], labels["stage"]}];
    if (name == absl::StrCat(kFamily, "_count")) {
      h.count = value;
    } else if (name == absl::StrCat(kFamily, "_sum")) {
      h.sum = value;
    } else if (name == absl::StrCat(kFamily, "_bucket")) {
      const std::string& le = labels["le"];
      h.buckets.emplace_back(le == "+Inf" ? std::numeric_limits<double>::infinity()
                                          : std::strtod(le.c_str(), nullptr),
                             value);
    }
  }
  for (auto& [key, h] : out) std::sort(h.buckets.begin(), h.buckets.end());
  return out;
}

absl::StatusOr<StageHistograms> ReadStageHistograms(int metrics_port) {
  absl::StatusOr<std::string> page = HttpGet(metrics_port, "/metrics");
  if (!page.ok()) return page.status();
  return ParseStageHistograms(*page);
}

Histogram Subtract(const Histogram& after, const Histogram& before) {
  Histogram d = after;
  d.sum -= before.sum;
  d.count -= before.count;
  for (size_t i = 0; i < d.buckets.size() && i < before.buckets.size(); ++i)
    d.buckets[i].second -= before.buckets[i].second;
  return d;
}

StageHistograms Subtract(const StageHistograms& after, const StageHistograms& before) {
  StageHistograms out;
  for (const auto& [key, h] : after) {
    auto it = before.find(key);
    Histogram d = it == before.end() ? h : Subtract(h, it->second);
    if (d.count > 0) out[key] = std::move(d);
  }
  return out;
}

double Quantile(const Histogram& h, double q) {
  if (h.count <= 0 || h.buckets.empty()) return 0;
  const double rank = q * h.count;
  double lower = 0, below = 0;
  for (const auto& [le, cumulative] : h.buckets) {
    if (cumulative >= rank && cumulative > below) {
      if (std::isinf(le)) return lower;  // past the last bound: all we know is "above it"
      return lower + (le - lower) * (rank - below) / (cumulative - below);
    }
    lower = le;
    below = cumulative;
  }
  return lower;
}

}  // namespace attnd::testing
