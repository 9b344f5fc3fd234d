// Newton–Schulz orthogonalization (spec/celo2.md §3 step 9) of one rows×cols row-major
// matrix, in place: if rows > cols it works on the transpose; X /= (‖X‖_F + eps); then
// ns_iters times A = X Xᵀ, B = bA + cA², X = aX + BX.
#pragma once

#include <cstdint>
#include <vector>

#include "celo2/config.h"

namespace celo2 {

// Plain triple loops in double precision: the reference.
void newton_schulz_reference(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x);

// BLAS (sgemm/ssyrk) in float32; `scratch` is resized as needed and reused across calls.
void newton_schulz(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x,
                   std::vector<float>& scratch);

// FLOPs of one newton_schulz call (for benchmarks and owner load balancing).
double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols);

// Limit BLAS to `n` threads (0 = leave as is). OpenBLAS threads otherwise fight OpenMP's.
void set_blas_threads(int n);

}  // namespace celo2
