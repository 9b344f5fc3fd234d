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

// Two independent selects (NaN passes through both), so vector code compiles them to one max
// and one min instead of nested compares and mask blends.
CELO2_HD float clampf(float x, float lo, float hi) {
  const float t = x < lo ? lo : x;
  return t > hi ? hi : t;
}
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

// exp(x) in float from fused multiply-adds and exponent bits, the same operations on the CPU
// (where a loop of it vectorizes, unlike libm's expf) and on a CUDA device (whose expf is not
// libm's): both give the same bits. n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so
// r is exact to float), exp(r) by its degree-7 Taylor polynomial (|r| <= 0.347: truncation
// 5e-9 relative), times 2^n as two powers of two, so that results down to the subnormals are
// right and n up to 128 does not overflow the exponent field. Within 1 ulp of 1.0, relative, of exp over the
// normal range, measured 0.65 (tests/unit/rule_test.cc, ExpFastAgainstDoubleExp); NaN stays NaN, +inf gives inf, -inf gives 0.
CELO2_HD float bits_to_float(int i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}
CELO2_HD int float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  return __builtin_bit_cast(int, x);
#endif
}
CELO2_HD float exp_fast(float x) {
  x = x < -104.0f ? -104.0f : x;  // exp(-104) rounds to 0; comparisons let NaN through
  x = x > 89.0f ? 89.0f : x;      // exp(89) overflows to inf
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float j = fmaf(x, 1.44269504088896341f, kRound);
  const float n = j - kRound;
  float r = fmaf(-n, 0.693145751953125f, x);  // ln 2 = hi + lo, hi with 16 significant bits
  r = fmaf(-n, 1.42860682030941723e-6f, r);
  float p = 1.98412698e-4f;  // 1/7!
  p = fmaf(p, r, 1.38888889e-3f);
  p = fmaf(p, r, 8.33333333e-3f);
  p = fmaf(p, r, 4.16666667e-2f);
  p = fmaf(p, r, 1.66666667e-1f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const int ni = float_to_bits(j) - float_to_bits(kRound);  // n as an integer
  const int n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 65] (NaN: any bits, p is NaN)
  const float s1 = bits_to_float(static_cast<int>(static_cast<unsigned>(n1 + 127) << 23));
  const float s2 = bits_to_float(static_cast<int>(static_cast<unsigned>(n2 + 127) << 23));
  return p * s1 * s2;
}

// The rule's per-element magnitude factor exp(mag * exp_mult).
CELO2_HD float magnitude(float mag, float exp_mult) { return exp_fast(mag * exp_mult); }

}  // namespace celo2::ew
