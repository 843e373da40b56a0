// What request_fuzzer and its seed generator agree on: how an input's first byte picks the
// request message the rest of the input is parsed as, and the tiny model the fuzzed engine
// serves (so seeds can be valid requests that reach the engine's deepest checks).
#ifndef ATTND_TESTS_FUZZ_REQUEST_KINDS_H_
#define ATTND_TESTS_FUZZ_REQUEST_KINDS_H_

#include <cstdint>

namespace attnd::fuzz {

// Input byte 0 modulo kNumKinds. Append only: the checked-in corpus depends on the order.
enum class Kind : uint8_t {
  kAppend,               // AppendRequest
  kPrefill,              // AttentionRequest
  kDecode,               // AttentionRequest
  kStream,               // StreamRequest (its op: Append, Prefill or Decode)
  kExportKv,             // ExportKvRequest
  kImportKv,             // ImportKvRequest
  kRegisterHostRegion,   // RegisterHostRegionRequest: conversion and name check only
  kRegisterCudaRegion,   // RegisterCudaRegionRequest
  kRegisterCudaEvent,    // RegisterCudaEventRequest
  kUnregisterRegion,     // UnregisterRegionRequest
  kUnregisterCudaEvent,  // UnregisterCudaEventRequest
  kCreateSequence,       // CreateSequenceRequest
  kForkSequence,         // ForkSequenceRequest
  kTruncateSequence,     // TruncateSequenceRequest
  kReleaseSequence,      // ReleaseSequenceRequest
  kGetSequence,          // GetSequenceRequest
  kListSequences,        // ListSequencesRequest
};
inline constexpr int kNumKinds = static_cast<int>(Kind::kListSequences) + 1;

// The fuzzed engine's model and limits: small, so valid requests are cheap and limits near.
inline constexpr int64_t kLayers = 2;
inline constexpr int64_t kQoHeads = 4;
inline constexpr int64_t kKvHeads = 2;
inline constexpr int64_t kHeadDim = 8;
inline constexpr int64_t kPageSize = 4;
inline constexpr int64_t kPages = 64;
inline constexpr int64_t kMaxBatch = 8;
inline constexpr int64_t kMaxSeqLen = 64;
inline constexpr int64_t kMaxTokensPerRequest = 32;
inline constexpr int kElemBytes = 2;  // bf16

// Before every input the engine holds one host region and two sequences on device 0: one
// empty, one with kFilledTokens tokens at every layer.
inline constexpr char kRegion[] = "io";
inline constexpr uint64_t kRegionBytes = 64 << 10;
inline constexpr uint64_t kEmptySeq = 1;
inline constexpr uint64_t kFilledSeq = 2;
inline constexpr int64_t kFilledTokens = 5;

}  // namespace attnd::fuzz

#endif  // ATTND_TESTS_FUZZ_REQUEST_KINDS_H_
