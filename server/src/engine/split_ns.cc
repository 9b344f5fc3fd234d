// Newton–Schulz over a group of ranks (celo2/split_ns.h).
#include "celo2/split_ns.h"

#include "celo2/newton_schulz.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace celo2 {
namespace {
// The element-wise passes run on the OpenMP threads, as in the unsplit newton_schulz (BLAS
// runs on its own between them): the packing of A's triangle and its unpacking are O(r²)
// per iteration, next to GEMMs of O(r²·c/g); the Frobenius sum is ns_sum_squares (fixed
// lanes, the same bits at any thread count).
constexpr int64_t kParallelMin = kNsParallelMin;

// Where row i of the packed upper triangle of an R×R matrix starts.
inline size_t tri_row(int64_t i, int64_t R) { return static_cast<size_t>(i * R - i * (i - 1) / 2); }

}  // namespace

void newton_schulz_split(const RuleConfig& cfg, int64_t r, int64_t c_local, float* x_local, Communicator& group,
                         std::vector<float>& scratch, bool rows_block, bool split_poly, int product) {
  if (r <= 0) return;
  if (c_local < 0) throw std::invalid_argument("newton_schulz_split: negative column count");
  const size_t rc = static_cast<size_t>(r * c_local), rr = static_cast<size_t>(r * r);
  // split_poly: member j forms rows [r·j/g, r·(j+1)/g) of B (counts: every member's share).
  const int g = group.size(), me = group.rank();
  const int64_t row0 = r * me / g, row1 = r * (me + 1) / g;
  std::vector<int64_t> counts;
  if (split_poly)
    for (int k = 0; k < g; ++k) counts.push_back((r * (k + 1) / g - r * k / g) * r);
  // Apply the polynomial as two products with A (no B) where that is fewer FLOPs.
  const bool by_product =
      !split_poly && ns_split_product(static_cast<double>(r), static_cast<double>(c_local), product);
  // B's space also holds T = A·X when by_product (B is not formed then); r·c_local < r² in
  // auto mode, but a forced product may need more.
  const size_t b_size = by_product ? std::max(rr, rc) : rr;
  scratch.resize(rc + rr + b_size + (split_poly ? static_cast<size_t>((row1 - row0) * r) : 0));
  float* Y = scratch.data();
  float* A = Y + rc;
  float* B = A + rr;
  float* Bpart = B + b_size;
  float* T = B;
  const size_t tri = static_cast<size_t>(r * (r + 1) / 2);
  std::vector<double> sum(tri);
  // Frobenius normalization over the whole matrix.
  double fro = ns_sum_squares(x_local, static_cast<int64_t>(rc));
  group.all_reduce_sum(&fro, 1);
  const float scale = static_cast<float>(1.0 / (std::sqrt(fro) + cfg.ns_eps));
  ns_axpby(static_cast<int64_t>(rc), scale, x_local, 0.0f, nullptr, x_local);
  const int R = static_cast<int>(r), C = static_cast<int>(c_local);
  float* X = x_local;
  for (int it = 0; it < cfg.ns_iters; ++it) {
    // This rank's part of A = X Xᵀ, summed over the group in double.
    if (C > 0 && rows_block) {
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, R, C, 1.0f, X, R, 0.0f, A, R);
    } else if (C > 0) {
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, R, C, 1.0f, X, C, 0.0f, A, R);
    } else {
      std::fill(A, A + rr, 0.0f);
    }
    // The upper triangle only (A is symmetric): r(r+1)/2 values on the wire.
    const bool par_tri = static_cast<int64_t>(tri) >= kParallelMin;
#pragma omp parallel for schedule(dynamic, 16) if (par_tri)
    for (int i = 0; i < R; ++i) {
      const size_t k0 = tri_row(i, R);
      for (int j = i; j < R; ++j) sum[k0 + static_cast<size_t>(j - i)] = A[static_cast<size_t>(i) * R + j];
    }
    group.all_reduce_sum(sum.data(), static_cast<int64_t>(tri));
