// The fast CPU path of the Celo2 rule: fused, vectorized phase kernels on slices, and the
// single-process driver celo2_update() that runs them over a whole tensor with OpenMP.
//
// Per element we never store the 30 feature channels: phase 3 computes them to gather the
// per-channel sums of squares, phase 4 recomputes them (cheap next to the MLP) and runs the
// MLP with the input normalization folded into the first layer's weights. Elements are
// processed in blocks of kBlock, features laid out channel-major within a block, so the
// MLP's inner loops vectorize over elements.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include <omp.h>

#include "celo2/elementwise.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"

namespace celo2 {
namespace {

constexpr int kBlock = 16;
constexpr int kMaxHidden = 64;  // the fast path's register/stack budget; larger uses heap

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

// Fill features of elements [i0, i0 + cnt) of the slice into f[c * kBlock + j].
// One block inside one matrix row of a 2-D tensor. The table indexed by the column
// (rows if d0 == 0, cols if d0 == 1) varies along the block and is read from the SoA copy;
// the other is one entry.
template <bool kColVaries>
inline void block_features_2d(const StepConstants& sc, const Slice& s, const FacTables& t,
                              int64_t a, int64_t j, int64_t i0, int cnt, float* __restrict f) {
  const ew::FacEntry& fixed = kColVaries ? t.rows[a] : t.cols[a];
  const std::vector<float>& soa = kColVaries ? t.cols_soa : t.rows_soa;
  const int64_t cntab = kColVaries ? static_cast<int64_t>(t.cols.size())
                                   : static_cast<int64_t>(t.rows.size());
  const float* vh = soa.data() + 0 * kFac * cntab + j;
  const float* is = soa.data() + 1 * kFac * cntab + j;
  const float* sc_ = soa.data() + 2 * kFac * cntab + j;
  const float* sh = soa.data() + 3 * kFac * cntab + j;
  const int64_t li0 = i0 - s.lo;
  const float* __restrict gp = s.g + li0;
  const float* __restrict pp = s.p + li0;
  const float* __restrict m0 = s.m + li0;
  const float* __restrict rr = s.rms + li0;
  const int64_t P = s.plane;
  constexpr int B = kBlock;
  const int vr = kColVaries ? 18 : 15;  // vhat channel base of the varying table
  const int fr = kColVaries ? 15 : 18;  // of the fixed one
#pragma omp simd
  for (int jj = 0; jj < cnt; ++jj) {
    const float g = ew::clip_grad(gp[jj]);
    const float r_hat = rr[jj] * sc.bc_rms[0];
    const float rho = 1.0f / sqrtf(r_hat + ew::kRhoEps);
    float mh[kMom];
    for (int k = 0; k < kMom; ++k) mh[k] = m0[k * P + jj] * sc.bc_mom[k];
    f[0 * B + jj] = g;
    f[1 * B + jj] = ew::clampf(g, -ew::kSmallClip, ew::kSmallClip);
    f[2 * B + jj] = pp[jj];
    for (int k = 0; k < kMom; ++k) f[(3 + k) * B + jj] = mh[k];
    f[6 * B + jj] = r_hat;
    for (int k = 0; k < kMom; ++k) f[(7 + k) * B + jj] = mh[k] * rho;
    f[10 * B + jj] = rho;
    for (int k = 0; k < kFac; ++k) {
      const float sv = sc_[k * cntab + jj], shv = sh[k * cntab + jj];
      // Same product order as features_factored: g * row.scale * col.scale.
      f[(11 + k) * B + jj] = kColVaries ? g * fixed.scale[k] * sv : g * sv * fixed.scale[k];
      f[(27 + k) * B + jj] =
          kColVaries ? mh[k] * fixed.scale_hat[k] * shv : mh[k] * shv * fixed.scale_hat[k];
      f[(vr + k) * B + jj] = vh[k * cntab + jj];
      f[(vr + 6 + k) * B + jj] = is[k * cntab + jj];
      f[(fr + k) * B + jj] = fixed.vhat[k];
      f[(fr + 6 + k) * B + jj] = fixed.inv_sqrt[k];
    }
    f[14 * B + jj] = g * rho;
  }
}

inline void block_features(const Geometry& geo, const StepConstants& sc, const Slice& s,
                           const FacTables& t, int64_t i0, int cnt, Walker* w, float* f) {
  if (geo.ndim == 2) {
    const int64_t C = geo.shape[1], a = i0 / C, j = i0 - a * C;
    if (j + cnt <= C) {
      if (geo.d0 == 1)
        block_features_2d<true>(sc, s, t, a, j, i0, cnt, f);
      else
        block_features_2d<false>(sc, s, t, a, j, i0, cnt, f);
    } else {
      for (int jj = 0; jj < cnt; ++jj) {
        const int64_t i = i0 + jj, aa = i / C, c = i - aa * C;
        const int64_t ri = geo.d0 == 1 ? aa : c, ci = geo.d0 == 1 ? c : aa;
        const ew::ElementInputs e = load_inputs(sc, s, i - s.lo);
        ew::features_factored(e, t.rows[ri], t.cols[ci], f + jj, kBlock);
      }
    }
  } else if (geo.factored) {
    int64_t rows[kBlock], cols[kBlock];
    for (int j = 0; j < cnt; ++j) {
      rows[j] = w->row;
      cols[j] = w->col;
      w->next();
    }
    for (int j = 0; j < cnt; ++j) {
      const ew::ElementInputs e = load_inputs(sc, s, i0 - s.lo + j);
      ew::features_factored(e, t.rows[rows[j]], t.cols[cols[j]], f + j, kBlock);
    }
  } else {
    // Slice fields hoisted into locals (restrict) so the loop vectorizes.
    const int64_t li0 = i0 - s.lo, P = s.plane;
    const float* __restrict gp = s.g + li0;
    const float* __restrict pp = s.p + li0;
    const float* __restrict m0 = s.m + li0;
    const float* __restrict rr = s.rms + li0;
    const float* __restrict vd0 = s.v_diag + li0;
    const float bm0 = sc.bc_mom[0], bm1 = sc.bc_mom[1], bm2 = sc.bc_mom[2], br = sc.bc_rms[0];
    constexpr int B = kBlock;
#pragma omp simd
    for (int j = 0; j < cnt; ++j) {
      const float g = ew::clip_grad(gp[j]);
      const float r_hat = rr[j] * br;
      const float rho = 1.0f / sqrtf(r_hat + ew::kRhoEps);
      const float mh0 = m0[j] * bm0, mh1 = m0[P + j] * bm1, mh2 = m0[2 * P + j] * bm2;
      f[0 * B + j] = g;
      f[1 * B + j] = ew::clampf(g, -ew::kSmallClip, ew::kSmallClip);
      f[2 * B + j] = pp[j];
      f[3 * B + j] = mh0;
      f[4 * B + j] = mh1;
      f[5 * B + j] = mh2;
      f[6 * B + j] = r_hat;
      f[7 * B + j] = mh0 * rho;
      f[8 * B + j] = mh1 * rho;
      f[9 * B + j] = mh2 * rho;
      f[10 * B + j] = rho;
      f[11 * B + j] = g * ew::safe_rsqrt(vd0[j] + ew::kSafeFloor);
      f[12 * B + j] = g * ew::safe_rsqrt(vd0[P + j] + ew::kSafeFloor);
      f[13 * B + j] = g * ew::safe_rsqrt(vd0[2 * P + j] + ew::kSafeFloor);
      f[14 * B + j] = g * rho;
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

// The MLP with hidden width 8 and relu on one block, accumulators in registers:
// 8 elements (one AVX2 vector) x 8 outputs per pass. Writes direction to h[0..kBlock) and
// magnitude to h[kBlock..2 kBlock); the unused third output is skipped.
typedef float V8 __attribute__((vector_size(32)));
inline V8 load8(const float* p) { V8 v; std::memcpy(&v, p, sizeof v); return v; }
inline V8 splat8(float x) { return V8{x, x, x, x, x, x, x, x}; }
inline V8 relu8(V8 x) { const V8 z = {}; return x > z ? x : z; }

void mlp_h8(const Theta& theta, int C, const float* __restrict w0, const float* __restrict f,
            float* __restrict h) {
  const int L = static_cast<int>(theta.layers.size());
  const DenseLayer& l0 = theta.layers[0];
  for (int j0 = 0; j0 < kBlock; j0 += 8) {
    V8 a[8];
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) a[o] = splat8(l0.b[o]);
    for (int c = 0; c < C; ++c) {
      const V8 x = load8(f + c * kBlock + j0);
      const float* wr = w0 + c * 8;
#pragma GCC unroll 8
      for (int o = 0; o < 8; ++o) a[o] += splat8(wr[o]) * x;
    }
    for (int l = 1; l < L; ++l) {
#pragma GCC unroll 8
      for (int o = 0; o < 8; ++o) a[o] = relu8(a[o]);
      const DenseLayer& d = theta.layers[l];
      const bool last = l + 1 == L;
      if (!last) {
        V8 b[8];
#pragma GCC unroll 8
        for (int o = 0; o < 8; ++o) b[o] = splat8(d.b[o]);
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c)
#pragma GCC unroll 8
          for (int o = 0; o < 8; ++o) b[o] += splat8(d.w[c * 8 + o]) * a[c];
#pragma GCC unroll 8
        for (int o = 0; o < 8; ++o) a[o] = b[o];
      } else {
        V8 dir = splat8(d.b[0]), mag = splat8(d.b[1]);
        const int out = d.out;
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          dir += splat8(d.w[c * out + 0]) * a[c];
          mag += splat8(d.w[c * out + 1]) * a[c];
        }
        std::memcpy(h + j0, &dir, sizeof dir);
        std::memcpy(h + kBlock + j0, &mag, sizeof mag);
      }
    }
  }
}

}  // namespace

void phase_accumulate(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                      const Slice& s, double* row_sum, double* col_sum, double* p2_sum) {
  const int64_t n = s.hi - s.lo;
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
      double seg = 0.0;
      for (int64_t j = j0; j < j1; ++j) {
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
  if (cfg.param_scale_mult && p2_sum) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(s.p[i]) * s.p[i];
    *p2_sum += acc;
  }
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
  std::vector<double> rest(geo.rest_count), rest_hat(geo.rest_count);
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
                         int64_t group_base) {
  if (!cfg.normalize_input || s.hi <= s.lo) return;
  const int C = geo.channels();
  alignas(64) float f[kChannels * kBlock];
  Walker w(geo, geo.factored ? s.lo : 0);
  int64_t cur = -1;
  // Squares of floats are exact in double and double sums of them round far below float
  // resolution, so the per-group sums (rounded to float where used) do not depend on how
  // the tensor is cut into slices: the sharded engine matches the single-process result.
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

void phase_mlp(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
               const StepConstants& sc, const Slice& s, const FacTables& tables,
               const double* sumsq, double* mag_sum) {
  if (s.hi <= s.lo) return;
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
  double mag_acc = 0.0;
  const DenseLayer& l0 = theta.layers[0];
  for_blocks(geo, s, [&](int64_t grp, int64_t i0, int cnt) {
    if (grp != cur) {
      cur = grp;
      for (int c = 0; c < C; ++c) {
        float inv = 1.0f;
        if (cfg.normalize_input)
          inv = static_cast<float>(1.0 / std::sqrt(1e-9 + sumsq[grp * C + c] /
                                                            static_cast<double>(geo.norm_size)));
        for (int o = 0; o < H; ++o) w0[c * H + o] = l0.w[c * H + o] * inv;
      }
    }
    block_features(geo, sc, s, tables, i0, cnt, &w, f);
    if (H == 8 && relu) {
      mlp_h8(theta, C, w0.data(), f, h);
    } else {
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
    }
    float* u = s.u + (i0 - s.lo);
    const float* dir = h;
    const float* mag = h + kBlock;
    if (use_exp) {
      for (int j = 0; j < cnt; ++j) u[j] = dir[j] * std::exp(mag[j] * cfg.exp_mult);
    } else {
      for (int j = 0; j < cnt; ++j) u[j] = dir[j];
    }
    if (cfg.aggregate_mag)
      for (int j = 0; j < cnt; ++j) mag_acc += mag[j];
  });
  if (mag_sum) *mag_sum += mag_acc;
  (void)kMaxHidden;
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
  s.m = st.m.data() + lo;
  s.rms = st.rms.data() + lo;
  s.v_diag = geo.factored ? nullptr : st.v_diag.data() + lo;
  s.plane = geo.numel;
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

  // Phase 1: accumulators and row/col statistics.
  const int64_t stat_w = geo.factored ? geo.row_count + geo.col_count : 0;
  ws.lane_buf.assign(static_cast<size_t>(lanes) * (stat_w + 1), 0.0);
#pragma omp parallel for schedule(static, 1) if (lanes > 1)
  for (int l = 0; l < lanes; ++l) {
    double* base = ws.lane_buf.data() + l * (stat_w + 1);
    Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
    phase_accumulate(cfg, geo, sc, s, base + 1, base + 1 + geo.row_count, base);
  }
  ws.row_sum.assign(stat_w + 1, 0.0);
  combine_lanes(ws.lane_buf, lanes, stat_w + 1, ws.row_sum.data());
  const double p2_sum = ws.row_sum[0];

  // Phase 2: factored accumulators and feature tables.
  if (geo.factored)
    phase_update_factored(cfg, geo, sc, ws.row_sum.data() + 1,
                          ws.row_sum.data() + 1 + geo.row_count, st.v_row.data(),
                          st.v_col.data(), ws.tables);

  // Phase 3: per-channel sums of squares, per normalization group. Each lane keeps partials
  // only for the groups it touches (a conv weight has thousands of small groups).
  ws.sumsq.assign(geo.norm_groups * C, 0.0);
  if (cfg.normalize_input) {
    group_partials(geo, lanes, C, ws, [&](int l, double* part, int64_t gbase) {
      Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
      phase_feature_sumsq(cfg, geo, sc, s, ws.tables, part, gbase);
    }, ws.sumsq.data());
  }

  // Phase 4: MLP.
  std::vector<double> mag(lanes, 0.0);
#pragma omp parallel for schedule(static, 1) if (lanes > 1)
  for (int l = 0; l < lanes; ++l) {
    Slice s = make_slice(geo, st, g, p, u, lane_lo(l), lane_lo(l + 1));
    phase_mlp(cfg, theta, geo, sc, s, ws.tables, ws.sumsq.data(), &mag[l]);
  }
  double mag_sum = 0.0;
  for (double v : mag) mag_sum += v;
  const float factor = magnitude_factor(cfg, mag_sum, p2_sum, n);
  Slice whole = make_slice(geo, st, g, p, u, 0, n);
  const bool ns = cfg.orthogonalize && geo.factored;
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
    // Without Newton–Schulz the factor only scales the sums of squares.
    output_sumsq();
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
