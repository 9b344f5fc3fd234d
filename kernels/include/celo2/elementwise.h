// Per-element math of the Celo2 rule (spec/celo2.md §3), shared by the CPU fast path, the
// CUDA kernels and the sharded engine. Everything here is a pure function of its arguments
// and is __host__ __device__ when compiled by nvcc, so the CPU tests cover the GPU's
// arithmetic. Features are written with a stride so callers can fill structure-of-arrays
// blocks (CPU, vectorized over elements) or a single vector (stride 1).
#pragma once

#include <cmath>

#include "celo2/config.h"

#if defined(__CUDACC__)
#define CELO2_HD __host__ __device__ __forceinline__
#else
#define CELO2_HD inline __attribute__((always_inline))
#endif

namespace celo2::ew {

inline constexpr float kGradClip = 1000.0f;
inline constexpr float kSmallClip = 0.1f;
inline constexpr float kQEps = 1e-30f;     // q = g^2 + 1e-30
inline constexpr float kSafeFloor = 1e-9f; // safe_rsqrt floor, and the mean(v_row) epsilon
inline constexpr float kRhoEps = 1e-8f;    // rho = 1/sqrt(r + 1e-8); groups 11, 12
inline constexpr float kNormEps = 1e-9f;   // input/output normalization
inline constexpr float kPrecondEps = 1e-6f;

CELO2_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
CELO2_HD float clip_grad(float g) { return clampf(g, -kGradClip, kGradClip); }
CELO2_HD float safe_rsqrt(float x) { return 1.0f / sqrtf(x > kSafeFloor ? x : kSafeFloor); }
CELO2_HD float ema(float beta, float acc, float x) { return beta * acc + (1.0f - beta) * x; }
// The celo2 branch's applied update (spec §4): p ← p − applied_step(lr, wd, p, u), one
// definition for the CPU apply (celo2::apply_update) and the CUDA kernels.
CELO2_HD float applied_step(float lr, float wd, float p, float u) { return lr * (u + wd * p); }

// Per row (index without axis d0) of a factored tensor, for decay k: everything the
// features need from v_row. `vhat` is the (bias-corrected) accumulator.
struct FacEntry {
  float vhat[kFac];      // group 9 (row) or 10 (col)
  float inv_sqrt[kFac];  // group 11 or 12: 1/sqrt(vhat + 1e-8)
  float scale[kFac];     // R_k or C_k from the uncorrected accumulators (fac_g)
  float scale_hat[kFac]; // R̂_k or Ĉ_k from the corrected ones (group 13)
};

// Inputs of one element that do not come from the factored tables.
struct ElementInputs {
  float g;               // clipped gradient
  float p;               // parameter
  float m_hat[kMom];     // (bias-corrected) momenta
  float r_hat;           // (bias-corrected) second moment
};

// Groups 0-8 (15 channels). fac_g is g*R*C (factored) or g*safe_rsqrt(v_diag + 1e-9).
CELO2_HD void features_common(const ElementInputs& e, const float fac_g[kFac], float* f,
                              int stride) {
  const float rho = 1.0f / sqrtf(e.r_hat + kRhoEps);
  f[0 * stride] = e.g;
  f[1 * stride] = clampf(e.g, -kSmallClip, kSmallClip);
  f[2 * stride] = e.p;
  for (int k = 0; k < kMom; ++k) f[(3 + k) * stride] = e.m_hat[k];
  f[6 * stride] = e.r_hat;
  for (int k = 0; k < kMom; ++k) f[(7 + k) * stride] = e.m_hat[k] * rho;
  f[10 * stride] = rho;
  for (int k = 0; k < kFac; ++k) f[(11 + k) * stride] = fac_g[k];
  f[14 * stride] = e.g * rho;
}

// All 30 channels of an element of a factored tensor.
CELO2_HD void features_factored(const ElementInputs& e, const FacEntry& row, const FacEntry& col,
                                float* f, int stride) {
  float fac_g[kFac];
  for (int k = 0; k < kFac; ++k) fac_g[k] = e.g * row.scale[k] * col.scale[k];
  features_common(e, fac_g, f, stride);
  for (int k = 0; k < kFac; ++k) {
    f[(15 + k) * stride] = row.vhat[k];
    f[(18 + k) * stride] = col.vhat[k];
    f[(21 + k) * stride] = row.inv_sqrt[k];
    f[(24 + k) * stride] = col.inv_sqrt[k];
    f[(27 + k) * stride] = e.m_hat[k] * row.scale_hat[k] * col.scale_hat[k];
  }
}

// The 15 channels of an element of a 0-d/1-d tensor; v_diag is already updated.
CELO2_HD void features_diag(const ElementInputs& e, const float v_diag[kFac], float* f,
                            int stride) {
  float fac_g[kFac];
  for (int k = 0; k < kFac; ++k) fac_g[k] = e.g * safe_rsqrt(v_diag[k] + kSafeFloor);
  features_common(e, fac_g, f, stride);
}

CELO2_HD float activate(Activation a, float x) {
  return a == Activation::kRelu ? (x > 0.0f ? x : 0.0f) : tanhf(x);
}

// One Newton–Schulz-free step of the rule's tail, per element: magnitude factor.
CELO2_HD float magnitude(float mag, float exp_mult) { return expf(mag * exp_mult); }

}  // namespace celo2::ew
