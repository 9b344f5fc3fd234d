// The fast CPU path of the Celo2 rule: phase kernels on slices, and the single-process
// driver celo2_update() that runs them over a whole tensor with OpenMP.
//
// Per element the 30 feature channels are never stored. Matrices and 1-D tensors (nearly
// every tensor of a model) go through the per-instruction-set loops of rule_fast.cc:
// phase 1 squares the channels that need only the element's new state as it updates that
// state (local_sumsq_fits: 1-D tensors and matrices of 32+ columns), phase 3 the rest (a
// matrix's table-dependent channels), phase 4 builds the features again and runs the MLP,
// with the input normalization folded into the first layer's weights and, for a matrix, the
// twelve table channels (constant along a row or a column) folded into per-row and per-column
// first-layer biases prepared here. Tensors with n > 2 and MLP shapes other than Celo2's
// (hidden 8, relu) use block_features below, blocks of kBlock elements laid out
// channel-major, and plain loops for the MLP.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include <omp.h>

#include "celo2/elementwise.h"
#include "celo2/lane_sum.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"
#include "rule_fast.h"

namespace celo2 {
namespace {

constexpr int kBlock = 16;

// Walks flat indices in order, keeping the row (without d0) and col (without d1) indices.
struct Walker {
  const Geometry& g;
  int64_t idx[kMaxDims] = {};
  int64_t row = 0, col = 0;
  Walker(const Geometry& geo, int64_t i) : g(geo) {
    for (int ax = g.ndim - 1; ax >= 0; --ax) {
      idx[ax] = i % g.shape[ax];
      i /= g.shape[ax];
      row += idx[ax] * g.row_step[ax];
      col += idx[ax] * g.col_step[ax];
    }
  }
  void next() {
    for (int ax = g.ndim - 1; ax >= 0; --ax) {
      ++idx[ax];
      row += g.row_step[ax];
      col += g.col_step[ax];
      if (idx[ax] < g.shape[ax]) return;
      idx[ax] = 0;
      row -= g.row_step[ax] * g.shape[ax];
      col -= g.col_step[ax] * g.shape[ax];
    }
  }
};

inline ew::ElementInputs load_inputs(const StepConstants& sc, const Slice& s, int64_t li) {
  ew::ElementInputs e;
  e.g = ew::clip_grad(s.g[li]);
  e.p = s.p[li];
  for (int k = 0; k < kMom; ++k) e.m_hat[k] = s.m[k * s.plane + li] * sc.bc_mom[k];
  e.r_hat = s.rms[li] * sc.bc_rms[0];
  return e;
}

// Features of elements [i0, i0 + cnt) of the slice into f[c * kBlock + j], one element at a
// time through ew:: (the general path: n > 2 tensors, and MLP shapes the fast loops of
// rule_fast.cc do not serve). The Walker follows the factored tensor's row/col indices.
inline void block_features(const Geometry& geo, const StepConstants& sc, const Slice& s,
                           const FacTables& t, int64_t i0, int cnt, Walker* w, float* f) {
  for (int j = 0; j < cnt; ++j) {
    const ew::ElementInputs e = load_inputs(sc, s, i0 - s.lo + j);
    if (geo.factored) {
      ew::features_factored(e, t.rows[w->row], t.cols[w->col], f + j, kBlock);
      w->next();
    } else {
      const int64_t li = i0 - s.lo + j;
      const float vd[kFac] = {s.v_diag[li], s.v_diag[s.plane + li], s.v_diag[2 * s.plane + li]};
      ew::features_diag(e, vd, f + j, kBlock);
    }
  }
  // Unused lanes of a partial block are zero so the MLP can run full width.
  if (cnt < kBlock)
    for (int c = 0; c < geo.channels(); ++c)
      for (int j = cnt; j < kBlock; ++j) f[c * kBlock + j] = 0.0f;
}

// Iterate the slice in blocks that never cross a normalization-group boundary.
template <class F>
void for_blocks(const Geometry& geo, const Slice& s, F fn) {
  const int64_t G = geo.norm_size;
  int64_t i = s.lo;
  while (i < s.hi) {
    const int64_t grp = i / G;
    const int64_t end = std::min(s.hi, (grp + 1) * G);
    while (i < end) {
      const int cnt = static_cast<int>(std::min<int64_t>(kBlock, end - i));
      fn(grp, i, cnt);
      i += cnt;
    }
  }
}

// ---- Adapters to the per-instruction-set hot loops (rule_fast.h) ----

fast::Elems elems_of(const StepConstants& sc, const Slice& s) {
  fast::Elems e;
  e.lo = s.lo;
  e.hi = s.hi;
  e.g = s.g;
  e.p = s.p;
  e.m = s.m;
  e.rms = s.rms;
  e.v_diag = s.v_diag;
  e.plane = s.plane;
  e.u = s.u;
  for (int k = 0; k < kMom; ++k) e.bc_mom[k] = sc.bc_mom[k];
  e.bc_rms = sc.bc_rms[0];
  e.prefetch = cpu_prefetch();
  return e;
}

// A matrix's factored tables: the one indexed by the column j varies along a row.
struct MatrixTables {
  fast::Matrix mx;
  const std::vector<ew::FacEntry>* vary;
  const std::vector<ew::FacEntry>* fix;
  int vary_vhat, vary_inv, fix_vhat, fix_inv;  // spec channels of their groups 9-12
};

MatrixTables matrix_of(const Geometry& geo, const FacTables& t) {
  MatrixTables m;
  const bool cv = geo.d0 == 1;  // d0 == 1: row index = the matrix row, col index = j
  m.mx.cols = geo.shape[1];
  m.mx.col_varies = cv;
  m.vary = cv ? &t.cols : &t.rows;
  m.fix = cv ? &t.rows : &t.cols;
  m.mx.vary_soa = (cv ? t.cols_soa : t.rows_soa).data();
  m.mx.vary_n = static_cast<int64_t>(m.vary->size());
  m.mx.fix_soa = (cv ? t.rows_soa : t.cols_soa).data();
  m.mx.fix_n = static_cast<int64_t>(m.fix->size());
  m.vary_vhat = cv ? 18 : 15;
  m.vary_inv = m.vary_vhat + 6;
  m.fix_vhat = cv ? 15 : 18;
  m.fix_inv = m.fix_vhat + 6;
  return m;
}

// Spec channel of each compact per-element channel of a matrix.
constexpr int kCompact2d[fast::kElem2d] = {0, 1, 2,  3,  4,  5,  6,  7,  8,
                                           9, 10, 11, 12, 13, 14, 27, 28, 29};

// Σ of the squares of the twelve table channels over a matrix slice: a row's fixed entry
// times the segment length; the varying table summed over the segment (once per call for
// whole rows).
void table_sumsq_2d(const Geometry& geo, const Slice& s, const MatrixTables& m, double* out) {
  const int64_t C = geo.shape[1];
  double full[2 * kFac];
  bool have_full = false;
  auto add_range = [&](int64_t j0, int64_t j1, double* acc) {
    for (int k = 0; k < kFac; ++k) {
      double a = 0.0, b = 0.0;
      for (int64_t j = j0; j < j1; ++j) {
        const double v = (*m.vary)[j].vhat[k], w = (*m.vary)[j].inv_sqrt[k];
        a += v * v;
        b += w * w;
      }
      acc[k] += a;
      acc[kFac + k] += b;
    }
  };
  double vary_acc[2 * kFac] = {};
  int64_t i = s.lo;
  while (i < s.hi) {
    const int64_t a = i / C, j0 = i - a * C, j1 = std::min(C, j0 + (s.hi - i)), n = j1 - j0;
    const ew::FacEntry& f = (*m.fix)[a];
    for (int k = 0; k < kFac; ++k) {
      out[m.fix_vhat + k] += static_cast<double>(n) * (static_cast<double>(f.vhat[k]) * f.vhat[k]);
      out[m.fix_inv + k] +=
          static_cast<double>(n) * (static_cast<double>(f.inv_sqrt[k]) * f.inv_sqrt[k]);
    }
    if (j0 == 0 && j1 == C) {
      if (!have_full) {
        std::fill(full, full + 2 * kFac, 0.0);
        add_range(0, C, full);
        have_full = true;
      }
      for (int x = 0; x < 2 * kFac; ++x) vary_acc[x] += full[x];
    } else {
      add_range(j0, j1, vary_acc);
    }
    i += n;
  }
  for (int k = 0; k < kFac; ++k) {
    out[m.vary_vhat + k] += vary_acc[k];
    out[m.vary_inv + k] += vary_acc[kFac + k];
  }
}

// The fast MLP serves hidden width 8 with relu and at least one hidden layer (Celo2's shape).
bool fast_mlp_fits(const RuleConfig& cfg, const Theta& theta) {
  const int L = static_cast<int>(theta.layers.size());
  return theta.hidden() == 8 && cfg.mlp_activation == Activation::kRelu && L >= 2 &&
         L - 2 <= fast::kMaxLayers && theta.layers[L - 1].out >= 2;
}

// The layers after the first, and the output handling, of the fast MLP.
fast::Mlp fast_mlp_of(const RuleConfig& cfg, const Theta& theta) {
  fast::Mlp m;
  const int L = static_cast<int>(theta.layers.size());
  m.hidden_layers = L - 2;
  for (int l = 1; l + 1 < L; ++l) {
    m.hw[l - 1] = theta.layers[l].w.data();
    m.hb[l - 1] = theta.layers[l].b.data();
  }
  m.ow = theta.layers[L - 1].w.data();
  m.ob = theta.layers[L - 1].b.data();
  m.out = theta.layers[L - 1].out;
  m.use_exp = cfg.exp_mult != 0.0f && !cfg.aggregate_mag;
  m.exp_mult = cfg.exp_mult;
  m.want_mag = cfg.aggregate_mag;
  return m;
}

// Per-call scratch of phase_mlp (no allocation per call once warm).
struct MlpScratch {
  std::vector<float> w0, row_bias, col_bias;
};
MlpScratch& mlp_scratch() {
  thread_local MlpScratch s;
  return s;
}

}  // namespace

namespace {

// Spec channels of a matrix's element-local channels (fast::accumulate_row's order) and of
// its six table-dependent per-element ones (fast sumsq_2d with table_only).
constexpr int kLocal2dSpec[fast::kLocal2d] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14};
constexpr int kTable2dSpec[6] = {11, 12, 13, 27, 28, 29};

fast::Accum accum_of(const StepConstants& sc, const Slice& s) {
  fast::Accum a;
  a.g = s.g;
  a.p = s.p;
  a.m = s.m;
  a.rms = s.rms;
  a.v_diag = s.v_diag;
  a.plane = s.plane;
  for (int k = 0; k < kMom; ++k) {
    a.beta_mom[k] = sc.mom[k];
    a.bc_mom[k] = sc.bc_mom[k];
  }
  for (int k = 0; k < kFac; ++k) a.beta_fac[k] = sc.fac[k];
  a.beta_rms = sc.rms[0];
  a.bc_rms = sc.bc_rms[0];
  a.prefetch = cpu_prefetch();
  return a;
}

// Elements from offset `off` of the slice, as an Accum of their own.
fast::Accum accum_at(fast::Accum a, int64_t off) {
  a.g += off;
  a.p += off;
  a.m += off;
  a.rms += off;
  if (a.v_diag) a.v_diag += off;
  return a;
}

void p2_of(const RuleConfig& cfg, const Slice& s, double* p2_sum) {
  if (!cfg.param_scale_mult || !p2_sum) return;
  // lane_sum's lanes on this thread (the callers already run slices on the threads).
  const float* p = s.p;
  auto sq = [p](int64_t i) { return static_cast<double>(p[i]) * p[i]; };
  *p2_sum += lane_sum_range(0, s.hi - s.lo, sq);
}

}  // namespace

