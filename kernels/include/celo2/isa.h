// Which vector instruction set the CPU rule's hot loops run with. The library is built with
// one copy of those loops per x86-64 level (AVX-512, AVX2+FMA, the portable baseline; on
// other CPUs only the baseline) and picks the best one the CPU supports at the first call.
// The engine applies the CELO2_CPU_ISA tunable (celo2/params.h); tests and celo2-bench set it
// directly to compare the copies.
#pragma once

#include <string>
#include <vector>

// The vector width, in bytes, that the including translation unit is compiled for (its
// -march / -mavx* flags): 64 with AVX-512, 32 with AVX/AVX2, else 16 (SSE, NEON). A macro,
// so that files compiled once per instruction set (rule_fast.cc) each see their own.
#if defined(__AVX512F__)
#define CELO2_VEC_BYTES 64
#elif defined(__AVX__)
#define CELO2_VEC_BYTES 32
#else
#define CELO2_VEC_BYTES 16
#endif

namespace celo2 {

enum class CpuIsa { kAuto, kBase, kAvx2, kAvx512 };

// The instruction set in effect (never kAuto).
CpuIsa cpu_isa();
// kAuto: the best supported one. Throws std::invalid_argument naming the set when this CPU
// cannot run it or the library was built without it.
void set_cpu_isa(CpuIsa isa);
// "auto", "base", "avx2", "avx512".
const char* cpu_isa_name(CpuIsa isa);
// The inverse of cpu_isa_name; throws std::invalid_argument on anything else.
CpuIsa parse_cpu_isa(const std::string& name);
// The sets this build carries and this CPU runs, worst first.
std::vector<CpuIsa> cpu_isas_available();

// Whether the hot loops prefetch the arrays they stream, 3 KiB ahead, in software (default
// on; docs/PERF.md "Software prefetch"). It changes no result. The engine applies the
// CELO2_CPU_PREFETCH tunable; celo2-bench --no-prefetch turns it off, to measure what it
// gives on a machine.
bool cpu_prefetch();
void set_cpu_prefetch(bool on);

}  // namespace celo2
