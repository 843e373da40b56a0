// Turns a wire TensorRef into a pointer the backend may use, after checking, overflow-safe, that
// every byte lies inside a live region of the right kind and that dtype and shape are the ones
// the request documents.
#ifndef ATTND_SERVER_TENSOR_REF_H_
#define ATTND_SERVER_TENSOR_REF_H_

#include <cstdint>
#include <memory>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "attnd/v1/attention.pb.h"
#include "kernels/paged_kv.h"
#include "server/region.h"

namespace attnd {

struct ResolvedTensor {
  std::shared_ptr<Region> region;  // keeps the mapping alive while the request runs
  uint8_t* data = nullptr;
  uint64_t offset = 0;  // within the region
  uint64_t bytes = 0;

  bool Overlaps(const ResolvedTensor& other) const;
};

// Where a request's tensors may live: host memory (the CPU backend) or one CUDA device.
struct Placement {
  bool host_ok = true;
  int cuda_device = -1;  // -1: no CUDA region is acceptable
};

absl::StatusOr<ResolvedTensor> ResolveTensor(const RegionRegistry& regions,
                                             const v1::TensorRef& ref, absl::string_view field,
                                             v1::DType expected_dtype,
                                             const std::vector<uint64_t>& expected_shape,
                                             const Placement& placement);

v1::DType ToWire(kernels::DType dtype);

}  // namespace attnd

#endif  // ATTND_SERVER_TENSOR_REF_H_
