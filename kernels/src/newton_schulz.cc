// Newton–Schulz on BLAS. Per iteration (X is r×c with r <= c):
//   A = X Xᵀ        ssyrk, r²c FLOP-pairs (symmetric: half of an sgemm); the pass that
//                   mirrors the triangle also writes B = bA
//   B = bA + cA²    sgemm r³ with beta 1 (A is symmetric, plain sgemm is fastest in OpenBLAS)
//   X = aX + BX     a·X on the OpenMP threads, then sgemm r²c with beta 1
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "celo2/isa.h"
#include "celo2/newton_schulz.h"
#include "celo2/lane_sum.h"

extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_parallel(void);
extern "C" char* openblas_get_corename(void);

namespace celo2 {

void set_blas_threads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}

const char* blas_threading() {
  switch (openblas_get_parallel()) {
    case 0: return "sequential";
    case 1: return "pthread";
    case 2: return "openmp";
  }
  return "unknown";
}

std::string blas_core() {
  const char* c = openblas_get_corename();
  return c ? c : "unknown";
}

std::string blas_coretype_env() {
  const char* e = std::getenv("OPENBLAS_CORETYPE");
  return e ? e : "";
}

std::string blas_core_note(const std::string& core, const char* env, bool cpu_has_avx512) {
  if (!env || !*env || !cpu_has_avx512) return "";
  // OpenBLAS 0.3.21's x86-64 families with AVX-512 kernels (and later releases' names).
  for (const char* wide : {"SkylakeX", "Cooperlake", "SapphireRapids", "Zen4", "Zen5"})
    if (core == wide) return "";
  return "OPENBLAS_CORETYPE=" + std::string(env) + " makes OpenBLAS run its '" + core +
         "' kernels on a CPU with AVX-512: Newton-Schulz runs about half as fast as with the "
         "family OpenBLAS would choose (unset OPENBLAS_CORETYPE, or set it to SkylakeX)";
}

std::string blas_core_note() {
  const std::vector<CpuIsa> have = cpu_isas_available();
  const bool avx512 = !have.empty() && have.back() == CpuIsa::kAvx512;
  const std::string env = blas_coretype_env();
  return blas_core_note(blas_core(), env.c_str(), avx512);
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

// The BLAS calls of one precision.
void gemm(int m, int n, int k, float alpha, const float* A, const float* B, float beta, float* C) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, alpha, A, k, B, n, beta, C, n);
}
void gemm(int m, int n, int k, double alpha, const double* A, const double* B, double beta, double* C) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, alpha, A, k, B, n, beta, C, n);
}
void syrk(int n, int k, const float* M, float* S) {
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, n, k, 1.0f, M, k, 0.0f, S, n);
}
void syrk(int n, int k, const double* M, double* S) {
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, n, k, 1.0, M, k, 0.0, S, n);
}

// The element-wise passes below run on the OpenMP threads (BLAS runs on its own between
// them). The Frobenius norm is lane_sum's fixed partition (celo2/lane_sum.h), so it does not
// depend on the thread count.
constexpr int64_t kParallelMin = kNsParallelMin;

template <class T>
double sum_squares(const T* x, int64_t n) {
  return lane_sum(n, [x](int64_t i) { return static_cast<double>(x[i]) * x[i]; });
}

// y = a·x (+ b·t where t is set), on the OpenMP threads from kParallelMin elements: every
// element-wise pass of the iteration (the Frobenius scaling, bA, a·X) and of the split one.
template <class T>
void scale_add(int64_t n, T a, const T* x, T b, const T* t, T* y) {
  if (t) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = a * x[i] + b * t[i];
  } else {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
  }
}

// out = inᵀ (in: rows×cols, row-major), in 32×32 tiles that keep both sides in cache; or a
// plain copy.
template <class T>
void transpose_or_copy(bool transpose, int64_t rows, int64_t cols, const T* in, T* out) {
  const bool par = rows * cols >= kParallelMin;
  if (transpose) {
    constexpr int64_t kT = 32;
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int64_t i0 = 0; i0 < rows; i0 += kT)
      for (int64_t j0 = 0; j0 < cols; j0 += kT)
        for (int64_t i = i0; i < std::min(rows, i0 + kT); ++i)
          for (int64_t j = j0; j < std::min(cols, j0 + kT); ++j) out[j * rows + i] = in[i * cols + j];
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < rows; ++i) std::memcpy(out + i * cols, in + i * cols, cols * sizeof(T));
  }
}