void phase_accumulate(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                      const Slice& s, double* row_sum, double* col_sum, double* p2_sum,
                      double* local_sumsq) {
  const int64_t n = s.hi - s.lo;
  if (local_sumsq && local_sumsq_fits(cfg, geo)) {
    const fast::Accum acc = accum_of(sc, s);
    if (geo.ndim == 1) {
      fast::kernels().accumulate_1d(acc, n, local_sumsq);
    } else {
      // Row segments; A indexed by the row a, B by the column j (as below).
      const int64_t C = geo.shape[1];
      double* A = geo.d0 == 1 ? row_sum : col_sum;
      double* B = geo.d0 == 1 ? col_sum : row_sum;
      double part[fast::kLocal2d] = {};
      int64_t i = s.lo;
      while (i < s.hi) {
        const int64_t a = i / C, j0 = i - a * C, j1 = std::min(C, j0 + (s.hi - i));
        A[a] += fast::kernels().accumulate_row(accum_at(acc, i - s.lo), j1 - j0, B + j0, part);
        i += j1 - j0;
      }
      for (int e = 0; e < fast::kLocal2d; ++e) local_sumsq[kLocal2dSpec[e]] += part[e];
    }
    p2_of(cfg, s, p2_sum);
    return;
  }
  const float bm0 = sc.mom[0], bm1 = sc.mom[1], bm2 = sc.mom[2], br = sc.rms[0];
  const int64_t P = s.plane;
  float* __restrict m = s.m;
  float* __restrict r = s.rms;
  const float* __restrict gp = s.g;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = ew::clip_grad(gp[i]);
    m[i] = ew::ema(bm0, m[i], g);
    m[P + i] = ew::ema(bm1, m[P + i], g);
    m[2 * P + i] = ew::ema(bm2, m[2 * P + i], g);
    r[i] = ew::ema(br, r[i], g * g);
  }
  if (!geo.factored) {
    float* __restrict vd = s.v_diag;
    const float bf0 = sc.fac[0], bf1 = sc.fac[1], bf2 = sc.fac[2];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g = ew::clip_grad(gp[i]);
      const float q = g * g + ew::kQEps;
      vd[i] = ew::ema(bf0, vd[i], q);
      vd[P + i] = ew::ema(bf1, vd[P + i], q);
      vd[2 * P + i] = ew::ema(bf2, vd[2 * P + i], q);
    }
  } else if (geo.ndim == 2) {
    // Matrix rows are contiguous: one sum per row segment (A) and one per column (B).
    const int64_t C = geo.shape[1];
    double* A = geo.d0 == 1 ? row_sum : col_sum;  // indexed by the row a
    double* B = geo.d0 == 1 ? col_sum : row_sum;  // indexed by the column j
    int64_t i = s.lo;
    while (i < s.hi) {
      const int64_t a = i / C, j0 = i - a * C, j1 = std::min(C, j0 + (s.hi - i));
      const float* ga = gp + (i - s.lo) - j0;
      // The row's sum in 8 fixed lanes (vectorized; double sums of these float squares round
      // far below float resolution, so the lane order changes no float result), then the tail.
      constexpr int kLanes = 8;
      double lane[kLanes] = {};
      int64_t j = j0;
      for (; j + kLanes <= j1; j += kLanes) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const float g = ew::clip_grad(ga[j + l]);
          const double q = static_cast<double>(g * g + ew::kQEps);
          lane[l] += q;
          B[j + l] += q;
        }
      }
      double seg = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
      for (; j < j1; ++j) {
        const float g = ew::clip_grad(ga[j]);
        const double q = static_cast<double>(g * g + ew::kQEps);
        seg += q;
        B[j] += q;
      }
      A[a] += seg;
      i += j1 - j0;
    }
  } else {
    Walker w(geo, s.lo);
    for (int64_t i = 0; i < n; ++i, w.next()) {
      const float g = ew::clip_grad(gp[i]);
      const double q = static_cast<double>(g * g + ew::kQEps);
      row_sum[w.row] += q;
      col_sum[w.col] += q;
    }
  }
  p2_of(cfg, s, p2_sum);
}