#pragma omp parallel for schedule(dynamic, 16) if (par_tri)
    for (int i = 0; i < R; ++i) {
      const size_t k0 = tri_row(i, R);
      for (int j = i; j < R; ++j)
        A[static_cast<size_t>(i) * R + j] = A[static_cast<size_t>(j) * R + i] =
            static_cast<float>(sum[k0 + static_cast<size_t>(j - i)]);
    }
    if (by_product) {
      // Y = a·X + b·(AX) + c·A(AX); for a block of rows (Xᵀ) the transpose: T = X·A, Y += c·T·A.
      const float a = static_cast<float>(cfg.ns_coeffs[0]), b = static_cast<float>(cfg.ns_coeffs[1]),
                  c = static_cast<float>(cfg.ns_coeffs[2]);
      if (rows_block)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, R, R, 1.0f, X, R, A, R, 0.0f, T, R);
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, C, R, 1.0f, A, R, X, C, 0.0f, T, C);
      ns_axpby(static_cast<int64_t>(rc), a, X, b, T, Y);
      if (rows_block)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, R, R, c, T, R, A, R, 1.0f, Y, R);
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, C, R, c, A, R, T, C, 1.0f, Y, C);
      ns_axpby(static_cast<int64_t>(rc), 1.0f, Y, 0.0f, nullptr, X);  // X = Y
      continue;
    }
    if (split_poly) {
      // This member's rows of B = bA + cA·A, then every member's rows to everyone.
      const int64_t nr = row1 - row0;
      const float b = static_cast<float>(cfg.ns_coeffs[1]), c = static_cast<float>(cfg.ns_coeffs[2]);
      const float* Arows = A + row0 * r;
      ns_axpby(nr * r, b, Arows, 0.0f, nullptr, Bpart);
      if (nr > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(nr), R, R, c, Arows, R, A, R,
                    1.0f, Bpart, R);
      group.all_gather(Bpart, B, counts);
    } else {
      ns_polynomial(cfg, r, A, B);
    }
    if (C == 0) continue;
    if (rows_block) {
      // Y = a·X + X·B (B symmetric): the transpose of a·Xᵀ + B·Xᵀ.
      const float a = static_cast<float>(cfg.ns_coeffs[0]);
      ns_axpby(static_cast<int64_t>(rc), a, X, 0.0f, nullptr, Y);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, R, R, 1.0f, X, R, B, R, 1.0f, Y, R);
    } else {
      ns_apply_polynomial(cfg, r, c_local, B, X, Y);
    }
    ns_axpby(static_cast<int64_t>(rc), 1.0f, Y, 0.0f, nullptr, X);  // X = Y
  }
}

double split_ns_flops(const RuleConfig& cfg, double r, double c_local, int g, bool split_poly, int product) {
  const double gram = 2.0 * r * r * c_local;  // counted as a full product, as newton_schulz_flops
  double poly;
  if (split_poly)
    poly = 2.0 * r * r * r / g + 2.0 * r * r * c_local;
  else if (ns_split_product(r, c_local, product))
    poly = 4.0 * r * r * c_local;
  else
    poly = 2.0 * r * r * r + 2.0 * r * r * c_local;
  return cfg.ns_iters * (gram + poly);
}

SplitNsCost split_ns_cost(const RuleConfig& cfg, int64_t r, int g, bool split_poly) {
  SplitNsCost c;
  c.all_reduces = 1 + cfg.ns_iters;
  c.all_gathers = split_poly ? cfg.ns_iters : 0;
  if (g <= 1) return c;
  // As the communicators count them: a ring all-reduce of n doubles 2 · (8n (g−1) / g), an
  // all-gather of n floats in all 4n (g−1) / g, integer.
  auto all_reduce = [&](int64_t n) { return 2 * (8 * n * (g - 1) / g); };
  auto all_gather = [&](int64_t n) { return 4 * n * (g - 1) / g; };
  c.bytes_per_rank = static_cast<double>(all_reduce(1) + cfg.ns_iters * all_reduce(r * (r + 1) / 2) +
                                         c.all_gathers * all_gather(r * r));
  return c;
}

}  // namespace celo2
