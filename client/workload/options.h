// What a workload does: how many sequences, how long their prompts, how they are chunked into
// Prefill requests, how many decode steps, and the shape of the Decode latency benchmark.
#ifndef ATTND_CLIENT_WORKLOAD_OPTIONS_H_
#define ATTND_CLIENT_WORKLOAD_OPTIONS_H_

#include <cstdint>
#include <cstdio>
#include <string>

namespace attnd::workload {

struct WorkloadOptions {
  uint32_t device = 0;       // server device the sequences live on
  int sequences = 16;        // prompts prefilled (the last one imported with Append instead)
  int steps = 32;            // decode steps, one Decode per layer each; a fork a third of the
                             // way in, two truncates two thirds of the way in
  int max_prompt = 300;      // prompt lengths are drawn from [1, max_prompt]
  int prefill_chunk = 64;    // most tokens of one sequence per Prefill item
  int prefill_tokens = 256;  // most tokens per Prefill request
  uint64_t seed = 0;         // shapes and data; 0: RandomSeed()
  int bench_batch = 64;      // sequences in the Decode latency benchmark; 0: no benchmark
  int bench_context = 512;   // tokens per benchmark sequence
  int bench_calls = 200;     // timed Decode calls per transport

  // Progress lines, the summary, the benchmark's table and failed checks go here; nullptr:
  // nowhere.
  std::FILE* log = stdout;
  // Names: the shm object is "/<shm_prefix>-<pid>-<random>", the region "<region_prefix>" plus
  // that key.
  std::string shm_prefix = "workload";
  std::string region_prefix = "workload";
  // Installs SIGINT/SIGTERM/SIGPIPE/SIGHUP handlers that unlink the workload's shared memory
  // before the signal takes the process down (for a command-line tool; a test leaves it off).
  bool unlink_shm_on_signal = false;
};

// A fresh nonzero seed from the system's entropy source.
uint64_t RandomSeed();

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_OPTIONS_H_