void phase_update_factored(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                           const double* row_sum, const double* col_sum, float* v_row,
                           float* v_col, FacTables& t) {
  if (!geo.factored) return;
  const int64_t R = geo.row_count, Cn = geo.col_count;
  const double inv_d0 = 1.0 / static_cast<double>(geo.shape[geo.d0]);
  const double inv_d1 = 1.0 / static_cast<double>(geo.shape[geo.d1]);
  t.rows.resize(R);
  t.cols.resize(Cn);
  // Per-thread scratch, reused across calls (the engine calls this per tensor per step).
  thread_local std::vector<double> rest, rest_hat;
  rest.resize(geo.rest_count);
  rest_hat.resize(geo.rest_count);
  for (int k = 0; k < kFac; ++k) {
    const float b = sc.fac[k], bc = sc.bc_fac[k];
    float* vr = v_row + k * R;
    float* vc = v_col + k * Cn;
    for (int64_t r = 0; r < R; ++r) vr[r] = ew::ema(b, vr[r], static_cast<float>(row_sum[r] * inv_d0));
    for (int64_t c = 0; c < Cn; ++c) vc[c] = ew::ema(b, vc[c], static_cast<float>(col_sum[c] * inv_d1));
    std::fill(rest.begin(), rest.end(), 0.0);
    for (int64_t r = 0; r < R; ++r) rest[geo.rest_index_of_row(r)] += vr[r];
    for (int64_t x = 0; x < geo.rest_count; ++x) {
      rest[x] *= inv_d1;
      rest_hat[x] = rest[x] * bc;
    }
    for (int64_t r = 0; r < R; ++r) {
      ew::FacEntry& e = t.rows[r];
      const int64_t x = geo.rest_index_of_row(r);
      const float vh = vr[r] * bc;
      e.vhat[k] = vh;
      e.inv_sqrt[k] = 1.0f / std::sqrt(vh + ew::kRhoEps);
      e.scale[k] = ew::safe_rsqrt(static_cast<float>(vr[r] / (rest[x] + 1e-9)));
      e.scale_hat[k] = ew::safe_rsqrt(static_cast<float>(vh / (rest_hat[x] + 1e-9)));
    }
    for (int64_t c = 0; c < Cn; ++c) {
      ew::FacEntry& e = t.cols[c];
      const float vh = vc[c] * bc;
      e.vhat[k] = vh;
      e.inv_sqrt[k] = 1.0f / std::sqrt(vh + ew::kRhoEps);
      e.scale[k] = ew::safe_rsqrt(vc[c]);
      e.scale_hat[k] = ew::safe_rsqrt(vh);
    }
  }
  auto soa = [](const std::vector<ew::FacEntry>& t, std::vector<float>& out) {
    const size_t n = t.size();
    out.resize(4 * kFac * n);
    for (size_t i = 0; i < n; ++i)
      for (int k = 0; k < kFac; ++k) {
        out[(0 * kFac + k) * n + i] = t[i].vhat[k];
        out[(1 * kFac + k) * n + i] = t[i].inv_sqrt[k];
        out[(2 * kFac + k) * n + i] = t[i].scale[k];
        out[(3 * kFac + k) * n + i] = t[i].scale_hat[k];
      }
  };
  soa(t.rows, t.rows_soa);
  soa(t.cols, t.cols_soa);
  (void)cfg;
}

