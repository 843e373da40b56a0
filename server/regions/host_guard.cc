#include "server/regions/host_guard.h"

#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

// The handler may touch nothing but lock-free atomics: it can interrupt any code, including a
// thread that is registering or unregistering a mapping in the same table.
static_assert(std::atomic<uintptr_t>::is_always_lock_free);
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(std::atomic<size_t>::is_always_lock_free);

// One guarded range. `claimed` gives one GuardedMapping the right to write the slot; `seq` is a
// seqlock around begin/end (odd while they change), so the handler never acts on a range torn
// between an old and a new registration. `damaged` lives outside the seqlock: only the handler
// sets it, and only while the range is registered and stable.
struct alignas(32) Slot {
  std::atomic<uint32_t> claimed{0};
  std::atomic<uint32_t> seq{0};
  std::atomic<uintptr_t> begin{0};  // begin == end == 0 while the slot guards nothing
  std::atomic<uintptr_t> end{0};
  std::atomic<uint32_t> damaged{0};
};

// Constant-initialized (no constructor runs, no allocation): 2 MiB of zero pages that are only
// touched as far as the high-water mark.
Slot g_slots[kGuardedMappingCapacity];
// Slots [0, g_high_water) have been claimed at some time; the handler scans no further.
std::atomic<size_t> g_high_water{0};
// Where the next registration starts looking, so that filling the table is linear, not
// quadratic.
std::atomic<size_t> g_cursor{0};
// The SIGBUS action before the guard's. Written once, before the guard's handler is installed,
// and only read afterwards.
struct sigaction g_previous;

void WriteRange(Slot& slot, uintptr_t begin, uintptr_t end) {
  const uint32_t seq = slot.seq.load(std::memory_order_relaxed);
  slot.seq.store(seq + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  slot.begin.store(begin, std::memory_order_relaxed);
  slot.end.store(end, std::memory_order_relaxed);
  slot.seq.store(seq + 2, std::memory_order_release);
}

// The slot whose registered range holds `addr`, with that range; -1 if none. A slot being
// rewritten (odd seq, or seq changed under the read) is skipped: it cannot be the faulting
// mapping's, whose registration is stable from before the first access to after the last.
int FindSlot(uintptr_t addr, uintptr_t* begin, uintptr_t* end) {
  const size_t n = g_high_water.load(std::memory_order_acquire);
  for (size_t i = 0; i < n; ++i) {
    Slot& slot = g_slots[i];
    const uint32_t seq = slot.seq.load(std::memory_order_acquire);
    if (seq & 1) continue;
    const uintptr_t b = slot.begin.load(std::memory_order_relaxed);
    const uintptr_t e = slot.end.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (slot.seq.load(std::memory_order_relaxed) != seq) continue;
    if (b <= addr && addr < e) {
      *begin = b;
      *end = e;
      return static_cast<int>(i);
    }
  }
  return -1;
}

void RestoreDefaultAction(int signo) {
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = SIG_DFL;
  sigemptyset(&action.sa_mask);
  sigaction(signo, &action, nullptr);
}

// A SIGBUS that is not the guard's: give it the fate it had before the guard.
void ChainToPrevious(int signo, siginfo_t* info, void* context) {
  const bool sent_by_process = info == nullptr || info->si_code <= 0;  // kill(), raise(), ...
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) g_previous.sa_sigaction(signo, info, context);
    return;
  }
  if (g_previous.sa_handler == SIG_IGN && sent_by_process) return;
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(signo);
    return;
  }
  // SIG_DFL (or SIG_IGN, which the kernel does not honour for a fault): the default action,
  // which ends the process. A fault needs no raise: returning re-runs the faulting instruction,
  // which faults again and now dies of it, with the real faulting context in the core dump. A
  // signal sent by a process is not repeated by returning, so it is raised again; it is
  // blocked while this handler runs and lands as soon as the handler returns.
  RestoreDefaultAction(signo);
  if (sent_by_process) raise(signo);
}

