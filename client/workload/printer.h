// Where a workload writes what it reports: a stdio stream, or nowhere.
#ifndef ATTND_CLIENT_WORKLOAD_PRINTER_H_
#define ATTND_CLIENT_WORKLOAD_PRINTER_H_

#include <cstdio>

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace attnd::workload {

class Printer {
 public:
  explicit Printer(std::FILE* out) : out_(out) {}

  template <typename... Args>
  void operator()(const absl::FormatSpec<Args...>& format, const Args&... args) const {
    if (out_ != nullptr) absl::FPrintF(out_, format, args...);
  }
  void Put(absl::string_view text) const {
    if (out_ != nullptr) std::fwrite(text.data(), 1, text.size(), out_);
  }
  void Flush() const {
    if (out_ != nullptr) std::fflush(out_);
  }

 private:
  std::FILE* out_;
};

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_PRINTER_H_