void phase_feature_sumsq(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                         const Slice& s, const FacTables& tables, double* sumsq,
                         int64_t group_base, bool local_done) {
  if (!cfg.normalize_input || s.hi <= s.lo) return;
  if (local_done && !local_sumsq_fits(cfg, geo))
    throw std::logic_error("phase_feature_sumsq: local_done for a tensor phase 1 does not square");
  const int C = geo.channels();
  // Squares of floats are exact in double and double sums of them round far below float
  // resolution, so the per-group sums (rounded to float where used) do not depend on how
  // the tensor is cut into slices: the sharded engine matches the single-process result.
  if (geo.ndim == 2) {  // one normalization group
    const MatrixTables m = matrix_of(geo, tables);
    double part[fast::kElem2d] = {};
    fast::kernels().sumsq_2d(elems_of(sc, s), m.mx, local_done, part);
    double* out = sumsq + (0 - group_base) * C;
    if (local_done)
      for (int e = 0; e < 6; ++e) out[kTable2dSpec[e]] += part[e];
    else
      for (int e = 0; e < fast::kElem2d; ++e) out[kCompact2d[e]] += part[e];
    table_sumsq_2d(geo, s, m, out);
    return;
  }
  if (!geo.factored) {  // one normalization group, 15 channels
    if (local_done) return;  // phase 1 added them all
    double part[fast::kElem1d] = {};
    fast::kernels().sumsq_1d(elems_of(sc, s), part);
    double* out = sumsq + (0 - group_base) * C;
    for (int e = 0; e < fast::kElem1d; ++e) out[e] += part[e];
    return;
  }
  // n > 2: many normalization groups (the last two axes); features through the Walker.
  alignas(64) float f[kChannels * kBlock];
  Walker w(geo, s.lo);
  int64_t cur = -1;
  alignas(64) double acc[kChannels * kBlock];
  auto flush = [&]() {
    if (cur < 0) return;
    for (int c = 0; c < C; ++c) {
      double t = 0.0;
      for (int j = 0; j < kBlock; ++j) t += acc[c * kBlock + j];
      sumsq[(cur - group_base) * C + c] += t;
    }
  };
  for_blocks(geo, s, [&](int64_t grp, int64_t i0, int cnt) {
    if (grp != cur) {
      flush();
      cur = grp;
      std::fill(acc, acc + C * kBlock, 0.0);
    }
    block_features(geo, sc, s, tables, i0, cnt, &w, f);
    for (int c = 0; c < C; ++c)
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) {
        const double x = f[c * kBlock + j];
        acc[c * kBlock + j] += x * x;
      }
  });
  flush();
}

