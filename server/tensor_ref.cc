#include "server/tensor_ref.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attnd/v1/dtype.h"

namespace attnd {
namespace {

std::string ShapeString(const google::protobuf::RepeatedField<uint64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

bool ResolvedTensor::Overlaps(const ResolvedTensor& other) const {
  if (region != other.region || bytes == 0 || other.bytes == 0) return false;
  return offset < other.offset + other.bytes && other.offset < offset + bytes;
}

v1::DType ToWire(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case kernels::DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case kernels::DType::kFloat32:
      return v1::DTYPE_FLOAT32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<ResolvedTensor> ResolveTensor(const RegionRegistry& regions,
                                             const v1::TensorRef& ref, absl::string_view field,
                                             v1::DType expected_dtype,
                                             const std::vector<uint64_t>& expected_shape,
                                             const Placement& placement) {
  if (ref.region().empty())
    return absl::InvalidArgumentError(absl::StrCat(field, ".region: required"));
  if (ref.dtype() != expected_dtype)
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: ", v1::DTypeName(ref.dtype()),
                                                   ", expected ", v1::DTypeName(expected_dtype)));
  bool shape_ok = ref.shape_size() == static_cast<int>(expected_shape.size());
  for (int i = 0; shape_ok && i < ref.shape_size(); ++i) shape_ok = ref.shape(i) == expected_shape[i];
  if (!shape_ok)
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: ", ShapeString(ref.shape()),
                                                   ", expected [",
                                                   absl::StrJoin(expected_shape, ", "), "]"));
  const uint64_t elem = v1::DTypeSize(expected_dtype);
  if (ref.offset() % elem != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".offset: ", ref.offset(), " is not a multiple of ", elem, " bytes"));
  // The shape equals the expected one, whose product the caller bounded, but multiply with
  // overflow checks anyway: this is the line between the wire and a pointer.
  uint64_t bytes = elem;
  for (uint64_t d : expected_shape) {
    if (__builtin_mul_overflow(bytes, d, &bytes))
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape: byte size overflows 64 bits"));
  }
  std::shared_ptr<Region> region = regions.Find(ref.region());
  if (region == nullptr)
    return absl::NotFoundError(
        absl::StrCat(field, ".region: no region named '", ref.region(), "'"));
  if (region->kind() == Region::Kind::kHost && !placement.host_ok)
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".region: '", ref.region(), "' is host memory; this request needs CUDA memory"));
  if (region->kind() == Region::Kind::kCuda && region->device() != placement.cuda_device)
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".region: '", ref.region(), "' lives on CUDA device ", region->device(),
        placement.cuda_device < 0 ? ", and this backend reads host memory only"
                                  : absl::StrCat(", the request runs on device ",
                                                 placement.cuda_device)));
  uint64_t end;
  if (__builtin_add_overflow(ref.offset(), bytes, &end) || end > region->byte_size())
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": bytes [", ref.offset(), ", ", ref.offset(), " + ", bytes, ") exceed region '",
        ref.region(), "' of ", region->byte_size(), " bytes"));
  ResolvedTensor t;
  t.data = region->base() + ref.offset();
  t.offset = ref.offset();
  t.bytes = bytes;
  t.region = std::move(region);
  return t;
}

}  // namespace attnd
