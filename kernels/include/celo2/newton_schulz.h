// Newton–Schulz orthogonalization (spec/celo2.md §3 step 9) of one rows×cols row-major
// matrix, in place: if rows > cols it works on the transpose; X /= (‖X‖_F + eps); then
// ns_iters times A = X Xᵀ, B = bA + cA², X = aX + BX.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "celo2/config.h"

namespace celo2 {

// Plain triple loops in double precision: the reference.
void newton_schulz_reference(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x);

// How the iteration is computed (the same polynomial either way).
//   kStandard: on the r×c matrix X (r <= c), as above.
//   kGram: on the r×r Gram matrix. With G = X₀X₀ᵀ and p(A) = aI + bA + cA², every X_k is
//     Q_k X₀ with Q_{k+1} = p(A_k) Q_k, and A_{k+1} = X_{k+1}X_{k+1}ᵀ = P_k A_k P_k (P_k = p(A_k)
//     is symmetric and commutes with A_k), so the iterations touch only r×r matrices and X₀
//     is read twice (G and the final Q·X₀). Exact in real arithmetic. Fewer FLOPs when c is
//     a few times r (44 % fewer at c = 4r, 34 % at c = 3r, 5 iterations); more when c ≈ r. In float32 the Gram
//     matrix squares X's condition number; `gram_restart` > 0 rebuilds X = Q·X₀ and G from it
//     every that many iterations (a restart), trading r²c work for accuracy.
//   kAuto: the process's choice (set_ns_method_default; CELO2_NS_METHOD), kStandard unless
//     set. Gram is not the default anywhere: at the GPT-3 XL shapes it saves 26–44 % of the
//     FLOPs, but on a low-rank-plus-noise input (the spectrum of gradient momenta) its error
//     after the output normalization is 3–4x the standard float32 path's and above the
//     golden files' 1e-4 (docs/PERF.md "Gram Newton–Schulz").
enum class NsMethod { kAuto, kStandard, kGram };
NsMethod ns_method_for(int64_t rows, int64_t cols, NsMethod requested = NsMethod::kAuto);
// The restart interval kAuto uses with kGram.
inline constexpr int kGramRestart = 2;
// Process-wide: what kAuto means from now on (kAuto or kStandard: the standard iteration;
// kGram: the Gram iteration for every matrix, with `gram_restart`). For tests and the
// CELO2_NS_METHOD tunable.
void set_ns_method_default(NsMethod m, int gram_restart = kGramRestart);
const char* ns_method_name(NsMethod m);

// BLAS (sgemm/ssyrk) in float32; `scratch` is resized as needed and reused across calls.
// gram_restart < 0: kGramRestart (or the process-wide setting's) when kGram is used.
void newton_schulz(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x,
                   std::vector<float>& scratch, NsMethod method = NsMethod::kAuto, int gram_restart = -1);

// The float64 BLAS version of the standard iteration: the accuracy reference at sizes the
// triple loops cannot reach (benchmarks' error tables).
void newton_schulz_f64(const RuleConfig& cfg, int64_t rows, int64_t cols, double* x);

// One iteration's two products, for iterations that form A = X Xᵀ themselves (the split
// Newton–Schulz, celo2/split_ns.h): B = b·A + c·A² (A r×r), and Y = a·X + B·X (X, Y r×c).
void ns_polynomial(const RuleConfig& cfg, int64_t r, const float* A, float* B);
void ns_apply_polynomial(const RuleConfig& cfg, int64_t r, int64_t c, const float* B, const float* X, float* Y);

// FLOPs of one newton_schulz call (for benchmarks and owner load balancing), for the method
// kAuto means now. GEMM-equivalent: every product counts 2mnk, the symmetric
// ones (X Xᵀ, A·A, computed by ssyrk at half that) included.
double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols);
double newton_schulz_flops(const RuleConfig& cfg, int64_t rows, int64_t cols, NsMethod method,
                           int gram_restart = -1);

// Element counts below which Newton–Schulz's element-wise passes stay on one thread (they
// run on the OpenMP threads above it, BLAS on its own between them).
constexpr int64_t kNsParallelMin = int64_t{1} << 15;

// Σ x² in double in lane_sum's fixed partition (celo2/lane_sum.h: chunks on the OpenMP
// threads, 16 lanes in each, combined in order): the same bits at any thread count. The
// Frobenius norm of newton_schulz and of newton_schulz_split (celo2/split_ns.h).
double ns_sum_squares(const float* x, int64_t n);
// y = a·x (+ b·t where t is not null), n elements, on the OpenMP threads from
// kNsParallelMin: the iterations' element-wise passes (newton_schulz's and the split one's).
void ns_axpby(int64_t n, float a, const float* x, float b, const float* t, float* y);

// Limit BLAS to `n` threads (0 = leave as is). OpenBLAS threads otherwise fight OpenMP's.
void set_blas_threads(int n);

// The thread pool of the BLAS loaded at run time (OpenBLAS's openblas_get_parallel):
// "openmp" (shares the rule's OpenMP pool), "pthread" (its own), or "sequential".
const char* blas_threading();

// The kernel family OpenBLAS chose at load time (openblas_get_corename: "Haswell",
// "SkylakeX", "Cooperlake", ...).
std::string blas_core();
// The OPENBLAS_CORETYPE this process was started with ("" when unset).
std::string blas_coretype_env();

// Empty, or one line saying that OpenBLAS runs narrower kernels than this CPU has: the
// OPENBLAS_CORETYPE environment variable names a family without AVX-512 (as "Haswell") on a
// CPU whose best rule copy is avx512. Newton–Schulz then runs at about half speed (1.6–1.8×
// slower measured on an AMD Zen 5, docs/PERF.md "A fourth CPU"). `core` and `env` default to
// the process's; the arguments are for tests.
std::string blas_core_note();
std::string blas_core_note(const std::string& core, const char* env, bool cpu_has_avx512);

}  // namespace celo2