namespace {

// 1 / RMS of each input channel of normalization group grp.
void input_scales(const RuleConfig& cfg, const Geometry& geo, const double* sumsq, int64_t grp,
                  float* inv) {
  const int C = geo.channels();
  for (int c = 0; c < C; ++c)
    inv[c] = cfg.normalize_input
                 ? static_cast<float>(1.0 / std::sqrt(1e-9 + sumsq[grp * C + c] /
                                                           static_cast<double>(geo.norm_size)))
                 : 1.0f;
}

// The fast MLP on a matrix or 1-D slice: the first layer's weights scaled by the input
// normalization; for a matrix, the table channels folded into per-row and per-column biases.
void fast_mlp_slice(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                    const StepConstants& sc, const Slice& s, const FacTables& tables,
                    const double* sumsq, double* mag_acc, double* out_sumsq) {
  constexpr int H = 8;
  const DenseLayer& l0 = theta.layers[0];
  float inv[kChannels];
  input_scales(cfg, geo, sumsq, 0, inv);
  fast::Mlp m = fast_mlp_of(cfg, theta);
  m.out_sumsq = out_sumsq;
  MlpScratch& sc_ = mlp_scratch();
  auto wn = [&](int c, int o) { return l0.w[c * H + o] * inv[c]; };
  if (geo.ndim == 2) {
    const MatrixTables t = matrix_of(geo, tables);
    sc_.w0.resize(fast::kElem2d * H);
    for (int e = 0; e < fast::kElem2d; ++e)
      for (int o = 0; o < H; ++o) sc_.w0[e * H + o] = wn(kCompact2d[e], o);
    const int64_t C = geo.shape[1], a_lo = s.lo / C, a_hi = (s.hi - 1) / C;
    sc_.row_bias.resize((a_hi - a_lo + 1) * H);
    for (int64_t a = a_lo; a <= a_hi; ++a) {
      const ew::FacEntry& f = (*t.fix)[a];
      for (int o = 0; o < H; ++o) {
        float z = l0.b[o];
        for (int k = 0; k < kFac; ++k) z += wn(t.fix_vhat + k, o) * f.vhat[k];
        for (int k = 0; k < kFac; ++k) z += wn(t.fix_inv + k, o) * f.inv_sqrt[k];
        sc_.row_bias[(a - a_lo) * H + o] = z;
      }
    }
    // Columns the slice touches: all of them once it spans a row boundary.
    const int64_t stride = C + fast::kBlockMax;
    sc_.col_bias.assign(H * stride, 0.0f);
    const int64_t j_lo = a_lo == a_hi ? s.lo - a_lo * C : 0;
    const int64_t j_hi = a_lo == a_hi ? s.hi - a_lo * C : C;
    for (int o = 0; o < H; ++o) {
      float wv[kFac], wi[kFac];
      for (int k = 0; k < kFac; ++k) {
        wv[k] = wn(t.vary_vhat + k, o);
        wi[k] = wn(t.vary_inv + k, o);
      }
      float* cb = sc_.col_bias.data() + o * stride;
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const ew::FacEntry& f = (*t.vary)[j];
        float z = 0.0f;
        for (int k = 0; k < kFac; ++k) z += wv[k] * f.vhat[k];
        for (int k = 0; k < kFac; ++k) z += wi[k] * f.inv_sqrt[k];
        cb[j] = z;
      }
    }
    m.channels = fast::kElem2d;
    m.w0 = sc_.w0.data();
    m.row_bias = sc_.row_bias.data();
    m.row_bias_stride = H;
    m.row0 = a_lo;
    m.col_bias = sc_.col_bias.data();
    m.col_stride = stride;
    fast::kernels().mlp_2d(elems_of(sc, s), t.mx, m, mag_acc);
  } else {
    sc_.w0.resize(fast::kElem1d * H);
    for (int c = 0; c < fast::kElem1d; ++c)
      for (int o = 0; o < H; ++o) sc_.w0[c * H + o] = wn(c, o);
    m.channels = fast::kElem1d;
    m.w0 = sc_.w0.data();
    m.row_bias = l0.b.data();
    m.row_bias_stride = 0;
    fast::kernels().mlp_1d(elems_of(sc, s), m, mag_acc);
  }
}

}  // namespace

