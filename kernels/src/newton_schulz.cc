// Newton–Schulz on BLAS. Per iteration (X is r×c with r <= c):
//   A = X Xᵀ      ssyrk, r²c FLOP-pairs (symmetric: half of an sgemm)
//   B = bA + cA²  ssymm-free: sgemm r³ (A is symmetric, plain sgemm is fastest in OpenBLAS)
//   X = aX + BX   sgemm r²c
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "celo2/newton_schulz.h"

extern "C" void openblas_set_num_threads(int);

namespace celo2 {

void set_blas_threads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}

const char* ns_method_name(NsMethod m) {
  switch (m) {
    case NsMethod::kAuto: return "auto";
    case NsMethod::kStandard: return "standard";
    case NsMethod::kGram: return "gram";
  }
  return "?";
}

namespace {
std::atomic<int> g_default_method{static_cast<int>(NsMethod::kAuto)};
std::atomic<int> g_default_restart{kGramRestart};
int restart_of(int requested) { return requested >= 0 ? requested : g_default_restart.load(); }
}  // namespace

void set_ns_method_default(NsMethod m, int gram_restart) {
  g_default_method.store(static_cast<int>(m));
  g_default_restart.store(gram_restart < 0 ? kGramRestart : gram_restart);
}

NsMethod ns_method_for(int64_t rows, int64_t cols, NsMethod requested) {
  if (requested == NsMethod::kAuto) requested = static_cast<NsMethod>(g_default_method.load());
  (void)rows;
  (void)cols;
  return requested == NsMethod::kGram ? NsMethod::kGram : NsMethod::kStandard;
}

double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols) {
  return newton_schulz_flops(cfg, rows, cols, NsMethod::kAuto);
}

double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols, NsMethod method, int gram_restart) {
  const double r = static_cast<double>(std::min(rows, cols));
  const double c = static_cast<double>(std::max(rows, cols));
  const int K = cfg.ns_iters;
  gram_restart = restart_of(gram_restart);
  if (ns_method_for(rows, cols, method) == NsMethod::kStandard)
    return K * (4.0 * r * r * c + 2.0 * r * r * r);  // X Xᵀ, A·A, B·X per iteration
  // G and the final Q·X₀; per iteration A·A, P·Q (not right after a (re)start), P·A·P (not
  // in the last); a restart recomputes X = Q·X₀ and G.
  double f = 4.0 * r * r * c;
  int since = 0;
  for (int it = 0; it < K; ++it) {
    f += 2.0 * r * r * r;
    if (since > 0) f += 2.0 * r * r * r;
    ++since;
    if (it == K - 1) break;
    if (gram_restart > 0 && since == gram_restart) {
      f += 4.0 * r * r * c;
      since = 0;
    } else {
      f += 4.0 * r * r * r;
    }
  }
  return f;
}

namespace {

// X (r×c, r <= c, row-major) from x, scaled by 1/(‖x‖_F + eps); returns whether it was
// transposed.
bool load_wide(const RuleConfig& cfg, int64_t rows, int64_t cols, const float* x, float* X) {
  const bool transpose = rows > cols;
  const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
  const size_t rc = static_cast<size_t>(r * c);
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
  return transpose;
}

void store_wide(int64_t rows, int64_t cols, bool transpose, const float* X, float* x) {
  const int64_t c = transpose ? rows : cols;
  if (transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = X[j * c + i];
  } else {
    std::memcpy(x, X, static_cast<size_t>(rows * cols) * sizeof(float));
  }
}

// S = M Mᵀ (M n×k row-major), both triangles.
void gram_of(int n, int k, const float* M, float* S) {
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, n, k, 1.0f, M, k, 0.0f, S, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) S[i * n + j] = S[j * n + i];
}

void standard(const RuleConfig& cfg, int R, int Cc, float*& X, float*& Y, float* A, float* B) {
  const float a = cfg.ns_coeffs[0], b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  const size_t rc = static_cast<size_t>(R) * Cc, rr = static_cast<size_t>(R) * R;
  for (int it = 0; it < cfg.ns_iters; ++it) {
    gram_of(R, Cc, X, A);
    for (size_t i = 0; i < rr; ++i) B[i] = b * A[i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, cc, A, R, A, R, 1.0f, B, R);
    for (size_t i = 0; i < rc; ++i) Y[i] = a * X[i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, Cc, R, 1.0f, B, R, X, Cc, 1.0f, Y, Cc);
    std::swap(X, Y);
  }
}