// X (r×c, r <= c, row-major) from x, scaled by 1/(‖x‖_F + eps); returns whether it was
// transposed.
template <class T>
bool load_wide(const RuleConfig& cfg, int64_t rows, int64_t cols, const T* x, T* X) {
  const bool transpose = rows > cols;
  const int64_t rc = rows * cols;
  transpose_or_copy(transpose, rows, cols, x, X);
  const double fro = sum_squares(X, rc);
  const T scale = static_cast<T>(1.0 / (std::sqrt(fro) + cfg.ns_eps));
  scale_add<T>(rc, scale, X, T(0), nullptr, X);
  return transpose;
}

// x (rows×cols) from X (r×c, transposed when `transpose`).
template <class T>
void store_wide(int64_t rows, int64_t cols, bool transpose, const T* X, T* x) {
  if (transpose)
    transpose_or_copy(true, cols, rows, X, x);
  else
    transpose_or_copy(false, rows, cols, X, x);
}

// S = M Mᵀ (M n×k row-major), both triangles; with B, also B = scale·S in the same pass.
template <class T>
void gram_of(int n, int k, const T* M, T* S, T* B = nullptr, T scale = T(0)) {
  syrk(n, k, M, S);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n) * n >= kParallelMin)
  for (int i = 0; i < n; ++i) {
    T* si = S + static_cast<size_t>(i) * n;
    for (int j = 0; j < i; ++j) si[j] = S[static_cast<size_t>(j) * n + i];
    if (B) {
      T* bi = B + static_cast<size_t>(i) * n;
      for (int j = 0; j < n; ++j) bi[j] = scale * si[j];
    }
  }
}

// B = bA + cA² (A r×r; B holds bA on entry when scaled, else is formed here); then
// Y = aX + BX: the a·X pass on the OpenMP threads, the product added by one GEMM with beta 1.
// (The same operation order as the CUDA GEMM plan, kernels/cuda/src/newton_schulz_plan.h,
// which tests/unit/rule_layout_test.cc holds to this function at 1e-5.)
template <class T>
void polynomial(const RuleConfig& cfg, int R, const T* A, T* B, bool b_scaled = false) {
  const T b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  const int64_t rr = static_cast<int64_t>(R) * R;
  if (!b_scaled) scale_add<T>(rr, b, A, T(0), nullptr, B);
  gemm(R, R, R, cc, A, A, T(1), B);
}
template <class T>
void apply_poly(const RuleConfig& cfg, int R, int C, const T* B, const T* X, T* Y) {
  const T a = cfg.ns_coeffs[0];
  scale_add<T>(static_cast<int64_t>(R) * C, a, X, T(0), nullptr, Y);
  gemm(R, C, R, T(1), B, X, T(1), Y);
}

template <class T>
void standard(const RuleConfig& cfg, int R, int Cc, T*& X, T*& Y, T* A, T* B) {
  for (int it = 0; it < cfg.ns_iters; ++it) {
    gram_of(R, Cc, X, A, B, static_cast<T>(cfg.ns_coeffs[1]));
    polynomial(cfg, R, A, B, /*b_scaled=*/true);
    apply_poly(cfg, R, Cc, B, X, Y);
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
    gemm(R, Cc, R, 1.0f, Q, X, 0.0f, Y);
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
      gemm(R, R, R, 1.0f, P, Q, 0.0f, T);
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
      gemm(R, R, R, 1.0f, P, A, 0.0f, T);
      gemm(R, R, R, 1.0f, T, P, 0.0f, A);
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
  const int64_t r = std::min(rows, cols), c = std::max(rows, cols);
  const size_t rc = static_cast<size_t>(r * c), rr = static_cast<size_t>(r * r);
  std::vector<double> buf(2 * rc + 2 * rr);
  double* X = buf.data();
  double* Y = X + rc;
  const bool transpose = load_wide(cfg, rows, cols, x, X);
  standard(cfg, static_cast<int>(r), static_cast<int>(c), X, Y, Y + rc, Y + rc + rr);
  store_wide(rows, cols, transpose, X, x);
}

double ns_sum_squares(const float* x, int64_t n) { return sum_squares(x, n); }

void ns_axpby(int64_t n, float a, const float* x, float b, const float* t, float* y) {
  scale_add<float>(n, a, x, b, t, y);
}

void ns_polynomial(const RuleConfig& cfg, int64_t r, const float* A, float* B) {
  polynomial(cfg, static_cast<int>(r), A, B);
}

void ns_apply_polynomial(const RuleConfig& cfg, int64_t r, int64_t c, const float* B, const float* X, float* Y) {
  apply_poly(cfg, static_cast<int>(r), static_cast<int>(c), B, X, Y);
}

}  // namespace celo2
