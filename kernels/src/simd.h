// Internal to kernels/src: GCC vector extensions at the width the including file is compiled
// for (AVX-512: 16 floats, AVX/AVX2: 8, otherwise 4), with unaligned load, store and splat.
// Used by the per-instruction-set rule loops (rule_fast.cc, compiled three times with
// different flags) and the batched Newton–Schulz (ns_batch.cc). Everything here has
// internal linkage, so copies compiled for different instruction sets never meet at link
// time (see rule_fast.h).
#pragma once

#include <cstring>

#include "celo2/isa.h"

namespace celo2::simd {
namespace {

constexpr int kV = CELO2_VEC_BYTES / static_cast<int>(sizeof(float));

typedef float VF __attribute__((vector_size(kV * sizeof(float))));

inline VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
// x in every lane: one broadcast (x − (+0) is x exactly, −0 and NaN included, and folds
// away). A lane-by-lane loop compiled to one masked broadcast per lane (GCC 12, AVX-512),
// which made the splats of the rule's per-block biases a hot spot of meta-training.
inline VF splat(float x) { return x - VF{}; }

}  // namespace
}  // namespace celo2::simd
