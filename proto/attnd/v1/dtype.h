// Facts about the wire's DType that both ends need: bytes per element and a readable name.
#ifndef ATTND_PROTO_ATTND_V1_DTYPE_H_
#define ATTND_PROTO_ATTND_V1_DTYPE_H_

#include <cstddef>

#include "attnd/v1/attention.pb.h"

namespace attnd::v1 {

// Bytes per element; 0 for DTYPE_UNSPECIFIED or an unknown value.
size_t DTypeSize(DType dtype);
// "float16", "bfloat16", "float32", or "unspecified".
const char* DTypeName(DType dtype);

}  // namespace attnd::v1

#endif  // ATTND_PROTO_ATTND_V1_DTYPE_H_