// The Gram iteration (newton_schulz.h kGram). X holds X₀ on entry and the result on exit;
// Y is r×c scratch; A, P, Q, T are r×r.
void gram(const RuleConfig& cfg, int R, int Cc, int restart, float*& X, float*& Y, float* A, float* P,
          float* Q, float* T) {
  const float a = cfg.ns_coeffs[0], b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  const size_t rr = static_cast<size_t>(R) * R;
  const int K = cfg.ns_iters;
  gram_of(R, Cc, X, A);
  int since = 0;  // iterations since the last (re)start: Q = I before the first
  auto apply_q = [&] {  // X = Q·X₀
    if (since == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, Cc, R, 1.0f, Q, R, X, Cc, 0.0f, Y, Cc);
    std::swap(X, Y);
  };
  for (int it = 0; it < K; ++it) {
    // P = aI + bA + cA² (A² = A Aᵀ: A is symmetric).
    gram_of(R, R, A, P);
    for (size_t i = 0; i < rr; ++i) P[i] = b * A[i] + cc * P[i];
    for (int i = 0; i < R; ++i) P[static_cast<size_t>(i) * R + i] += a;
    if (since == 0) {
      std::memcpy(Q, P, rr * sizeof(float));
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, 1.0f, P, R, Q, R, 0.0f, T, R);
      std::memcpy(Q, T, rr * sizeof(float));
    }
    ++since;
    if (it == K - 1) break;
    if (restart > 0 && since == restart) {
      apply_q();
      since = 0;
      gram_of(R, Cc, X, A);
    } else {
      // A ← P A P (symmetric in exact arithmetic; symmetrized against drift).
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, 1.0f, P, R, A, R, 0.0f, T, R);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, 1.0f, T, R, P, R, 0.0f, A, R);
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < i; ++j) {
          const float m = 0.5f * (A[static_cast<size_t>(i) * R + j] + A[static_cast<size_t>(j) * R + i]);
          A[static_cast<size_t>(i) * R + j] = A[static_cast<size_t>(j) * R + i] = m;
        }
    }
  }
  apply_q();
}

}  // namespace

void newton_schulz(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x, std::vector<float>& scratch,
                   NsMethod method, int gram_restart) {
  if (rows == 0 || cols == 0) return;
  const int64_t r = std::min(rows, cols), c = std::max(rows, cols);
  const size_t rc = static_cast<size_t>(r * c), rr = static_cast<size_t>(r * r);
  const bool use_gram = ns_method_for(rows, cols, method) == NsMethod::kGram;
  scratch.resize(2 * rc + (use_gram ? 4 : 2) * rr);
  float* X = scratch.data();
  float* Y = X + rc;
  float* A = Y + rc;
  const bool transpose = load_wide(cfg, rows, cols, x, X);
  const int R = static_cast<int>(r), Cc = static_cast<int>(c);
  if (use_gram) gram(cfg, R, Cc, restart_of(gram_restart), X, Y, A, A + rr, A + 2 * rr, A + 3 * rr);
  else standard(cfg, R, Cc, X, Y, A, A + rr);
  store_wide(rows, cols, transpose, X, x);
}

void newton_schulz_f64(const RuleConfig& cfg, int64_t rows, int64_t cols, double* x) {
  if (rows == 0 || cols == 0) return;
  const bool transpose = rows > cols;
  const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
  const size_t rc = static_cast<size_t>(r * c), rr = static_cast<size_t>(r * r);
  std::vector<double> buf(2 * rc + 2 * rr);
  double* X = buf.data();
  double* Y = X + rc;
  double* A = Y + rc;
  double* B = A + rr;
  if (transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) X[j * c + i] = x[i * cols + j];
  } else {
    std::memcpy(X, x, rc * sizeof(double));
  }
  double fro = 0.0;
  for (size_t i = 0; i < rc; ++i) fro += X[i] * X[i];
  const double scale = 1.0 / (std::sqrt(fro) + cfg.ns_eps);
  for (size_t i = 0; i < rc; ++i) X[i] *= scale;
  const double a = cfg.ns_coeffs[0], b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  const int R = static_cast<int>(r), Cc = static_cast<int>(c);
  for (int it = 0; it < cfg.ns_iters; ++it) {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, R, Cc, 1.0, X, Cc, X, Cc, 0.0, A, R);
    for (size_t i = 0; i < rr; ++i) B[i] = b * A[i];
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, R, R, cc, A, R, A, R, 1.0, B, R);
    for (size_t i = 0; i < rc; ++i) Y[i] = a * X[i];
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, Cc, R, 1.0, B, R, X, Cc, 1.0, Y, Cc);
    std::swap(X, Y);
  }
  if (transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = X[j * c + i];
  } else {
    std::memcpy(x, X, rc * sizeof(double));
  }
}

}  // namespace celo2
