#include "attnd/v1/dtype.h"

namespace attnd::v1 {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DTYPE_FLOAT16:
    case DTYPE_BFLOAT16:
      return 2;
    case DTYPE_FLOAT32:
      return 4;
    default:
      return 0;
  }
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DTYPE_FLOAT16:
      return "float16";
    case DTYPE_BFLOAT16:
      return "bfloat16";
    case DTYPE_FLOAT32:
      return "float32";
    default:
      return "unspecified";
  }
}

}  // namespace attnd::v1
