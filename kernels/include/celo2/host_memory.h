// Host memory for large per-element arrays on transparent huge pages (kernels/src/
// host_memory.cc): the rule's state planes (RuleState::zeros), the host backends' flat
// buffers, the benchmarks' arrays.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace celo2 {

// Host memory for large per-element arrays on transparent huge pages. The rule's passes
// stream six to thirteen arrays at once; on 4 KiB pages a 16M-element matrix's walk misses
// the TLB every 1,024 elements of every stream (docs/PERF.md "A fourth CPU": the rule 4–5 %
// faster on 2 MiB pages on an AMD Zen 5). Linux's default THP mode on many distributions is
// "madvise", so the advice has to be asked for, before the memory is first touched.
//
// advise_huge_pages: madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [p, p + bytes);
// a no-op below 2 MiB, off Linux, or where the kernel refuses (never an error: it changes
// where memory lives, not what it holds).
void advise_huge_pages(void* p, size_t bytes);
// v = n copies of `value`, the storage advised before it is written (reserve, advise, fill).
void assign_huge(std::vector<float>& v, size_t n, float value = 0.0f);
// Zeroed floats for a host backend: 64-byte aligned, the whole 2 MiB pages inside advised
// (no rounding up: no memory beyond the request); release with free_host_floats.
float* alloc_host_floats(int64_t n);
void free_host_floats(float* p) noexcept;
// The system's transparent-huge-page mode: "always", "madvise", "never", or "" where
// /sys/kernel/mm/transparent_hugepage/enabled cannot be read.
std::string thp_mode();

}  // namespace celo2