void OnSigbus(int signo, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  // BUS_ADRERR is what the kernel reports for an access past the end of a shrunk file or shm
  // object. Other SIGBUS codes (alignment, hardware memory errors) and signals sent with kill()
  // are not the guard's business, whatever si_addr holds.
  if (info != nullptr && info->si_code == BUS_ADRERR) {
    uintptr_t begin = 0, end = 0;
    const int slot = FindSlot(reinterpret_cast<uintptr_t>(info->si_addr), &begin, &end);
    if (slot >= 0) {
      // Damaged before the remap, so that nobody can read the zeros and then see !damaged().
      g_slots[slot].damaged.store(1, std::memory_order_release);
      // The whole mapping, not the faulting page: what attnd reads from it is all zeros from
      // now on, never a mix of the client's bytes and zeros. Several threads faulting in the
      // same mapping at once each remap it; the later remap only drops what attnd wrote into
      // the earlier one's private zeros, which the owner throws away as damaged anyway.
      // mmap is not on POSIX's async-signal-safe list, but on Linux it is a plain system call
      // with no lock or allocation in user space (glibc's wrapper sets errno, restored below);
      // Wayland compositors (wl_shm) have used exactly this remap in their SIGBUS handlers
      // for years.
      void* remapped = mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
                            MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (remapped != MAP_FAILED) {
        errno = saved_errno;
        return;  // the faulting instruction retries on the new memory
      }
    }
  }
  errno = saved_errno;
  ChainToPrevious(signo, info, context);
}

absl::Status Install() {
  // Read the previous action first and install second, so g_previous is complete before the
  // guard's handler can run.
  if (sigaction(SIGBUS, nullptr, &g_previous) != 0)
    return absl::InternalError(absl::StrCat("sigaction(SIGBUS): ", std::strerror(errno)));
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_sigaction = OnSigbus;
  // SA_ONSTACK: a thread with an alternate stack (absl's failure handler gives the main thread
  // one) handles the fault there.
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGBUS, &action, nullptr) != 0)
    return absl::InternalError(absl::StrCat("sigaction(SIGBUS): ", std::strerror(errno)));
  return absl::OkStatus();
}

void RaiseHighWater(size_t n) {
  size_t seen = g_high_water.load(std::memory_order_relaxed);
  while (seen < n &&
         !g_high_water.compare_exchange_weak(seen, n, std::memory_order_release,
                                             std::memory_order_relaxed)) {
  }
}

}  // namespace

absl::Status InstallHostGuard() {
  // A function-local static: installed by exactly one caller, the others wait for it.
  static const absl::Status* const installed = new absl::Status(Install());
  return *installed;
}

absl::StatusOr<GuardedMapping> GuardedMapping::Register(void* begin, size_t bytes) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin);
  if (b == 0 || bytes == 0 || b + bytes < b)
    return absl::InvalidArgumentError(
        absl::StrCat("cannot guard the range of ", bytes, " bytes at ", absl::Hex(b)));
  if (absl::Status s = InstallHostGuard(); !s.ok()) return s;
  const size_t start = g_cursor.load(std::memory_order_relaxed);
  for (size_t i = 0; i < kGuardedMappingCapacity; ++i) {
    const size_t index = (start + i) % kGuardedMappingCapacity;
    Slot& slot = g_slots[index];
    uint32_t expected = 0;
    if (slot.claimed.load(std::memory_order_relaxed) != 0 ||
        !slot.claimed.compare_exchange_strong(expected, 1, std::memory_order_acquire))
      continue;
    // Visible to the handler's scan before the range is, and the range before any access.
    RaiseHighWater(index + 1);
    slot.damaged.store(0, std::memory_order_relaxed);
    WriteRange(slot, b, b + bytes);
    g_cursor.store(index + 1, std::memory_order_relaxed);
    return GuardedMapping(static_cast<int>(index));
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "cannot guard more than ", kGuardedMappingCapacity,
      " mappings of client memory at once: unregister regions before registering more"));
}

GuardedMapping& GuardedMapping::operator=(GuardedMapping&& other) noexcept {
  if (this != &other) {
    Unregister();
    slot_ = other.slot_;
    other.slot_ = -1;
  }
  return *this;
}

void GuardedMapping::Unregister() {
  if (slot_ < 0) return;
  Slot& slot = g_slots[slot_];
  WriteRange(slot, 0, 0);
  slot.claimed.store(0, std::memory_order_release);
  slot_ = -1;
}

bool GuardedMapping::damaged() const {
  return slot_ >= 0 && g_slots[slot_].damaged.load(std::memory_order_acquire) != 0;
}

}  // namespace attnd