void phase_mlp(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
               const StepConstants& sc, const Slice& s, const FacTables& tables,
               const double* sumsq, double* mag_sum, double* out_sumsq, int64_t group_base) {
  if (s.hi <= s.lo) return;
  const bool fast_fits = fast_mlp_fits(cfg, theta);
  double mag_acc = 0.0;
  if (fast_fits && (geo.ndim == 2 || !geo.factored)) {
    // One normalization group (0): its Σ u² from the MLP's registers.
    fast_mlp_slice(cfg, theta, geo, sc, s, tables, sumsq, &mag_acc,
                   out_sumsq ? out_sumsq + (0 - group_base) : nullptr);
    if (mag_sum) *mag_sum += mag_acc;
    return;
  }
  // n > 2, or an MLP shape the fast kernels do not serve: features through block_features,
  // the MLP by the fast block kernel when it fits, else by the plain loops below.
  const int C = geo.channels();
  const int H = theta.hidden();
  const int L = static_cast<int>(theta.layers.size());
  const bool relu = cfg.mlp_activation == Activation::kRelu;
  const bool use_exp = cfg.exp_mult != 0.0f && !cfg.aggregate_mag;
  std::vector<float> w0(static_cast<size_t>(C) * H);  // first layer with normalization folded
  std::vector<float> hbuf(static_cast<size_t>(2) * std::max(H, kOutputs) * kBlock);
  alignas(64) float f[kChannels * kBlock];
  float* h = hbuf.data();
  float* h2 = h + std::max(H, kOutputs) * kBlock;
  Walker w(geo, geo.factored ? s.lo : 0);
  int64_t cur = -1;
  const DenseLayer& l0 = theta.layers[0];
  fast::Mlp fm;
  if (fast_fits) {
    fm = fast_mlp_of(cfg, theta);
    fm.channels = C;
    fm.w0 = w0.data();
    fm.row_bias = l0.b.data();
    fm.row_bias_stride = 0;
  }
  for_blocks(geo, s, [&](int64_t grp, int64_t i0, int cnt) {
    if (grp != cur) {
      cur = grp;
      float inv[kChannels];
      input_scales(cfg, geo, sumsq, grp, inv);
      for (int c = 0; c < C; ++c)
        for (int o = 0; o < H; ++o) w0[c * H + o] = l0.w[c * H + o] * inv[c];
    }
    block_features(geo, sc, s, tables, i0, cnt, &w, f);
    float* u = s.u + (i0 - s.lo);
    if (fast_fits) {
      fast::kernels().mlp_block(fm, f, cnt, u, &mag_acc);
      return;
    }
    // Layer 0.
    for (int o = 0; o < H; ++o) {
      float acc[kBlock];
      for (int j = 0; j < kBlock; ++j) acc[j] = l0.b[o];
      for (int c = 0; c < C; ++c) {
        const float wc = w0[c * H + o];
#pragma omp simd
        for (int j = 0; j < kBlock; ++j) acc[j] += wc * f[c * kBlock + j];
      }
      for (int j = 0; j < kBlock; ++j)
        h[o * kBlock + j] = (L == 1) ? acc[j] : (relu ? std::max(acc[j], 0.0f) : std::tanh(acc[j]));
    }
    // Hidden and output layers.
    for (int l = 1; l < L; ++l) {
      const DenseLayer& d = theta.layers[l];
      const bool last = l + 1 == L;
      for (int o = 0; o < d.out; ++o) {
        float acc[kBlock];
        for (int j = 0; j < kBlock; ++j) acc[j] = d.b[o];
        for (int c = 0; c < d.in; ++c) {
          const float wc = d.w[c * d.out + o];
#pragma omp simd
          for (int j = 0; j < kBlock; ++j) acc[j] += wc * h[c * kBlock + j];
        }
        for (int j = 0; j < kBlock; ++j)
          h2[o * kBlock + j] = last ? acc[j] : (relu ? std::max(acc[j], 0.0f) : std::tanh(acc[j]));
      }
      std::swap(h, h2);
    }
    const float* dir = h;
    const float* mag = h + kBlock;
    if (use_exp) {
      for (int j = 0; j < cnt; ++j) u[j] = dir[j] * ew::magnitude(mag[j], cfg.exp_mult);
    } else {
      for (int j = 0; j < cnt; ++j) u[j] = dir[j];
    }
    if (cfg.aggregate_mag)
      for (int j = 0; j < cnt; ++j) mag_acc += mag[j];
  });
  if (mag_sum) *mag_sum += mag_acc;
  if (out_sumsq) phase_output_sumsq(geo, s, out_sumsq, group_base);  // many groups: from memory
}

