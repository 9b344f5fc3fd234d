// Host memory on transparent huge pages (celo2/host_memory.h): where the rule's
// streamed arrays live, not what they hold.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "celo2/host_memory.h"

namespace celo2 {
namespace {
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;  // x86-64 and arm64 (4 KiB granule) THP size
constexpr size_t kLine = 64;
size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }
}  // namespace

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t lo = round_up(reinterpret_cast<uintptr_t>(p), kHugePage);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) / kHugePage * kHugePage;
  if (p && hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

void assign_huge(std::vector<float>& v, size_t n, float value) {
  if (n * sizeof(float) >= kHugePage && v.capacity() < n) {
    // Fresh storage, untouched until assign writes it: the advice takes effect at first touch.
    std::vector<float>().swap(v);
    v.reserve(n);
    advise_huge_pages(v.data(), n * sizeof(float));
  }
  v.assign(n, value);
}

float* alloc_host_floats(int64_t n) {
  // Cache-line aligned and not rounded up to whole huge pages: the advice covers the 2 MiB
  // pages inside the block, so a buffer just over 2 MiB costs no extra memory (the partial
  // pages at its two ends stay 4 KiB).
  const size_t size = round_up(static_cast<size_t>(n > 0 ? n : 1) * sizeof(float), kLine);
  void* p = std::aligned_alloc(kLine, size);
  if (!p) throw std::bad_alloc();
  advise_huge_pages(p, size);
  std::memset(p, 0, size);
  return static_cast<float*>(p);
}

void free_host_floats(float* p) noexcept { std::free(p); }

std::string thp_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  std::getline(f, line);
  const size_t a = line.find('['), b = line.find(']');
  return a != std::string::npos && b != std::string::npos && b > a ? line.substr(a + 1, b - a - 1) : "";
}

}  // namespace celo2
