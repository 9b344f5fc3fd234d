// newton_schulz_batch (celo2/rule_batch.h): the standard Newton–Schulz iteration of
// celo2/newton_schulz.h on many small matrices of one shape, with register-blocked products
// written here (GCC vector extensions at the build's widest float vectors) instead of one
// BLAS call per product: at 64×32 OpenBLAS spends most of a call on its own overhead.
//
// Per matrix, in a scratch of padded row-major matrices (leading dimensions rounded up to a
// vector; the padding is kept zero so it contributes nothing to any product), on T = Xᵀ
// (c×r) with X the wide r×c matrix of newton_schulz() (r <= c), so that a tall matrix is T
// itself and no product needs a transposed copy:
//   T scaled by 1/(‖T‖_F + eps) as newton_schulz() scales X (‖·‖² in double, partial sums);
//   per iteration:  A = Tᵀ·T (= X Xᵀ);  B = b·A + c·(A·A);  T ← a·T + T·B (= (a·X + B·X)ᵀ,
//   B being symmetric).
// Each product entry is one float sum over k in increasing k, with FMAs: not BLAS's order, so
// the result agrees with newton_schulz() to float rounding (tests/unit/rule_batch_test.cc).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "celo2/newton_schulz.h"
#include "celo2/lane_sum.h"
#include "celo2/rule_batch.h"
#include "simd.h"

namespace celo2 {
namespace {

constexpr int kW = simd::kV;
#if defined(__AVX512F__)
constexpr int kMaxNV = 4;  // up to 6 rows × 4 vectors of accumulators + 4 of B: 28 of 32 registers
#elif defined(__AVX__)
constexpr int kMaxNV = 2;  // 4 × 2 + 2 (or 8 × 1 + 1) of 16 registers
#else
constexpr int kMaxNV = 2;
#endif
// Rows per register block: as many as the accumulators allow beside NV vectors of B and one
// broadcast. With 16 registers (AVX2) and NV = 2 that is 6 rows (12 accumulators): 4 rows left
// a Zen 3 core's two FMA pipes waiting on the 4-cycle FMA latency (8 chains); with 6 (and the
// leftover rows below in blocks) the 64×32 batch went from 36–42 to 71–73 GFLOP/s there
// (docs/METATRAIN.md).
template <int NV>
constexpr int rows_per_block() {
  return kW >= 16 ? (NV <= 2 ? 8 : 6) : (NV <= 1 ? 8 : 6);
}
using simd::VF;
using simd::vload;
using simd::vstore;
inline int64_t padded(int64_t n) { return (n + kW - 1) / kW * kW; }

// C[i][j0, j0 + NV·kW) = alpha·Σ_{kk<k} A(i, kk)·B[kk][·] (+ beta·D[i][·]) for MR rows, where
// A(i, kk) = A[i·ars + kk·aks] (a row-major or a transposed operand).
template <int MR, int NV>
inline void block(int64_t k, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                  float* C, int64_t ldc, const float* D, int64_t ldd, float alpha, float beta) {
  VF acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = VF{};
  for (int64_t kk = 0; kk < k; ++kk) {
    VF b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + kk * ldb + v * kW);
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * ars + kk * aks];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      VF r = alpha * acc[i][v];
      if (D) r += beta * vload(D + i * ldd + v * kW);
      vstore(C + i * ldc + v * kW, r);
    }
}

template <int NV>
void rows_of(int64_t m, int64_t k, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
             float* C, int64_t ldc, const float* D, int64_t ldd, float alpha, float beta) {
  int64_t i = 0;
  constexpr int MR = rows_per_block<NV>();
  for (; i + MR <= m; i += MR)
    block<MR, NV>(k, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, D ? D + i * ldd : nullptr, ldd,
                   alpha, beta);
  // The rest in blocks of 4 and 2 rows before single ones (one row is one FMA chain per
  // vector: latency-bound).
  if constexpr (MR > 4)
    for (; i + 4 <= m; i += 4)
      block<4, NV>(k, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, D ? D + i * ldd : nullptr, ldd,
                   alpha, beta);
  for (; i + 2 <= m; i += 2)
    block<2, NV>(k, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, D ? D + i * ldd : nullptr, ldd,
                 alpha, beta);
  for (; i < m; ++i)
    block<1, NV>(k, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc, D ? D + i * ldd : nullptr, ldd,
                 alpha, beta);
}

