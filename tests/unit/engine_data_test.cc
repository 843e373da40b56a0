// Engine data calls against the dense fp64 reference: prefill of sequences of different lengths,
// decode steps, chunked prefill, independent layers, and lse (see engine_test_fixture.h).
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"

namespace attnd::engine_test {
namespace {

// ---- Prefill and decode ----

TEST_P(EngineTest, PrefillOfSequencesOfDifferentLengthsThenDecodeStepsMatchTheReference) {
  FragmentPool();
  for (uint64_t id = 1; id <= 4; ++id) Create(id);
  // Not multiples of the page size (except where the page size is 1), and a single token.
  PrefillAll({{1, 1}, {2, 7}, {3, 19}, {4, 37}});
  ExpectLengths(4, 37, 37);
  std::vector<uint64_t> ids = {1, 2, 3, 4};
  for (int step = 0; step < 4; ++step) {
    SCOPED_TRACE(absl::StrCat("decode step ", step));
    std::shuffle(ids.begin(), ids.end(), rng_);
    DecodeAll(ids);
  }
  ExpectLengths(1, 5, 5);
  ExpectLengths(3, 23, 23);
}

TEST_P(EngineTest, ChunkedPrefillMixingLongChunksAndSingleTokensMatchesTheReference) {
  FragmentPool();
  for (uint64_t id = 1; id <= 4; ++id) Create(id);
  PrefillAll({{1, 3}, {2, 1}, {3, 11}, {4, 2}});
  PrefillAll({{3, 1}, {1, 22}, {4, 1}, {2, 9}});
  PrefillAll({{2, 1}, {4, 30}});
  DecodeAll({4, 3, 2, 1});
  ExpectLengths(1, 26, 26);
  ExpectLengths(4, 34, 34);
}

TEST_P(EngineTest, LayersKeepIndependentLengthsAndKv) {
  FragmentPool();
  Create(1);
  Create(2);
  Prefill(0, {{1, 13}, {2, 5}});
  Prefill(0, {{1, 4}});
  Prefill(1, {{2, 21}, {1, 2}});
  ExpectLengths(1, 17, 2);
  ExpectLengths(2, 5, 21);
  Decode(1, {1, 2});
  Decode(0, {2, 1});
  Decode(1, {1});
  ExpectLengths(1, 18, 4);
}

TEST_P(EngineTest, LseIsTheNaturalLogOfTheSoftmaxDenominatorAndOnlyWrittenWhenAsked) {
  FragmentPool();
  Create(1);
  Create(2);
  // Attend checks lse against the reference when asked, and that it stays NaN when not.
  Attend(false, 0, {{1, 9}, {2, 1}}, /*with_lse=*/true);
  Attend(false, 0, {{1, 3}, {2, 17}}, /*with_lse=*/false);
  Attend(true, 0, {{2, 1}, {1, 1}}, /*with_lse=*/true);
  Attend(true, 0, {{1, 1}, {2, 1}}, /*with_lse=*/false);
}

}  // namespace
}  // namespace attnd::engine_test
