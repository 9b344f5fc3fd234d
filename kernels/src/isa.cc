// The run-time choice between the copies of the rule's hot loops (celo2/isa.h, rule_fast.h).
#include <atomic>
#include <stdexcept>
#include <string>

#include "celo2/isa.h"
#include "rule_fast.h"

namespace celo2 {
namespace {

bool built(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBase:
      return true;
    case CpuIsa::kAvx2:
#if defined(CELO2_HAVE_ISA_AVX2)
      return true;
#else
      return false;
#endif
    case CpuIsa::kAvx512:
#if defined(CELO2_HAVE_ISA_AVX512)
      return true;
#else
      return false;
#endif
    default:
      return false;
  }
}

bool cpu_runs(CpuIsa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::kBase:
      return true;
    case CpuIsa::kAvx2:  // x86-64-v3
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    case CpuIsa::kAvx512:  // x86-64-v4
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512cd");
    default:
      return false;
  }
#else
  return isa == CpuIsa::kBase;
#endif
}

const fast::Kernels* table_of(CpuIsa isa) {
  switch (isa) {
#if defined(CELO2_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512:
      return &fast::isa_avx512::table;
#endif
#if defined(CELO2_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2:
      return &fast::isa_avx2::table;
#endif
    default:
      return &fast::isa_base::table;
  }
}

CpuIsa best() {
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2})
    if (built(isa) && cpu_runs(isa)) return isa;
  return CpuIsa::kBase;
}

std::atomic<int> g_isa{static_cast<int>(CpuIsa::kAuto)};

}  // namespace

CpuIsa cpu_isa() {
  int v = g_isa.load(std::memory_order_acquire);
  if (v == static_cast<int>(CpuIsa::kAuto)) {
    v = static_cast<int>(best());
    g_isa.store(v, std::memory_order_release);
  }
  return static_cast<CpuIsa>(v);
}

void set_cpu_isa(CpuIsa isa) {
  if (isa == CpuIsa::kAuto) isa = best();
  if (!built(isa))
    throw std::invalid_argument(std::string("CPU instruction set ") + cpu_isa_name(isa) +
                                ": this build of celo2 does not carry it");
  if (!cpu_runs(isa))
    throw std::invalid_argument(std::string("CPU instruction set ") + cpu_isa_name(isa) +
                                ": this CPU cannot run it");
  g_isa.store(static_cast<int>(isa), std::memory_order_release);
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto: return "auto";
    case CpuIsa::kBase: return "base";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "?";
}

CpuIsa parse_cpu_isa(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::kAuto, CpuIsa::kBase, CpuIsa::kAvx2, CpuIsa::kAvx512})
    if (name == cpu_isa_name(isa)) return isa;
  throw std::invalid_argument("unknown CPU instruction set '" + name +
                              "' (expected auto, base, avx2 or avx512)");
}

std::vector<CpuIsa> cpu_isas_available() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::kBase, CpuIsa::kAvx2, CpuIsa::kAvx512})
    if (built(isa) && cpu_runs(isa)) out.push_back(isa);
  return out;
}

namespace fast {
const Kernels& kernels() { return *table_of(cpu_isa()); }
}  // namespace fast

namespace {
std::atomic<bool> g_prefetch{true};
}  // namespace

bool cpu_prefetch() { return g_prefetch.load(std::memory_order_relaxed); }
void set_cpu_prefetch(bool on) { g_prefetch.store(on, std::memory_order_relaxed); }

}  // namespace celo2