float magnitude_factor(const RuleConfig& cfg, double mag_sum, double p2_sum, int64_t numel) {
  float factor = 1.0f;
  if (cfg.aggregate_mag)
    factor *= std::exp(static_cast<float>(mag_sum / static_cast<double>(numel)) * cfg.exp_mult);
  if (cfg.param_scale_mult)
    factor *= static_cast<float>(std::sqrt(p2_sum / static_cast<double>(numel) + 1e-9));
  return factor;
}

void phase_scale(const Slice& s, float factor) {
  if (factor == 1.0f) return;
  const int64_t n = s.hi - s.lo;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s.u[i] *= factor;
}

void phase_output_sumsq(const Geometry& geo, const Slice& s, double* group_sumsq,
                        int64_t group_base) {
  const int64_t G = geo.norm_size;
  int64_t i = s.lo;
  while (i < s.hi) {
    const int64_t grp = i / G, end = std::min(s.hi, (grp + 1) * G);
    const float* u = s.u + (i - s.lo);
    double part[kBlock] = {};
    const int64_t len = end - i;
    int64_t k = 0;
    for (; k + kBlock <= len; k += kBlock)
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) part[j] += static_cast<double>(u[k + j]) * u[k + j];
    double acc = 0.0;
    for (int j = 0; j < kBlock; ++j) acc += part[j];
    for (; k < len; ++k) acc += static_cast<double>(u[k]) * u[k];
    group_sumsq[grp - group_base] += acc;
    i = end;
  }
}

void phase_finish(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                  const Slice& s, const double* group_sumsq) {
  const int64_t G = geo.norm_size;
  int64_t i = s.lo;
  while (i < s.hi) {
    const int64_t grp = i / G, end = std::min(s.hi, (grp + 1) * G);
    float scale = cfg.rmsmult;
    if (cfg.normalize_output)
      scale = static_cast<float>(cfg.rmsmult /
                                 std::sqrt(1e-9 + group_sumsq[grp] / static_cast<double>(G)));
    float* u = s.u + (i - s.lo);
    const int64_t len = end - i;
    if (cfg.precondition_output) {
      const float* r = s.rms + (i - s.lo);
      const float bc = sc.bc_rms[kRms - 1];
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) u[k] = u[k] * scale / std::sqrt(r[k] * bc + ew::kPrecondEps);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) u[k] *= scale;
    }
    i = end;
  }
}

// ---------------------------------------------------------------------------------------
// Single-process driver.
// ---------------------------------------------------------------------------------------
namespace {

// Lanes: a fixed split of [0, n) that does not depend on the thread count. Fewer lanes for
// small tensors (no point splitting 100 elements) and for very skewed matrices (each lane
// keeps full row/col partial sums).
int lanes_for(const Geometry& geo) {
  const int64_t by_size = geo.numel / 8192;
  const int64_t stats = geo.factored ? geo.row_count + geo.col_count : 0;
  const int64_t by_stats = stats > 0 ? geo.numel / (4 * stats) : kLanes;
  return static_cast<int>(std::clamp<int64_t>(std::min(by_size, by_stats), 1, kLanes));
}

Slice make_slice(const Geometry& geo, RuleState& st, const float* g, const float* p, float* u,
                 int64_t lo, int64_t hi) {
  Slice s;
  s.lo = lo;
  s.hi = hi;
  s.g = g + lo;
  s.p = p + lo;
  st.point(s, geo.numel, lo);
  s.u = u + lo;
  return s;
}

// Sum per-lane partial arrays (lane-major, `width` each) into out, in lane order.
void combine_lanes(const std::vector<double>& buf, int lanes, int64_t width, double* out) {
#pragma omp parallel for schedule(static) if (width > 4096)
  for (int64_t x = 0; x < width; ++x) {
    double s = 0.0;
    for (int l = 0; l < lanes; ++l) s += buf[l * width + x];
    out[x] = s;
  }
}

// Per-lane partial sums over the normalization groups each lane touches, combined into
// out[group * width + c] in lane order (deterministic for any thread count).
template <class F>
void group_partials(const Geometry& geo, int lanes, int width, Workspace& ws, F fill,
                    double* out) {
  const int64_t n = geo.numel, G = geo.norm_size;
  std::vector<int64_t> glo(lanes), ghi(lanes), off(lanes + 1, 0);
  for (int l = 0; l < lanes; ++l) {
    const int64_t lo = n * l / lanes, hi = n * (l + 1) / lanes;
    glo[l] = lo / G;
    ghi[l] = hi > lo ? (hi - 1) / G + 1 : glo[l];
    off[l + 1] = off[l] + (ghi[l] - glo[l]) * width;
  }
  ws.lane_buf.assign(off[lanes], 0.0);
#pragma omp parallel for schedule(static, 1) if (lanes > 1)
  for (int l = 0; l < lanes; ++l) fill(l, ws.lane_buf.data() + off[l], glo[l]);
  for (int l = 0; l < lanes; ++l)
    for (int64_t x = 0; x < (ghi[l] - glo[l]) * width; ++x)
      out[glo[l] * width + x] += ws.lane_buf[off[l] + x];
}

}  // namespace