// C (m × n, n a multiple of kW) = alpha·A·B (+ beta·D): A(i, kk) as in block(), B k×n,
// C and D m×n, row-major, padded.
void product(int64_t m, int64_t n, int64_t k, const float* A, int64_t ars, int64_t aks, const float* B,
             int64_t ldb, float* C, int64_t ldc, const float* D, int64_t ldd, float alpha, float beta) {
  for (int64_t j = 0; j < n;) {
    const int64_t nv = std::min<int64_t>(kMaxNV, (n - j) / kW);
    const float* Bj = B + j;
    float* Cj = C + j;
    const float* Dj = D ? D + j : nullptr;
    switch (nv) {
      case 4: if constexpr (kMaxNV >= 4) rows_of<4>(m, k, A, ars, aks, Bj, ldb, Cj, ldc, Dj, ldd, alpha, beta); break;
      case 3: if constexpr (kMaxNV >= 3) rows_of<3>(m, k, A, ars, aks, Bj, ldb, Cj, ldc, Dj, ldd, alpha, beta); break;
      case 2: rows_of<2>(m, k, A, ars, aks, Bj, ldb, Cj, ldc, Dj, ldd, alpha, beta); break;
      default: rows_of<1>(m, k, A, ars, aks, Bj, ldb, Cj, ldc, Dj, ldd, alpha, beta); break;
    }
    j += nv * kW;
  }
}

}  // namespace

void newton_schulz_batch(const RuleConfig& cfg, int64_t rows, int64_t cols, std::span<float* const> xs,
                         std::vector<float>& scratch) {
  if (rows == 0 || cols == 0 || xs.empty()) return;
  if (ns_method_for(rows, cols) != NsMethod::kStandard) {  // the Gram iteration: BLAS, per matrix
    for (float* x : xs) newton_schulz(cfg, rows, cols, x, scratch);
    return;
  }
  // The iteration on T = Xᵀ (c×r), X the wide r×c matrix (r <= c):
  //   A = X Xᵀ = Tᵀ T (A(i, kk) = T[kk][i]);  B = b·A + c·A·A;  Tᵀ ← a·Tᵀ + T·B (B symmetric).
  // T of a tall matrix is the matrix itself; no transposes inside the iteration.
  const bool tall = rows > cols;
  const int64_t r = std::min(rows, cols), c = std::max(rows, cols);
  const int64_t lr = padded(r);
  scratch.resize(static_cast<size_t>(2 * c * lr + 2 * r * lr));
  float* T = scratch.data();
  float* U = T + c * lr;
  float* A = U + c * lr;
  float* B = A + r * lr;
  const float ca = cfg.ns_coeffs[0], cb = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  for (float* x : xs) {
    std::fill(T, T + c * lr, 0.0f);  // the padding columns stay zero
    if (tall) {
      for (int64_t j = 0; j < c; ++j) std::memcpy(T + j * lr, x + j * cols, static_cast<size_t>(r) * sizeof(float));
    } else {
      for (int64_t j = 0; j < c; ++j)
        for (int64_t i = 0; i < r; ++i) T[j * lr + i] = x[i * cols + j];
    }
    // ‖X‖² in double in lane_sum's partition, over the padded rows (zeros add nothing).
    const double fro = lane_sum(c * lr, [T](int64_t i) { return static_cast<double>(T[i]) * T[i]; });
    const float scale = static_cast<float>(1.0 / (std::sqrt(fro) + cfg.ns_eps));
    for (int64_t i = 0; i < c * lr; ++i) T[i] *= scale;
    for (int it = 0; it < cfg.ns_iters; ++it) {
      product(r, lr, c, T, 1, lr, T, lr, A, lr, nullptr, 0, 1.0f, 0.0f);   // A = Tᵀ T
      product(r, lr, r, A, lr, 1, A, lr, B, lr, A, lr, cc, cb);           // B = c·A² + b·A
      product(c, lr, r, T, lr, 1, B, lr, U, lr, T, lr, 1.0f, ca);         // U = T·B + a·T
      std::swap(T, U);
    }
    if (tall) {
      for (int64_t j = 0; j < c; ++j) std::memcpy(x + j * cols, T + j * lr, static_cast<size_t>(r) * sizeof(float));
    } else {
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < c; ++j) x[i * cols + j] = T[j * lr + i];
    }
  }
}

}  // namespace celo2
