#include "client/workload/bench.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/workload/calls.h"
#include "client/workload/lifecycle.h"
#include "client/workload/report.h"

namespace attnd::workload {
namespace {

// One set of inputs for every timed call: the timing is of the server, not of the client's
// random number generator.
struct BenchInputs {
  SequenceList seqs;
  Items items;  // one new token for each of seqs
  std::vector<float> q, k, v;
};

absl::Status CheckBenchFits(const Session& s, const BenchResult& b) {
  const int64_t layers = s.model.layers, page = s.model.page_size;
  const int64_t growth =
      2 * ((b.calls + layers - 1) / layers) +
      ((b.calls + b.pipeline - 1) / b.pipeline) * ((b.pipeline + layers - 1) / layers) + 2;
  const uint64_t pages_needed = b.batch * ((b.context + growth + page - 1) / page);
  if (pages_needed > s.pages_free_at_start) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the benchmark needs ", pages_needed, " pages (", b.batch, " sequences x ",
                     b.context + growth, " tokens); the device has ", s.pages_free_at_start,
                     " free; lower --bench_batch or --bench_context"));
  }
  if (s.model.max_seq_len > 0 && static_cast<uint64_t>(b.context + growth) > s.model.max_seq_len) {
    return absl::FailedPreconditionError(
        absl::StrCat("--bench_context ", b.context, " exceeds the server's max_seq_len"));
  }
  return absl::OkStatus();
}

// Sequences at `context` tokens on every layer, filled with Append; the client keeps layer 0's
// K/V only, which is where the checked calls run.
absl::Status FillSequences(Session& s, const BenchResult& b, SequenceList& seqs) {
  for (int64_t i = 0; i < b.batch; ++i) {
    Sequence* seq = AddSequence(seqs, s.next_id++, s.model.layers);
    for (int64_t layer = 1; layer < s.model.layers; ++layer) seq->tracked[layer] = false;
    absl::StatusOr<v1::SequenceInfo> created = s.client.CreateSequence(s.options.device, seq->id);
    if (!created.ok()) return created.status();
    s.live_ids.insert(seq->id);
  }
  const Clock::time_point fill_start = Clock::now();
  const int64_t budget = std::min<int64_t>(s.model.max_tokens, s.buffers->main().tokens);
  size_t next = 0;
  while (next < seqs.size()) {
    Items items;
    int64_t left = budget;
    while (next < seqs.size() && left > 0 &&
           static_cast<int64_t>(items.size()) < s.model.max_batch) {
      Sequence* seq = seqs[next].get();
      const int64_t n = std::min(b.context - seq->len[0], left);
      items.emplace_back(seq, n);
      left -= n;
      if (seq->len[0] + n != b.context) break;  // the budget ran out part-way through it
      ++next;
    }
    for (uint32_t layer = 0; layer < s.model.layers; ++layer) {
      if (absl::Status st = FreshAppend(s, layer, items, /*fresh=*/layer == 0); !st.ok()) {
        return st;
      }
    }
  }
  s.out("bench: %d sequences filled to %d tokens x %d layers with Append in %.2f s\n", b.batch,
        b.context, s.model.layers, SecondsSince(fill_start));
  return absl::OkStatus();
}

// `calls` Decodes one at a time over `transport`, layers in turn; the first one is checked.
absl::Status TimedSeries(Session& s, const BenchResult& b, BenchInputs& in, Transport transport,
                         Latencies& lat) {
  const Slot& slot = s.buffers->bench()[0];
  for (int64_t i = 0; i < b.calls; ++i) {
    const uint32_t layer = i % s.model.layers;
    const bool check = i == 0;
    if (check) s.buffers->Poison(slot, b.batch);
    const v1::AttentionRequest request = BuildAttention(s, layer, in.items, slot, check);
    const std::string label =
        absl::StrFormat("bench Decode%s layer %d (%d items)",
                        transport == Transport::kStream ? " via Stream" : "", layer, b.batch);
    absl::StatusOr<v1::AttentionResponse> response =
        CallAttention(s, Op::kDecode, transport, request, &lat);
    if (!response.ok()) {
      return absl::Status(response.status().code(), label + ": " + response.status().ToString());
    }
    if (absl::Status st =
            AdvanceCopies(s, label, layer, in.items, response->lengths(), in.k.data(), in.v.data());
        !st.ok()) {
      return st;
    }
    if (check) VerifySlot(s, label, Op::kDecode, layer, in.items, in.q.data(), slot, true);
  }
  return absl::OkStatus();
}

