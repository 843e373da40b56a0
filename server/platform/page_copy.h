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

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_PAGE_COPY_H_
