// Turns a tensor a request names into a pointer the backend may use, after checking,
// overflow-safe, that every byte lies inside a live region of the right kind and that dtype and
// shape are the ones the request documents. This is the line between client names and memory.
#ifndef ATTND_SERVER_REGIONS_TENSOR_REF_H_
#define ATTND_SERVER_REGIONS_TENSOR_REF_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/paged_kv.h"
#include "server/regions/region.h"

namespace attnd {

// A tensor a request names: bytes [offset, offset + size) of a registered region.
struct TensorName {
  std::string region;  // empty: not given
  uint64_t offset = 0;
  std::optional<kernels::DType> dtype;  // nullopt: unspecified or unknown on the wire
  absl::InlinedVector<uint64_t, 4> shape;
};

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

// The messages name `field` ("q.dtype: ...", "k_new.region: ...").
absl::StatusOr<ResolvedTensor> ResolveTensor(const RegionRegistry& regions, const TensorName& name,
                                             absl::string_view field,
                                             kernels::DType expected_dtype,
                                             absl::Span<const uint64_t> expected_shape,
                                             const Placement& placement, uint32_t owner = 0);

// "float16", "bfloat16", "float32"; "unspecified" for nullopt.
const char* DTypeName(std::optional<kernels::DType> dtype);

}  // namespace attnd

#endif  // ATTND_SERVER_REGIONS_TENSOR_REF_H_
