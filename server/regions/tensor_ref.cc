#include "server/regions/tensor_ref.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace attnd {
namespace {

std::string ShapeString(absl::Span<const uint64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

bool ResolvedTensor::Overlaps(const ResolvedTensor& other) const {
  if (bytes == 0 || other.bytes == 0) return false;
  uint64_t start = offset, other_start = other.offset;  // in one coordinate system
  if (region != other.region) {
    const Region::Backing& a = region->backing();
    const Region::Backing& b = other.region->backing();
    if (a.known && b.known) {
      // Host regions: positions in the object they map.
      if (a.device != b.device || a.inode != b.inode) return false;
      start += a.offset;
      other_start += b.offset;
    } else if (region->kind() == other.region->kind() && region->kind() == Region::Kind::kCuda &&
               region->device() == other.region->device()) {
      // CUDA regions of one device live in one address space.
      start = reinterpret_cast<uint64_t>(region->base()) + offset;
      other_start = reinterpret_cast<uint64_t>(other.region->base()) + other.offset;
    } else {
      return false;
    }
  }
  return start < other_start + other.bytes && other_start < start + bytes;
}

const char* DTypeName(std::optional<kernels::DType> dtype) {
  if (!dtype.has_value()) return "unspecified";
  switch (*dtype) {
    case kernels::DType::kFloat16:
      return "float16";
    case kernels::DType::kBFloat16:
      return "bfloat16";
    case kernels::DType::kFloat32:
      return "float32";
    case kernels::DType::kFloat8E4M3:  // pool storage only; no tensor is of it
      return "float8_e4m3";
  }
  return "unspecified";
}

absl::StatusOr<ResolvedTensor> ResolveTensor(const RegionRegistry& regions,
                                             const TensorName& ref, absl::string_view field,
                                             kernels::DType expected_dtype,
                                             absl::Span<const uint64_t> expected_shape,
                                             const Placement& placement, uint32_t owner) {
  if (ref.region.empty())
    return absl::InvalidArgumentError(absl::StrCat(field, ".region: required"));
  if (ref.dtype != expected_dtype)
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: ", DTypeName(ref.dtype),
                                                   ", expected ", DTypeName(expected_dtype)));
  if (!std::equal(ref.shape.begin(), ref.shape.end(), expected_shape.begin(), expected_shape.end()))
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: ", ShapeString(ref.shape),
                                                   ", expected [",
                                                   absl::StrJoin(expected_shape, ", "), "]"));
  const uint64_t elem = kernels::DTypeSize(expected_dtype);
  if (ref.offset % elem != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".offset: ", ref.offset, " is not a multiple of ", elem, " bytes"));
  // The shape equals the expected one, whose product the caller bounded, but multiply with
  // overflow checks anyway: this is the line between the wire and a pointer.
  uint64_t bytes = elem;
  for (uint64_t d : expected_shape) {
    if (__builtin_mul_overflow(bytes, d, &bytes))
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape: byte size overflows 64 bits"));
  }
  std::shared_ptr<Region> region = regions.Find(ref.region, owner);
  if (region == nullptr)
    return absl::NotFoundError(
        absl::StrCat(field, ".region: no region named '", ref.region, "'"));
  if (region->kind() == Region::Kind::kHost && !placement.host_ok)
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".region: '", ref.region, "' is host memory; this request needs CUDA memory"));
  if (region->kind() == Region::Kind::kCuda && region->device() != placement.cuda_device)
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".region: '", ref.region, "' lives on CUDA device ", region->device(),
        placement.cuda_device < 0 ? ", and this backend reads host memory only"
                                  : absl::StrCat(", the request runs on device ",
                                                 placement.cuda_device)));
  uint64_t end;
  if (__builtin_add_overflow(ref.offset, bytes, &end) || end > region->byte_size())
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": bytes [", ref.offset, ", ", ref.offset, " + ", bytes, ") exceed region '",
        ref.region, "' of ", region->byte_size(), " bytes"));
  ResolvedTensor t;
  t.data = region->base() + ref.offset;
  t.offset = ref.offset;
  t.bytes = bytes;
  t.region = std::move(region);
  return t;
}

}  // namespace attnd