// Applies one pipelined round's answers in request order: the copy of layer 0 is then exactly
// what the server held when it ran each call.
absl::Status ApplyRound(Session& s, const BenchResult& b, BenchInputs& in,
                        const std::vector<uint32_t>& layers,
                        const std::vector<v1::StreamResponse>& responses, bool check) {
  for (size_t j = 0; j < responses.size(); ++j) {
    const std::string label =
        absl::StrFormat("bench pipelined Decode #%d layer %d (%d items)", j, layers[j], b.batch);
    if (absl::Status st = client::StreamResponseStatus(responses[j]); !st.ok()) {
      return absl::Status(st.code(), label + ": " + st.ToString());
    }
    if (!responses[j].has_attention()) {
      return absl::InternalError(label + ": answered without an attention result");
    }
    s.accounting.tokens += b.batch;
    if (absl::Status st =
            AdvanceCopies(s, label, layers[j], in.items, responses[j].attention().lengths(),
                          in.k.data(), in.v.data());
        !st.ok()) {
      return st;
    }
    if (check && layers[j] == 0) {
      VerifySlot(s, label, Op::kDecode, 0, in.items, in.q.data(), s.buffers->bench()[j], true);
    }
  }
  return absl::OkStatus();
}

// Pipelined: `pipeline` Decodes in flight on the stream (layers in turn, one out buffer each),
// then their answers; timed per round.
absl::Status PipelinedRounds(Session& s, const BenchResult& b, BenchInputs& in, Latencies& rounds) {
  const int64_t round_count = (b.calls + b.pipeline - 1) / b.pipeline;
  for (int64_t r = 0; r < round_count; ++r) {
    const bool check = r == 0;
    if (check) {
      for (const Slot& slot : s.buffers->bench()) s.buffers->Poison(slot, b.batch);
    }
    std::vector<uint32_t> layers;
    const Clock::time_point start = Clock::now();
    for (int64_t j = 0; j < b.pipeline; ++j) {
      const uint32_t layer = j % s.model.layers;
      layers.push_back(layer);
      absl::StatusOr<uint64_t> tag =
          s.stream->SendDecode(BuildAttention(s, layer, in.items, s.buffers->bench()[j], check));
      if (!tag.ok()) return tag.status();
    }
    std::vector<v1::StreamResponse> responses;
    for (int64_t j = 0; j < b.pipeline; ++j) {
      absl::StatusOr<v1::StreamResponse> response = s.stream->Receive();
      if (!response.ok()) return response.status();
      responses.push_back(*std::move(response));
    }
    rounds.Add(SecondsSince(start));
    s.accounting.calls += b.pipeline;
    if (absl::Status st = ApplyRound(s, b, in, layers, responses, check); !st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BenchResult> RunDecodeBench(Session& s) {
  BenchResult b;
  b.batch = std::min<int64_t>(s.options.bench_batch, s.model.max_batch);
  b.context = std::max(1, s.options.bench_context);
  b.calls = std::max(1, s.options.bench_calls);
  b.pipeline = s.buffers->bench().size();
  if (absl::Status st = CheckBenchFits(s, b); !st.ok()) return st;

  BenchInputs in;
  if (absl::Status st = FillSequences(s, b, in.seqs); !st.ok()) return st;
  in.q = RandomRounded(s, b.batch * s.model.q_row());
  in.k = RandomRounded(s, b.batch * s.model.kv_row());
  in.v = RandomRounded(s, b.batch * s.model.kv_row());
  const Slot& slot = s.buffers->bench()[0];
  s.buffers->Write(slot.q, in.q);
  s.buffers->Write(slot.k, in.k);
  s.buffers->Write(slot.v, in.v);
  for (auto& seq : in.seqs) in.items.emplace_back(seq.get(), 1);

  if (absl::Status st = TimedSeries(s, b, in, Transport::kUnary, b.unary); !st.ok()) return st;
  if (absl::Status st = TimedSeries(s, b, in, Transport::kStream, b.stream); !st.ok()) return st;
  if (absl::Status st = PipelinedRounds(s, b, in, b.rounds); !st.ok()) return st;
  s.out.Put(FormatBenchReport(b));
  if (absl::Status st = ReleaseAll(s, in.seqs); !st.ok()) return st;
  return b;
}

}  // namespace attnd::workload
