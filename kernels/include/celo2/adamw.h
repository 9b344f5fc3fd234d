// The AdamW branch of the Celo2 recipe (spec/celo2.md §4, Optax semantics):
//   μ ← β1 μ + (1−β1) g,  ν ← β2 ν + (1−β2) g²,  μ̂ = μ/(1−β1^c),  ν̂ = ν/(1−β2^c),
//   p ← p − lr·(μ̂/(sqrt(ν̂)+eps) + wd·p)      (lr already includes mult_1d)
// `count` is the update count after increment (c >= 1). Gradients are not clipped.
#pragma once

#include <cstdint>

namespace celo2 {

struct AdamWParams {
  float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  float lr = 0.0f;  // effective learning rate of this update
  float wd = 0.0f;
  int64_t count = 1;
};

// Plain, one element at a time, double-precision bias corrections: the reference.
void adamw_reference(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                     float* nu);
// Fused, vectorized, multi-threaded.
void adamw_update(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                  float* nu);
// adamw_update's arithmetic (the same p, μ, ν bits), returning Σ (p_old − p_new)² in double
// (celo2/lane_sum.h's partition) from the same pass: what the recipe reports as the AdamW
// branch's update RMS.
double adamw_update_sumsq(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                          float* nu);

}  // namespace celo2
