// Internal to kernels/: the rule's hot loops for 1-D tensors and matrices, compiled once per
// instruction set (rule_fast.cc is built as avx512, avx2 and base objects, see
// kernels/CMakeLists.txt) and picked at run time (celo2/isa.h). rule_cpu.cc prepares the
// small per-call tables (normalized first-layer weights, per-row and per-column
// contributions of the factored tables) and calls these through `fast::kernels()`.
//
// Only plain structs of pointers cross this boundary: a file compiled for AVX-512 must not
// instantiate inline library code (std::vector, ...) that the linker could pick for the
// portable objects.
#pragma once

#include <cstdint>

#include "celo2/isa.h"

namespace celo2::fast {

inline constexpr int kBlockMax = 32;     // the most elements a copy's block holds
inline constexpr int kElem2d = 18;       // per-element channels of a matrix (compact order)
inline constexpr int kElem1d = 15;       // channels of a 1-D tensor
inline constexpr int kMaxLayers = 3;     // hidden->hidden layers of the fast MLP
inline constexpr int kMaxChannels = 30;  // first-layer inputs of the fast MLP

// The per-element inputs of a slice [lo, hi) of one tensor (rule.h's Slice, flattened).
struct Elems {
  int64_t lo = 0, hi = 0;
  const float* g = nullptr;
  const float* p = nullptr;
  const float* m = nullptr;       // plane-major, plane stride `plane`
  const float* rms = nullptr;
  const float* v_diag = nullptr;  // 1-D only
  int64_t plane = 0;
  float* u = nullptr;             // output (slice-local)
  float bc_mom[3] = {1, 1, 1};
  float bc_rms = 1;
  bool prefetch = true;           // prefetch the streams ahead (celo2/isa.h cpu_prefetch)
};

// A matrix (ndim == 2) of `cols` columns: the factored table indexed by the column j
// ("vary") and the one indexed by the matrix row a ("fix"), structure-of-arrays as
// FacTables::rows_soa / cols_soa: soa[(field * 3 + k) * n + idx], field 2 = scale (R or C),
// 3 = scale_hat. col_varies: the column table varies along a row (d0 == 1).
struct Matrix {
  int64_t cols = 0;
  bool col_varies = true;
  const float* vary_soa = nullptr;
  int64_t vary_n = 0;
  const float* fix_soa = nullptr;
  int64_t fix_n = 0;
};

// The MLP with hidden width 8 and relu. Layer 0 reads `channels` features per element
// (compact order for 1-D/2-D; spec order for the generic path) with weights w0[e * 8 + o]
// already multiplied by the input normalization. Its bias is row_bias[(a - row0) * 8 + o]
// (row_bias_stride 8) or a constant (stride 0), plus col_bias[o * col_stride + j] when set
// (col_stride >= cols + kBlockMax; the padding is read by partial blocks, never used).
struct Mlp {
  int channels = 0;
  const float* w0 = nullptr;
  const float* row_bias = nullptr;
  int64_t row_bias_stride = 0, row0 = 0;
  const float* col_bias = nullptr;
  int64_t col_stride = 0;
  int hidden_layers = 0;                  // 8 -> 8 layers after layer 0
  const float* hw[kMaxLayers] = {};       // 8 x 8, w[c * 8 + o]
  const float* hb[kMaxLayers] = {};
  const float* ow = nullptr;              // 8 x out
  const float* ob = nullptr;
  int out = 3;
  bool use_exp = false;                   // u = dir * exp(mag * exp_mult)
  float exp_mult = 0;
  bool want_mag = false;                  // add sum(mag) into *mag_sum
  // When set (mlp_2d, mlp_1d): add Σ u² (double) of the u written, as phase_output_sumsq
  // would from memory afterwards (a slice of one normalization group).
  double* out_sumsq = nullptr;
};

// Phase 1 of a 1-D slice or of one matrix row segment (rule.h phase_accumulate with
// local_sumsq): the new accumulators in place, and the squares of the element-local input
// channels from the new state while it is in registers. Pointers at the first element.
struct Accum {
  const float* g = nullptr;
  const float* p = nullptr;
  float* m = nullptr;       // plane-major, plane stride `plane`
  float* rms = nullptr;
  float* v_diag = nullptr;  // 1-D only
  int64_t plane = 0;
  float beta_mom[3] = {}, beta_rms = 0, beta_fac[3] = {};
  float bc_mom[3] = {1, 1, 1};
  float bc_rms = 1;
  bool prefetch = true;     // as Elems::prefetch
};
inline constexpr int kLocal2d = 12;  // a matrix's element-local channels: spec 0-10 and 14

struct Kernels {
  const char* name;
  // Phase 1 of n elements of a 1-D tensor: sumsq[c] += Σ f_c² for its 15 channels.
  void (*accumulate_1d)(const Accum&, int64_t n, double* sumsq);
  // Phase 1 of a matrix row segment of n elements: col_q[j] += q_j (q = g² + 1e-30, double),
  // sumsq[e] += Σ f² of the kLocal2d element-local channels; returns Σ q.
  double (*accumulate_row)(const Accum&, int64_t n, double* col_q, double* sumsq);
  // Sum of squares (double) of the per-element channels of a matrix slice / 1-D slice,
  // added into sumsq[e] (compact order: channels 0-14 then 27-29 for a matrix).
  // With table_only, only the six table-dependent channels (11-13, 27-29) of a matrix.
  void (*sumsq_2d)(const Elems&, const Matrix&, bool table_only, double* sumsq);
  void (*sumsq_1d)(const Elems&, double* sumsq);
  // Features, MLP and u for a matrix slice / a 1-D slice.
  void (*mlp_2d)(const Elems&, const Matrix&, const Mlp&, double* mag_sum);
  void (*mlp_1d)(const Elems&, const Mlp&, double* mag_sum);
  // The MLP alone on `cnt` elements whose features are in f[c * 16 + j] (rule_cpu.cc's
  // blocks of 16, cnt <= 16).
  void (*mlp_block)(const Mlp&, const float* f, int cnt, float* u, double* mag_sum);
};

#define CELO2_DECLARE_ISA(ns) \
  namespace ns {              \
  extern const Kernels table; \
  }
CELO2_DECLARE_ISA(isa_base)
#if defined(CELO2_HAVE_ISA_AVX2)
CELO2_DECLARE_ISA(isa_avx2)
#endif
#if defined(CELO2_HAVE_ISA_AVX512)
CELO2_DECLARE_ISA(isa_avx512)
#endif
#undef CELO2_DECLARE_ISA

// The table of the instruction set in effect (celo2::cpu_isa()).
const Kernels& kernels();

}  // namespace celo2::fast
