// Wall-clock timing of calls: a steady clock and the latencies of one kind of call, with
// nearest-rank percentiles.
#ifndef ATTND_CLIENT_WORKLOAD_LATENCIES_H_
#define ATTND_CLIENT_WORKLOAD_LATENCIES_H_

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

namespace attnd::workload {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start);

// "123 us": seconds shown in whole microseconds.
std::string Micros(double seconds);

class Latencies {
 public:
  void Add(double seconds) {
    samples_.push_back(seconds);
    total_ += seconds;
  }
  size_t count() const { return samples_.size(); }
  double total() const { return total_; }

  // Nearest-rank percentile, p in [0, 100]; 0 without samples.
  double Percentile(double p) const;

  // "n=10  p50 .. us  p90 .. us  p99 .. us  mean .. us", or "no calls".
  std::string Summary() const;

 private:
  std::vector<double> samples_;
  double total_ = 0;
};

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_LATENCIES_H_