void celo2_update(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                  RuleState& st, const float* g, const float* p, float* u, Workspace& ws) {
  st.iteration += 1;
  const int64_t n = geo.numel;
  if (n == 0) return;
  const StepConstants sc = StepConstants::of(cfg, st.iteration);
  const int lanes = lanes_for(geo);
  auto lane_lo = [&](int l) { return n * l / lanes; };
  const int C = geo.channels();

  // Phase 1: accumulators and row/col statistics; for a 1-D tensor or a wide matrix also the
  // element-local channels' sums of squares (after the statistics in each lane's buffer).
  const int64_t stat_w = geo.factored ? geo.row_count + geo.col_count : 0;
  const bool local = local_sumsq_fits(cfg, geo);
  const int64_t lane_w = stat_w + 1 + (local ? C : 0);
  ws.lane_buf.assign(static_cast<size_t>(lanes) * lane_w, 0.0);
#pragma omp parallel for schedule(static, 1) if (lanes > 1)
  for (int l = 0; l < lanes; ++l) {
    double* base = ws.lane_buf.data() + l * lane_w;
    Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
    phase_accumulate(cfg, geo, sc, s, base + 1, base + 1 + geo.row_count, base,
                     local ? base + stat_w + 1 : nullptr);
  }
  ws.row_sum.assign(lane_w, 0.0);
  combine_lanes(ws.lane_buf, lanes, lane_w, ws.row_sum.data());
  const double p2_sum = ws.row_sum[0];

  // Phase 2: factored accumulators and feature tables.
  if (geo.factored)
    phase_update_factored(cfg, geo, sc, ws.row_sum.data() + 1,
                          ws.row_sum.data() + 1 + geo.row_count, st.v_row.data(),
                          st.v_col.data(), ws.tables);

  // Phase 3: per-channel sums of squares, per normalization group. Each lane keeps partials
  // only for the groups it touches (a conv weight has thousands of small groups).
  ws.sumsq.assign(geo.norm_groups * C, 0.0);
  if (local) std::copy(ws.row_sum.begin() + stat_w + 1, ws.row_sum.end(), ws.sumsq.begin());
  if (cfg.normalize_input) {
    group_partials(geo, lanes, C, ws, [&](int l, double* part, int64_t gbase) {
      Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
      phase_feature_sumsq(cfg, geo, sc, s, ws.tables, part, gbase, local);
    }, ws.sumsq.data());
  }

  // Phase 4: MLP. Without Newton–Schulz it also sums the output's squares per normalization
  // group (phase_mlp's out_sumsq), per lane, combined in lane order.
  const bool ns = cfg.orthogonalize && geo.factored;
  const bool out_in_mlp = !ns && cfg.normalize_output;
  std::vector<double> mag(lanes, 0.0);
  ws.out_sumsq.assign(geo.norm_groups, 0.0);
  group_partials(geo, lanes, 1, ws, [&](int l, double* part, int64_t gbase) {
    Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
    phase_mlp(cfg, theta, geo, sc, s, ws.tables, ws.sumsq.data(), &mag[l], out_in_mlp ? part : nullptr, gbase);
  }, ws.out_sumsq.data());
  double mag_sum = 0.0;
  for (double v : mag) mag_sum += v;
  const float factor = magnitude_factor(cfg, mag_sum, p2_sum, n);
  Slice whole = make_slice(geo, st, g, p, u, 0, n);
  // After Newton–Schulz: the output's squares from memory.
  auto output_sumsq = [&]() {
    ws.out_sumsq.assign(geo.norm_groups, 0.0);
    if (!cfg.normalize_output) return;
    group_partials(geo, lanes, 1, ws, [&](int l, double* part, int64_t gbase) {
      Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
      phase_output_sumsq(geo, s, part, gbase);
    }, ws.out_sumsq.data());
  };

  // Phase 5: the magnitude factor, Newton–Schulz per matrix, output normalization. The
  // order of operations here is the sharded engine's, so both give the same floats.
  if (ns) {
    phase_scale(whole, factor);
    const int64_t G = geo.norm_size;
    if (geo.norm_groups == 1 || G >= 256 * 256) {
      for (int64_t grp = 0; grp < geo.norm_groups; ++grp)
        newton_schulz(cfg, geo.mat_rows, geo.mat_cols, u + grp * G, ws.ns_buf);
    } else {
      // Many small matrices (conv kernels): one per thread, BLAS single-threaded inside.
#pragma omp parallel if (geo.numel > 65536)
      {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < geo.norm_groups; ++grp)
          newton_schulz(cfg, geo.mat_rows, geo.mat_cols, u + grp * G, scratch);
      }
    }
    output_sumsq();
  } else {
    // Without Newton–Schulz the factor only scales the sums of squares (phase 4's).
    for (double& v : ws.out_sumsq) v *= static_cast<double>(factor) * factor;
    phase_scale(whole, factor);
  }
#pragma omp parallel for schedule(static, 1) if (lanes > 1)
  for (int l = 0; l < lanes; ++l) {
    Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
    phase_finish(cfg, geo, sc, s, ws.out_sumsq.data());
  }
}

}  // namespace celo2
