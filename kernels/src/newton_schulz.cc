// Newton–Schulz on BLAS. Per iteration (X is r×c with r <= c):
//   A = X Xᵀ      ssyrk, r²c FLOP-pairs (symmetric: half of an sgemm)
//   B = bA + cA²  ssymm-free: sgemm r³ (A is symmetric, plain sgemm is fastest in OpenBLAS)
//   X = aX + BX   sgemm r²c
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "celo2/newton_schulz.h"

extern "C" void openblas_set_num_threads(int);

namespace celo2 {

void set_blas_threads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}

double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols) {
  const double r = static_cast<double>(std::min(rows, cols));
  const double c = static_cast<double>(std::max(rows, cols));
  // X Xᵀ (counted as a full GEMM: 2r²c), A·A (2r³), B·X (2r²c).
  return cfg.ns_iters * (4.0 * r * r * c + 2.0 * r * r * r);
}

void newton_schulz(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x,
                   std::vector<float>& scratch) {
  if (rows == 0 || cols == 0) return;
  const bool transpose = rows > cols;
  const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
  const size_t rc = static_cast<size_t>(r * c), rr = static_cast<size_t>(r * r);
  scratch.resize(2 * rc + 2 * rr);
  float* X = scratch.data();
  float* Y = X + rc;
  float* A = Y + rc;
  float* B = A + rr;
  if (transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) X[j * c + i] = x[i * cols + j];
  } else {
    std::memcpy(X, x, rc * sizeof(float));
  }
  double fro = 0.0;
  for (size_t i = 0; i < rc; ++i) fro += static_cast<double>(X[i]) * X[i];
  const float scale = static_cast<float>(1.0 / (std::sqrt(fro) + cfg.ns_eps));
  for (size_t i = 0; i < rc; ++i) X[i] *= scale;
  const float a = cfg.ns_coeffs[0], b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  const int R = static_cast<int>(r), Cc = static_cast<int>(c);
  for (int it = 0; it < cfg.ns_iters; ++it) {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, R, Cc, 1.0f, X, Cc, 0.0f, A, R);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < i; ++j) A[i * R + j] = A[j * R + i];
    for (size_t i = 0; i < rr; ++i) B[i] = b * A[i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, cc, A, R, A, R, 1.0f, B, R);
    for (size_t i = 0; i < rc; ++i) Y[i] = a * X[i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, Cc, R, 1.0f, B, R, X, Cc, 1.0f, Y, Cc);
    std::swap(X, Y);
  }
  if (transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = X[j * c + i];
  } else {
    std::memcpy(x, X, rc * sizeof(float));
  }
}

}  // namespace celo2
