// What the CUDA kernels of the Celo2 rule see: plain-old-data descriptors of the tensors of
// a RuleSet and the per-element work, as __host__ __device__ functions. The arithmetic is
// celo2/elementwise.h's (shared with the CPU fast path); this file only adds the indexing
// (where an element's state, row/col statistics and normalization group live). Being
// __host__ __device__ and free of CUDA headers, they also run in plain host loops:
// tests/unit/rule_layout_test.cc emulates a RuleSet step with them on the tables of
// rule_layout.h and checks it against celo2_update() and celo2_reference().
//
// Layout: the tensors of a set are back to back in flat float buffers (g, p, u); each
// tensor's state planes are decay-major (m[m_off + k*numel + i]) like RuleState.
#pragma once

#include <cstdint>

#include "celo2/elementwise.h"
#include "celo2/rule.h"

namespace celo2::cuda {

inline constexpr int kMaxHiddenGpu = 64;  // the MLP kernels are instantiated for 8/16/32/64

struct TensorDesc {
  int64_t numel = 0;
  int32_t ndim = 0, factored = 0, d0 = -1, d1 = -1;
  int64_t shape[kMaxDims] = {};
  int64_t row_step[kMaxDims] = {}, col_step[kMaxDims] = {};
  int64_t row_count = 0, col_count = 0, rest_count = 0;
  int64_t rest_div = 1, rest_mod = 1, rest_len = 1;
  int64_t norm_size = 1, norm_groups = 1;
  // Offsets (elements) into the set's buffers.
  int64_t x_off = 0;                  // g, p, u
  int64_t m_off = 0, r_off = 0;       // m (kMom planes), rms (kRms planes)
  int64_t vd_off = 0;                 // v_diag (kFac planes), unfactored only
  int64_t vrow_off = 0, vcol_off = 0; // kFac * row_count, kFac * col_count
  int64_t rowsum_off = 0, colsum_off = 0;  // doubles: row_count, col_count
  int64_t rest_off = 0;               // doubles: kFac * rest_count
  int64_t rtab_off = 0, ctab_off = 0; // FacEntry tables: row_count, col_count
  int64_t sumsq_off = 0;              // doubles: norm_groups * channels
  int64_t osumsq_off = 0;             // doubles: norm_groups
  bool ns = false;                    // Newton–Schulz applies (orthogonalize and factored)
};

// Every set buffer, as device (or, in the layout test, host) pointers.
struct SetBuffers {
  const float* g = nullptr;
  const float* p = nullptr;
  float* u = nullptr;
  float* m = nullptr;
  float* rms = nullptr;
  float* vdiag = nullptr;
  float* vrow = nullptr;
  float* vcol = nullptr;
  double* rowsum = nullptr;
  double* colsum = nullptr;
  double* rest = nullptr;
  ew::FacEntry* rtab = nullptr;
  ew::FacEntry* ctab = nullptr;
  double* sumsq = nullptr;
  double* osumsq = nullptr;
  float* factor = nullptr;  // per tensor: magnitude_factor()
};

// A piece of one tensor inside one normalization group: the unit of work of a thread block.
struct Chunk {
  int32_t tensor;
  int64_t lo, hi;   // flat element range inside the tensor
  int64_t group;    // normalization group (lo / norm_size)
};

// Largest i with key(items[i]) <= x (keys ascending, key(items[0]) == 0): which job, run or
// span a flat work item belongs to.
template <class T, class F>
CELO2_HD int64_t find_span(const T* items, int64_t n, int64_t x, F key) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (key(items[mid]) <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Row index (without axis d0) and col index (without axis d1) of element i.
CELO2_HD void row_col_of(const TensorDesc& t, int64_t i, int64_t* row, int64_t* col) {
  if (t.ndim == 2) {
    const int64_t C = t.shape[1], a = i / C, c = i - a * C;
    *row = t.d0 == 1 ? a : c;
    *col = t.d0 == 1 ? c : a;
    return;
  }
  int64_t r = 0, cc = 0;
  for (int ax = t.ndim - 1; ax >= 0; --ax) {
    const int64_t x = i % t.shape[ax];
    i /= t.shape[ax];
    r += x * t.row_step[ax];
    cc += x * t.col_step[ax];
  }
  *row = r;
  *col = cc;
}

// Phase 1 for element i of tensor t: clip g, update m, rms (and v_diag).
CELO2_HD void accumulate_element(const TensorDesc& t, const StepConstants& sc,
                                 const SetBuffers& b, int64_t i) {
  const int64_t n = t.numel;
  const float g = ew::clip_grad(b.g[t.x_off + i]);
  float* m = b.m + t.m_off + i;
  for (int k = 0; k < kMom; ++k) m[k * n] = ew::ema(sc.mom[k], m[k * n], g);
  float* r = b.rms + t.r_off + i;
  r[0] = ew::ema(sc.rms[0], r[0], g * g);
  if (!t.factored) {
    const float q = g * g + ew::kQEps;
    float* vd = b.vdiag + t.vd_off + i;
    for (int k = 0; k < kFac; ++k) vd[k * n] = ew::ema(sc.fac[k], vd[k * n], q);
  }
}

// q = clip(g)^2 + 1e-30 as the double the CPU path sums.
CELO2_HD double q_of(float graw) {
  const float g = ew::clip_grad(graw);
  return static_cast<double>(g * g + ew::kQEps);
}

// All feature channels of element i (f: kChannels floats, stride 1). Returns the count.
CELO2_HD int features_of(const TensorDesc& t, const StepConstants& sc, const SetBuffers& b,
                         int64_t i, float* f) {
  ew::ElementInputs e;
  e.g = ew::clip_grad(b.g[t.x_off + i]);
  e.p = b.p[t.x_off + i];
  for (int k = 0; k < kMom; ++k) e.m_hat[k] = b.m[t.m_off + k * t.numel + i] * sc.bc_mom[k];
  e.r_hat = b.rms[t.r_off + i] * sc.bc_rms[0];
  if (t.factored) {
    int64_t row, col;
    row_col_of(t, i, &row, &col);
    ew::features_factored(e, b.rtab[t.rtab_off + row], b.ctab[t.ctab_off + col], f, 1);
    return kChannels;
  }
  float vd[kFac];
  for (int k = 0; k < kFac; ++k) vd[k] = b.vdiag[t.vd_off + k * t.numel + i];
  ew::features_diag(e, vd, f, 1);
  return kChannels1d;
}

// Phase 2a: fold the summed statistic into v_row (entry < row_count) or v_col (the rest).
CELO2_HD void fold_factored_entry(const TensorDesc& t, const StepConstants& sc,
                                  const SetBuffers& b, int64_t entry) {
  const bool is_row = entry < t.row_count;
  const int64_t x = is_row ? entry : entry - t.row_count;
  const int64_t count = is_row ? t.row_count : t.col_count;
  const double sum = is_row ? b.rowsum[t.rowsum_off + x] : b.colsum[t.colsum_off + x];
  const double inv = 1.0 / static_cast<double>(t.shape[is_row ? t.d0 : t.d1]);
  float* v = (is_row ? b.vrow + t.vrow_off : b.vcol + t.vcol_off) + x;
  for (int k = 0; k < kFac; ++k)
    v[k * count] = ew::ema(sc.fac[k], v[k * count], static_cast<float>(sum * inv));
}

// Phase 2b: rest[k][x] = mean of v_row_k over axis d1' (rows r with rest index x), summed in
// row order like the CPU path. item = k * rest_count + x.
CELO2_HD void rest_mean(const TensorDesc& t, const SetBuffers& b, int64_t item) {
  const int k = static_cast<int>(item / t.rest_count);
  const int64_t x = item - k * t.rest_count;
  // Rows with rest index x: r = outer * rest_div + j * rest_mod + inner, x = outer * rest_mod + inner.
  const int64_t outer = x / t.rest_mod, inner = x - outer * t.rest_mod;
  const float* vr = b.vrow + t.vrow_off + k * t.row_count;
  double s = 0.0;
  for (int64_t j = 0; j < t.rest_len; ++j) s += vr[outer * t.rest_div + j * t.rest_mod + inner];
  b.rest[t.rest_off + item] = s * (1.0 / static_cast<double>(t.shape[t.d1]));
}

// Phase 2c: the feature-table entry of row (entry < row_count) or column entry.
CELO2_HD void build_table_entry(const TensorDesc& t, const StepConstants& sc,
                                const SetBuffers& b, int64_t entry) {
  const bool is_row = entry < t.row_count;
  const int64_t x = is_row ? entry : entry - t.row_count;
  ew::FacEntry e;
  if (is_row) {
    const int64_t rx = (x / t.rest_div) * t.rest_mod + x % t.rest_mod;
    for (int k = 0; k < kFac; ++k) {
      const float v = b.vrow[t.vrow_off + k * t.row_count + x];
      const float bc = sc.bc_fac[k];
      const double rest = b.rest[t.rest_off + k * t.rest_count + rx];
      const double rest_hat = rest * bc;
      const float vh = v * bc;
      e.vhat[k] = vh;
      e.inv_sqrt[k] = 1.0f / sqrtf(vh + ew::kRhoEps);
      e.scale[k] = ew::safe_rsqrt(static_cast<float>(v / (rest + 1e-9)));
      e.scale_hat[k] = ew::safe_rsqrt(static_cast<float>(vh / (rest_hat + 1e-9)));
    }
    b.rtab[t.rtab_off + x] = e;
  } else {
    for (int k = 0; k < kFac; ++k) {
      const float v = b.vcol[t.vcol_off + k * t.col_count + x];
      const float vh = v * sc.bc_fac[k];
      e.vhat[k] = vh;
      e.inv_sqrt[k] = 1.0f / sqrtf(vh + ew::kRhoEps);
      e.scale[k] = ew::safe_rsqrt(v);
      e.scale_hat[k] = ew::safe_rsqrt(vh);
    }
    b.ctab[t.ctab_off + x] = e;
  }
}

// 1/sqrt(1e-9 + mean of squares) of one channel of one normalization group, as the CPU
// path rounds it (double, then float).
CELO2_HD float input_norm_scale(double sumsq, int64_t norm_size) {
  return static_cast<float>(1.0 / sqrt(1e-9 + sumsq / static_cast<double>(norm_size)));
}

// The final scale of a normalization group (phase_finish): rmsmult / RMS(u).
CELO2_HD float output_scale(const RuleConfig& cfg, double sumsq, int64_t norm_size) {
  if (!cfg.normalize_output) return cfg.rmsmult;
  return static_cast<float>(cfg.rmsmult / sqrt(1e-9 + sumsq / static_cast<double>(norm_size)));
}

// Phase 5 for element i: u = u * (factor unless Newton–Schulz already applied it) * scale,
// then the optional preconditioning.
CELO2_HD void finish_element(const RuleConfig& cfg, const TensorDesc& t, const StepConstants& sc,
                             const SetBuffers& b, int64_t i, float factor, float scale) {
  float u = b.u[t.x_off + i];
  if (!t.ns && factor != 1.0f) u *= factor;
  if (cfg.precondition_output)
    u = u * scale / sqrtf(b.rms[t.r_off + i] * sc.bc_rms[kRms - 1] + ew::kPrecondEps);
  else
    u *= scale;
  b.u[t.x_off + i] = u;
}

// The MLP weights padded to width H (zero rows/columns change nothing: act(0) = 0 and zero
// weights feed nothing forward), packed for shared memory:
//   w0[kChannels][H], b0[H], then (hidden_layers - 1) x {w[H][H], b[H]}, then wout[H][2],
//   bout[2] (direction and magnitude; the unused third output is dropped).
CELO2_HD int64_t packed_theta_floats(int H, int hidden_layers) {
  return static_cast<int64_t>(kChannels) * H + H + (hidden_layers - 1) * (H * H + H) + 2 * H + 2;
}

}  // namespace celo2::cuda
