// A copy-on-write page copy: what the pool's bookkeeping asks a backend to do before a write.
#ifndef ATTND_SERVER_PLATFORM_PAGE_COPY_H_
#define ATTND_SERVER_PLATFORM_PAGE_COPY_H_

#include <cstdint>

namespace attnd {

// A whole page (every layer, K and V) to copy before writing into `dst` instead of `src`.
struct PageCopy {
  int32_t src;
  int32_t dst;
};

// Bytes of one pool to copy into another (a KV pull): offsets from each pool's first byte.
struct PageRun {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t bytes = 0;
};

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_PAGE_COPY_H_
