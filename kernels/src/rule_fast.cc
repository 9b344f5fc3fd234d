// The rule's hot loops (rule_fast.h), compiled once per instruction set: CELO2_ISA_NS names
// the copy (isa_base, isa_avx2, isa_avx512) and the compiler flags of its object library
// choose the vectors. Phase 1 (accumulate_1d, accumulate_row) updates the state and squares
// the element-local channels in registers. Features of a block of kBlk elements are built in
// one vectorized loop into a small channel-major array (L1), then either squared into double
// accumulators (input normalization: the channels phase 1 could not) or fed to the MLP, whose
// accumulators stay in registers: one vector of kV elements per hidden unit, weights
// broadcast from memory.
//
// A matrix's twelve table channels (v̂_row, v̂_col and their 1/sqrt) are constant along a row
// or a column; the caller folds their first-layer contribution into a per-row bias and a
// per-column bias, and sums their squares per row, so per element only 18 channels remain.
#include <cmath>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// GCC 12 flags _mm512_cvtps_pd's own _mm512_undefined_pd() pass-through operand as
// "may be used uninitialized" (a false positive inside the intrinsic header).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "celo2/elementwise.h"
#include "rule_fast.h"
#include "simd.h"

#ifndef CELO2_ISA_NS
#error "rule_fast.cc is compiled per instruction set with -DCELO2_ISA_NS=isa_<name>"
#endif

namespace celo2::fast::CELO2_ISA_NS {
namespace {

using simd::kV;
using simd::splat;
using simd::vload;
using simd::vstore;
using simd::VF;
#if defined(__AVX512F__)
constexpr const char* kName = "avx512";
#elif defined(__AVX2__)
constexpr const char* kName = "avx2";
#else
constexpr const char* kName = "base";
#endif
// Elements per block: two vectors, so the MLP keeps 16 independent accumulator chains in
// flight (one vector per hidden unit and half-block) and hides the FMA latency.
constexpr int kBlk = 2 * kV;
static_assert(kBlk <= kBlockMax);

// Software prefetch of the streams a pass walks, 768 floats (3 KiB) ahead of the element
// in hand. The passes read six to nine arrays at once (g, p, m's three planes, rms, v_diag's
// three) and write some of them back; the hardware prefetcher alone left phase 1 and the MLP
// pass waiting on memory (docs/PERF.md, "Software prefetch": phase 1 1.3x, the MLP pass
// 1.1x faster on 16M-element matrices; 4 KiB ahead was slower: a write-intent prefetch with
// the low address bits of a pending store). The address is formed as an integer: a prefetch
// past the end of an array neither faults nor counts as pointer arithmetic on it. Elems and
// Accum carry the switch (celo2/isa.h cpu_prefetch).
constexpr uintptr_t kAhead = 768 * sizeof(float);
constexpr int kLine = 64 / sizeof(float);  // floats per cache line: one prefetch each
template <class... T>
inline void prefetch_read(const T*... p) {
  (__builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kAhead), 0), ...);
}
template <class... T>
inline void prefetch_write(T*... p) {
  (__builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kAhead), 1), ...);
}

// x > 0 ? x : 0 (NaN -> 0), one max.
inline VF relu(VF x) { return simd::vmax(x, VF{}); }

// A value held in a register for its next uses: GCC otherwise folds each use of a weight
// into its FMA as a memory operand, so every FMA also loads a vector, and a core that loads
// one 512-bit (or two 256-bit) vectors per cycle, as AMD Zen 4, then waits on loads, not
// FMAs (docs/PERF.md, 2026-12-02: the AVX-512 matrix MLP pass 14 % faster there).
inline VF reuse(VF v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__SSE2__)
  asm("" : "+x"(v));
#endif
  return v;
}

// Zero lanes [from, to) of every channel: the unused lanes of a partial block or chunk, so the
// MLP and the squares can run full width.
template <int S>
inline void zero_lanes(float* f, int channels, int from, int to) {
  for (int c = 0; c < channels; ++c)
    for (int j = from; j < to; ++j) f[c * S + j] = 0.0f;
}
template <int S>
inline void pad(float* f, int channels, int cnt) {
  zero_lanes<S>(f, channels, cnt, kBlk);
}

// One element's six table-dependent channels, g·R·C (spec 11-13) into fg[k * S] and m̂·R̂·Ĉ
// (spec 27-29) into fm[k * S], in ew::features_factored's product order; fs/fsh the fixed
// table's scale and scale_hat, v/vh the varying table's. The MLP pass's fill (element_2d) and
// phase 3's (fill_2d_table_n) both form them here.
template <bool kColVaries, int S>
CELO2_HD void table_2d(float g, float mh0, float mh1, float mh2, float fs0, float fs1, float fs2,
                       float fsh0, float fsh1, float fsh2, float v0, float v1, float v2, float vh0,
                       float vh1, float vh2, float* __restrict fg, float* __restrict fm) {
  fg[0 * S] = kColVaries ? g * fs0 * v0 : g * v0 * fs0;
  fg[1 * S] = kColVaries ? g * fs1 * v1 : g * v1 * fs1;
  fg[2 * S] = kColVaries ? g * fs2 * v2 : g * v2 * fs2;
  fm[0 * S] = kColVaries ? mh0 * fsh0 * vh0 : mh0 * vh0 * fsh0;
  fm[1 * S] = kColVaries ? mh1 * fsh1 * vh1 : mh1 * vh1 * fsh1;
  fm[2 * S] = kColVaries ? mh2 * fsh2 * vh2 : mh2 * vh2 * fsh2;
}

// One matrix element's 18 channels into f[c * S] (compact order: spec channels 0-14, then
// 27-29); fs/fsh: the fixed table's scale and scale_hat, v/vh the varying table's. Product
// orders follow ew::features_factored (g * R * C, m̂ * R̂ * Ĉ).
template <bool kColVaries, int S>
CELO2_HD void element_2d(const Elems& e, float graw, float p, float m0, float m1, float m2,
                         float r, float fs0, float fs1, float fs2, float fsh0, float fsh1,
                         float fsh2, float v0, float v1, float v2, float vh0, float vh1,
                         float vh2, float* __restrict f) {
  const float g = ew::clip_grad(graw);
  const float r_hat = r * e.bc_rms;
  const float rho = 1.0f / sqrtf(r_hat + ew::kRhoEps);
  const float mh0 = m0 * e.bc_mom[0], mh1 = m1 * e.bc_mom[1], mh2 = m2 * e.bc_mom[2];
  f[0 * S] = g;
  f[1 * S] = ew::clampf(g, -ew::kSmallClip, ew::kSmallClip);
  f[2 * S] = p;
  f[3 * S] = mh0;
  f[4 * S] = mh1;
  f[5 * S] = mh2;
  f[6 * S] = r_hat;
  f[7 * S] = mh0 * rho;
  f[8 * S] = mh1 * rho;
  f[9 * S] = mh2 * rho;
  f[10 * S] = rho;
  f[14 * S] = g * rho;
  table_2d<kColVaries, S>(g, mh0, mh1, mh2, fs0, fs1, fs2, fsh0, fsh1, fsh2, v0, v1, v2, vh0, vh1, vh2,
                          f + 11 * S, f + 15 * S);
}


// Row a's entries of the fixed factored table (scale_k, scale_hat_k) and pointers to the varying
// table's from column j (scale_k at vs[k * vn], scale_hat_k at vsh[k * vn]): what every fill of
// a matrix row segment reads.
struct RowTables {
  float fs[3], fsh[3];
  const float* vs;
  const float* vsh;
  int64_t vn;
};
inline RowTables row_tables(const Matrix& mx, int64_t a, int64_t j) {
  RowTables t;
  const int64_t fn = mx.fix_n;
  for (int k = 0; k < 3; ++k) {
    t.fs[k] = mx.fix_soa[(2 * 3 + k) * fn + a];
    t.fsh[k] = mx.fix_soa[(3 * 3 + k) * fn + a];
  }
  t.vn = mx.vary_n;
  t.vs = mx.vary_soa + 2 * 3 * t.vn + j;
  t.vsh = mx.vary_soa + 3 * 3 * t.vn + j;
  return t;
}

// The 18 per-element channels of a matrix row segment inside row a, columns [j, j + cnt), into
// f[c * S + jj].
template <bool kColVaries, int S, int N>
inline void fill_2d_n(const Elems& e, const Matrix& mx, int64_t a, int64_t j, int cnt,
                      float* __restrict f) {
  if (N > 0) cnt = N;
  const RowTables t = row_tables(mx, a, j);
  const float *fs = t.fs, *fsh = t.fsh;
  const int64_t vn = t.vn;
  const float* __restrict vs = t.vs;
  const float* __restrict vsh = t.vsh;
  const int64_t li0 = a * mx.cols + j - e.lo, P = e.plane;
  const float* __restrict gp = e.g + li0;
  const float* __restrict pp = e.p + li0;
  const float* __restrict m0 = e.m + li0;
  const float* __restrict rr = e.rms + li0;
#pragma omp simd
  for (int jj = 0; jj < cnt; ++jj) {
    element_2d<kColVaries, S>(e, gp[jj], pp[jj], m0[jj], m0[P + jj], m0[2 * P + jj], rr[jj],
                              fs[0], fs[1], fs[2], fsh[0], fsh[1], fsh[2], vs[jj], vs[vn + jj],
                              vs[2 * vn + jj], vsh[jj], vsh[vn + jj], vsh[2 * vn + jj], f + jj);
  }
}

// Clip to [lo, hi] as ew::clampf (two selects: one max, one min; NaN passes through).
inline VF clampv(VF x, VF lo, VF hi) { return simd::vmin(hi, simd::vmax(lo, x)); }

// Channels 0-10 of a vector of elements (element_2d's and fill_1d_n's operations in their
// order) from the clipped g, p and the momenta and rms; bc, bcr their bias corrections.
// Returns rho (channel 14 is g·rho). The one vector form of these channels: the matrix fill
// and phase 1's squares both call it.
inline VF local_channels(VF g, VF p, VF m0, VF m1, VF m2, VF r, const VF* bc, VF bcr, VF* f) {
  const VF sc = splat(ew::kSmallClip), eps = splat(ew::kRhoEps), one = splat(1.0f);
  const VF r_hat = r * bcr;
  const VF rho = one / simd::vsqrt(r_hat + eps);
  const VF mh0 = m0 * bc[0], mh1 = m1 * bc[1], mh2 = m2 * bc[2];
  f[0] = g;
  f[1] = clampv(g, -sc, sc);
  f[2] = p;
  f[3] = mh0;
  f[4] = mh1;
  f[5] = mh2;
  f[6] = r_hat;
  f[7] = mh0 * rho;
  f[8] = mh1 * rho;
  f[9] = mh2 * rho;
  f[10] = rho;
  return rho;
}

// The 18 per-element channels of a whole matrix block inside row a, columns [j, j + kBlk),
// into f[c * S + jj]: element_2d's operations in its order on explicit vectors, so every
// channel is one store at a constant offset from f (the omp-simd form kept a pointer per
// channel, spilled them, and compiled the clips to mask logic). Same bits as element_2d.
template <bool kColVaries, int S>
inline void fill_2d_block(const Elems& e, const Matrix& mx, int64_t a, int64_t j,
                          float* __restrict f) {
  const RowTables t = row_tables(mx, a, j);
  VF fs[3], fsh[3];
  for (int k = 0; k < 3; ++k) {
    fs[k] = splat(t.fs[k]);
    fsh[k] = splat(t.fsh[k]);
  }
  const int64_t vn = t.vn;
  const float* __restrict vs = t.vs;
  const float* __restrict vsh = t.vsh;
  const int64_t li0 = a * mx.cols + j - e.lo, P = e.plane;
  const float* __restrict gp = e.g + li0;
  const float* __restrict pp = e.p + li0;
  const float* __restrict m0 = e.m + li0;
  const float* __restrict rr = e.rms + li0;
  const VF bc[3] = {splat(e.bc_mom[0]), splat(e.bc_mom[1]), splat(e.bc_mom[2])};
  const VF br = splat(e.bc_rms), gc = splat(ew::kGradClip);
  if (e.prefetch)
    for (int h = 0; h < kBlk; h += kLine) prefetch_read(gp + h, pp + h, m0 + h, m0 + P + h, m0 + 2 * P + h, rr + h);
#pragma GCC unroll 2
  for (int h = 0; h < kBlk; h += kV) {
    const VF g = clampv(vload(gp + h), -gc, gc);
    VF lc[11];
    const VF rho = local_channels(g, vload(pp + h), vload(m0 + h), vload(m0 + P + h), vload(m0 + 2 * P + h),
                                  vload(rr + h), bc, br, lc);
    const VF mh0 = lc[3], mh1 = lc[4], mh2 = lc[5];
    const VF v0 = vload(vs + h), v1 = vload(vs + vn + h), v2 = vload(vs + 2 * vn + h);
    const VF vh0 = vload(vsh + h), vh1 = vload(vsh + vn + h), vh2 = vload(vsh + 2 * vn + h);
    float* o = f + h;
    for (int c = 0; c < 11; ++c) vstore(o + c * S, lc[c]);
    vstore(o + 11 * S, kColVaries ? g * fs[0] * v0 : g * v0 * fs[0]);
    vstore(o + 12 * S, kColVaries ? g * fs[1] * v1 : g * v1 * fs[1]);
    vstore(o + 13 * S, kColVaries ? g * fs[2] * v2 : g * v2 * fs[2]);
    vstore(o + 14 * S, g * rho);
    vstore(o + 15 * S, kColVaries ? mh0 * fsh[0] * vh0 : mh0 * vh0 * fsh[0]);
    vstore(o + 16 * S, kColVaries ? mh1 * fsh[1] * vh1 : mh1 * vh1 * fsh[1]);
    vstore(o + 17 * S, kColVaries ? mh2 * fsh[2] * vh2 : mh2 * vh2 * fsh[2]);
  }
}

// Whole blocks: explicit vectors; a partial block: the per-element form (the same bits).
template <bool kColVaries, int S>
inline void fill_2d(const Elems& e, const Matrix& mx, int64_t a, int64_t j, int cnt,
                    float* __restrict f) {
  if (cnt == kBlk) {
    fill_2d_block<kColVaries, S>(e, mx, a, j, f);
  } else {
    fill_2d_n<kColVaries, S, 0>(e, mx, a, j, cnt, f);
    pad<S>(f, kElem2d, cnt);
  }
}

// Elements [li, li + n) of a matrix slice (slice-local; the run may cross rows: matrices
// narrower than a block) as row segments: fn(a, j, cnt, k) for row a, columns [j, j + cnt),
// run positions [k, k + cnt).
template <class F>
inline void for_run_segments(const Elems& e, int64_t cols, int64_t li, int n, F fn) {
  int64_t i = e.lo + li;
  int64_t a = i / cols, j = i - a * cols;
  for (int k = 0; k < n;) {
    const int cnt = static_cast<int>(cols - j < n - k ? cols - j : n - k);
    fn(a, j, cnt, k);
    k += cnt;
    j = 0;
    ++a;
  }
}

// The run's features into f[c * S + k], k < n, and zeros up to the next whole block; returns
// that length. Each row segment is one vectorized fill, so lanes of a block come from several
// rows without per-lane gathers of the tables; per_segment(a, j, cnt, k) runs on each segment
// too (the MLP pass builds its biases there).
template <bool kColVaries, int S, class F>
inline int fill_2d_run(const Elems& e, const Matrix& mx, int64_t li, int n, float* __restrict f,
                       F per_segment) {
  for_run_segments(e, mx.cols, li, n, [&](int64_t a, int64_t j, int cnt, int k) {
    fill_2d_n<kColVaries, S, 0>(e, mx, a, j, cnt, f + k);
    per_segment(a, j, cnt, k);
  });
  const int len = (n + kBlk - 1) / kBlk * kBlk;
  zero_lanes<S>(f, kElem2d, n, len);
  return len;
}

// The 15 channels of a 1-D block [i0, i0 + cnt) (slice-local i0), as ew::features_diag.
template <int S, int N>
inline void fill_1d_n(const Elems& e, int64_t li0, int cnt, float* __restrict f) {
  if (N > 0) cnt = N;
  const int64_t P = e.plane;
  const float* __restrict gp = e.g + li0;
  const float* __restrict pp = e.p + li0;
  const float* __restrict m0 = e.m + li0;
  const float* __restrict rr = e.rms + li0;
  const float* __restrict vd = e.v_diag + li0;
  const float b0 = e.bc_mom[0], b1 = e.bc_mom[1], b2 = e.bc_mom[2], br = e.bc_rms;
  if (N > 0 && e.prefetch)
    for (int h = 0; h < N; h += kLine)
      prefetch_read(gp + h, pp + h, m0 + h, m0 + P + h, m0 + 2 * P + h, rr + h, vd + h, vd + P + h,
                    vd + 2 * P + h);
#pragma omp simd
  for (int j = 0; j < cnt; ++j) {
    const float g = ew::clip_grad(gp[j]);
    const float r_hat = rr[j] * br;
    const float rho = 1.0f / sqrtf(r_hat + ew::kRhoEps);
    const float mh0 = m0[j] * b0, mh1 = m0[P + j] * b1, mh2 = m0[2 * P + j] * b2;
    f[0 * S + j] = g;
    f[1 * S + j] = ew::clampf(g, -ew::kSmallClip, ew::kSmallClip);
    f[2 * S + j] = pp[j];
    f[3 * S + j] = mh0;
    f[4 * S + j] = mh1;
    f[5 * S + j] = mh2;
    f[6 * S + j] = r_hat;
    f[7 * S + j] = mh0 * rho;
    f[8 * S + j] = mh1 * rho;
    f[9 * S + j] = mh2 * rho;
    f[10 * S + j] = rho;
    f[11 * S + j] = g * ew::safe_rsqrt(vd[j] + ew::kSafeFloor);
    f[12 * S + j] = g * ew::safe_rsqrt(vd[P + j] + ew::kSafeFloor);
    f[13 * S + j] = g * ew::safe_rsqrt(vd[2 * P + j] + ew::kSafeFloor);
    f[14 * S + j] = g * rho;
  }
  pad<S>(f, kElem1d, cnt);
}

template <int S>
inline void fill_1d(const Elems& e, int64_t li0, int cnt, float* __restrict f) {
  if (cnt == kBlk)
    fill_1d_n<S, kBlk>(e, li0, cnt, f);
  else
    fill_1d_n<S, 0>(e, li0, cnt, f);
}

// Squares of floats are exact in double, and double sums of them round far below float
// resolution, so the sums do not depend on how a tensor is cut into slices. Features are
// squared a chunk of blocks at a time (f[c * kChunkStride + j]), with four double accumulators
// per channel in registers.
constexpr int kChunk = 8 * kBlk;
constexpr int kChunkStride = kChunk + 16;  // channel stride (not a multiple of 4 KiB apart)
typedef float VH __attribute__((vector_size(kV * sizeof(float) / 2)));
typedef double VD __attribute__((vector_size(kV * sizeof(double) / 2)));

// Half a vector of floats, widened to doubles (one instruction; GCC 12 splits
// __builtin_convertvector here into quarter-width conversions).
inline VD vload_d(const float* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<VD>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
#elif defined(__AVX__)
  return reinterpret_cast<VD>(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
  VH h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, VD);
#endif
}

// Four double accumulators per channel, kept across chunks; summed once at the end.
template <int kChannels>
struct SquareSums {
  VD acc[kChannels][4] = {};

  // f[c * kChunkStride + j], j < len (a multiple of kBlk; padded lanes are zero).
  void add(const float* __restrict f, int len) {
    constexpr int H = kV / 2;
    for (int c = 0; c < kChannels; ++c) {
      VD s0 = acc[c][0], s1 = acc[c][1], s2 = acc[c][2], s3 = acc[c][3];
      const float* x = f + c * kChunkStride;
      for (int j = 0; j < len; j += kBlk) {
        const VD d0 = vload_d(x + j), d1 = vload_d(x + j + H), d2 = vload_d(x + j + 2 * H),
                 d3 = vload_d(x + j + 3 * H);
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
      }
      acc[c][0] = s0;
      acc[c][1] = s1;
      acc[c][2] = s2;
      acc[c][3] = s3;
    }
  }

  void flush(double* sumsq) const {
    for (int c = 0; c < kChannels; ++c) {
      const VD t = (acc[c][0] + acc[c][1]) + (acc[c][2] + acc[c][3]);
      double v = 0.0;
      for (int k = 0; k < kV / 2; ++k) v += t[k];
      sumsq[c] += v;
    }
  }
};

// The MLP's weights as vectors, broadcast once per call, so that each multiply-add of the
// block loop is one fused load+FMA.
struct Wide {
  int channels, hidden_layers, out;
  VF w0[kMaxChannels * 8];
  VF hw[kMaxLayers][64], hb[kMaxLayers][8];
  VF ow[16], ob[2];
};

inline void widen(const Mlp& m, Wide& w) {
  w.channels = m.channels;
  w.hidden_layers = m.hidden_layers;
  w.out = m.out;
  for (int i = 0; i < m.channels * 8; ++i) w.w0[i] = splat(m.w0[i]);
  for (int l = 0; l < m.hidden_layers; ++l) {
    for (int i = 0; i < 64; ++i) w.hw[l][i] = splat(m.hw[l][i]);
    for (int o = 0; o < 8; ++o) w.hb[l][o] = splat(m.hb[l][o]);
  }
  for (int c = 0; c < 8; ++c) {
    w.ow[c] = splat(m.ow[c * m.out + 0]);
    w.ow[8 + c] = splat(m.ow[c * m.out + 1]);
  }
  w.ob[0] = splat(m.ob[0]);
  w.ob[1] = splat(m.ob[1]);
}

// The network on one block of two vectors, all in registers: 16 accumulator chains (one
// per hidden unit and half-block) hide the FMA latency. Needs 32 vector registers
// (AVX-512); with 16 the hidden layer's inputs and outputs do not fit and GCC spills about
// one load or store per two FMAs, so narrower vectors take net_staged below. Each lane's
// operations are the same in both forms, in the same order: the same bits.
template <int S, int kCh>
inline void net_registers(const Wide& w, bool mag_out, const float* __restrict f,
                          const float* __restrict bias, int64_t bias_stride, const VF* row,
                          VF* d, VF* g) {
  VF a0[8], a1[8];
  if (row) {
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      a0[o] = row[o] + vload(bias + o * bias_stride);
      a1[o] = row[o] + vload(bias + o * bias_stride + kV);
    }
  } else {
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      a0[o] = vload(bias + o * bias_stride);
      a1[o] = vload(bias + o * bias_stride + kV);
    }
  }
  const int channels = kCh > 0 ? kCh : w.channels;
#pragma GCC unroll 18
  for (int c = 0; c < channels; ++c) {
    const VF x0 = vload(f + c * S), x1 = vload(f + c * S + kV);
    const VF* wc = w.w0 + c * 8;
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      const VF wv = reuse(wc[o]);
      a0[o] += wv * x0;
      a1[o] += wv * x1;
    }
  }
  for (int l = 0; l < w.hidden_layers; ++l) {
    VF b0[8], b1[8];
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      a0[o] = relu(a0[o]);
      a1[o] = relu(a1[o]);
      b0[o] = b1[o] = w.hb[l][o];
    }
    // Four outputs at a time, so that each weight fits a register beside the 16 inputs.
#pragma GCC unroll 2
    for (int h = 0; h < 8; h += 4)
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c)
#pragma GCC unroll 4
        for (int o = h; o < h + 4; ++o) {
          const VF wv = reuse(w.hw[l][c * 8 + o]);
          b0[o] += wv * a0[c];
          b1[o] += wv * a1[c];
        }
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      a0[o] = b0[o];
      a1[o] = b1[o];
    }
  }
  // The magnitude output only where it is used (exp or its sum).
  VF d0 = w.ob[0], g0 = w.ob[1], d1 = w.ob[0], g1 = w.ob[1];
  if (mag_out) {
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const VF h0 = relu(a0[c]), h1 = relu(a1[c]);
      d0 += w.ow[c] * h0;
      g0 += w.ow[8 + c] * h0;
      d1 += w.ow[c] * h1;
      g1 += w.ow[8 + c] * h1;
    }
  } else {
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const VF wv = reuse(w.ow[c]);
      d0 += wv * relu(a0[c]);
      d1 += wv * relu(a1[c]);
    }
  }
  d[0] = d0;
  d[1] = d1;
  g[0] = g0;
  g[1] = g1;
}

// One layer of net_staged: out[o·kBlk + lane] = relu(init(o, v) + Σ_c w[c·8 + o]·x[c·X + lane]),
// four outputs at a time for both vectors of the block (8 accumulator chains, the two inputs
// and one weight: 11 registers), c in increasing order. kIn: the input count when known at
// compile time (unrolled), else 0 and `inputs`.
template <int kIn, int X, class Init>
inline void staged_layer(const VF* __restrict w, int inputs, const float* __restrict x, Init init,
                         float* __restrict out) {
  const int n = kIn > 0 ? kIn : inputs;
#pragma GCC unroll 2
  for (int q = 0; q < 8; q += 4) {
    VF a0[4], a1[4];
#pragma GCC unroll 4
    for (int o = 0; o < 4; ++o) {
      a0[o] = init(q + o, 0);
      a1[o] = init(q + o, 1);
    }
#pragma GCC unroll 18
    for (int c = 0; c < n; ++c) {
      const VF x0 = vload(x + c * X), x1 = vload(x + c * X + kV);
      const VF* wc = w + c * 8 + q;
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) {
        const VF wv = reuse(wc[o]);
        a0[o] += wv * x0;
        a1[o] += wv * x1;
      }
    }
#pragma GCC unroll 4
    for (int o = 0; o < 4; ++o) {
      vstore(out + (q + o) * kBlk, relu(a0[o]));
      vstore(out + (q + o) * kBlk + kV, relu(a1[o]));
    }
    // The second four outputs load the inputs again: without this GCC keeps the first
    // four's loads and spills each to the stack, a store per input vector.
    asm volatile("" ::: "memory");
  }
}

// The network on one block with 16 vector registers (AVX2, SSE): each layer is a
// staged_layer, whose activations, after relu, go to a small buffer in L1 that the next layer
// reads; four outputs at a time read each input twice, against the spills of net_registers.
template <int S, int kCh>
inline void net_staged(const Wide& w, bool mag_out, const float* __restrict f,
                       const float* __restrict bias, int64_t bias_stride, const VF* row, VF* d,
                       VF* g) {
  alignas(64) float hbuf[2][8 * kBlk];
  float* cur = hbuf[0];
  staged_layer<kCh, S>(w.w0, w.channels, f, [&](int o, int v) {
    const VF b = vload(bias + o * bias_stride + v * kV);
    return row ? row[o] + b : b;
  }, cur);
  for (int l = 0; l < w.hidden_layers; ++l) {
    float* nxt = cur == hbuf[0] ? hbuf[1] : hbuf[0];
    staged_layer<8, kBlk>(w.hw[l], 8, cur, [&](int o, int) { return w.hb[l][o]; }, nxt);
    cur = nxt;
  }
  VF d0 = w.ob[0], g0 = w.ob[1], d1 = w.ob[0], g1 = w.ob[1];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    const VF h0 = vload(cur + c * kBlk), h1 = vload(cur + c * kBlk + kV);
    d0 += w.ow[c] * h0;
    d1 += w.ow[c] * h1;
    if (mag_out) {
      g0 += w.ow[8 + c] * h0;
      g1 += w.ow[8 + c] * h1;
    }
  }
  d[0] = d0;
  d[1] = d1;
  g[0] = g0;
  g[1] = g1;
}

// Σ u² of the blocks mlp_core wrote (Mlp::out_sumsq): full blocks in double vector lanes,
// a partial block's elements one by one; total() adds the lanes once at the end.
struct OutSq {
  VD acc{};
  double tail = 0.0;
  void add(const float* u, int cnt) {
    if (cnt == kBlk) {
      constexpr int H = kV / 2;
      const VD x0 = vload_d(u), x1 = vload_d(u + H), x2 = vload_d(u + 2 * H), x3 = vload_d(u + 3 * H);
      acc += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3);
    } else {
      for (int j = 0; j < cnt; ++j) tail += static_cast<double>(u[j]) * u[j];
    }
  }
  double total() const {
    double v = 0.0;
    for (int k = 0; k < kV / 2; ++k) v += acc[k];
    return v + tail;
  }
};

// The MLP on one block; f[c * S + j] its features, bias[o * S + j] the first-layer bias of
// each lane (the layer's own bias plus the folded table channels of its row and column).
// bias_stride: bias[o * bias_stride + j] (default S); row: when set, row[o] + bias (a wide
// matrix's per-row bias plus its per-column one, added here instead of stored per block).
// kCh: the channel count when known at compile time (the first layer fully unrolled), else 0.
template <int S = kBlk, int kCh = 0>
inline void mlp_core(const Mlp& m, const Wide& w, const float* __restrict f,
                     const float* __restrict bias, int cnt, float* __restrict u,
                     double* mag_sum, int64_t bias_stride = S, const VF* row = nullptr,
                     OutSq* osq = nullptr) {
  static_assert(kBlk == 2 * kV, "the networks below take a block as two vectors");
  alignas(64) float dir[kBlk], mag[kBlk];
  const bool mag_out = m.use_exp || m.want_mag;
  VF d[2], g[2];
  if constexpr (kV >= 16)
    net_registers<S, kCh>(w, mag_out, f, bias, bias_stride, row, d, g);
  else
    net_staged<S, kCh>(w, mag_out, f, bias, bias_stride, row, d, g);
  const VF d0 = d[0], d1 = d[1], g0 = g[0], g1 = g[1];
  if (cnt == kBlk && !m.use_exp) {
    vstore(u, d0);
    vstore(u + kV, d1);
  } else {
    vstore(dir, d0);
    vstore(dir + kV, d1);
    if (m.use_exp) {
      vstore(mag, g0);
      vstore(mag + kV, g1);
      const float em = m.exp_mult;
#pragma omp simd
      for (int j = 0; j < kBlk; ++j) dir[j] *= ew::magnitude(mag[j], em);
      for (int j = 0; j < cnt; ++j) u[j] = dir[j];
    } else {
      for (int j = 0; j < cnt; ++j) u[j] = dir[j];
    }
  }
  if (osq) osq->add(u, cnt);
  if (m.want_mag) {
    vstore(mag, g0);
    vstore(mag + kV, g1);
    double s = 0.0;
    for (int j = 0; j < cnt; ++j) s += mag[j];
    *mag_sum += s;
  }
}

// Walk the slice's row segments of a matrix in blocks that stay inside one row.
template <class F>
inline void for_row_blocks(const Elems& e, int64_t cols, F fn) {
  int64_t i = e.lo;
  while (i < e.hi) {
    const int64_t a = i / cols, j0 = i - a * cols;
    const int64_t j1 = j0 + (e.hi - i) < cols ? j0 + (e.hi - i) : cols;
    for (int64_t j = j0; j < j1; j += kBlk) fn(a, j, static_cast<int>(j1 - j < kBlk ? j1 - j : kBlk));
    i += j1 - j0;
  }
}

// The six table-dependent channels of a matrix block (table_2d, as element_2d forms them)
// into f[c * S + jj], zeros up to kBlk.
template <bool kColVaries, int S, int N>
inline void fill_2d_table_n(const Elems& e, const Matrix& mx, int64_t a, int64_t j, int cnt,
                            float* __restrict f) {
  if (N > 0) cnt = N;
  const RowTables t = row_tables(mx, a, j);
  const float *fs = t.fs, *fsh = t.fsh;
  const int64_t vn = t.vn;
  const float* __restrict vs = t.vs;
  const float* __restrict vsh = t.vsh;
  const int64_t li0 = a * mx.cols + j - e.lo, P = e.plane;
  const float* __restrict gp = e.g + li0;
  const float* __restrict m0 = e.m + li0;
  const float b0 = e.bc_mom[0], b1 = e.bc_mom[1], b2 = e.bc_mom[2];
  if (N > 0 && e.prefetch)
    for (int h = 0; h < N; h += kLine) prefetch_read(gp + h, m0 + h, m0 + P + h, m0 + 2 * P + h);
#pragma omp simd
  for (int jj = 0; jj < cnt; ++jj) {
    const float g = ew::clip_grad(gp[jj]);
    const float mh0 = m0[jj] * b0, mh1 = m0[P + jj] * b1, mh2 = m0[2 * P + jj] * b2;
    table_2d<kColVaries, S>(g, mh0, mh1, mh2, fs[0], fs[1], fs[2], fsh[0], fsh[1], fsh[2], vs[jj],
                            vs[vn + jj], vs[2 * vn + jj], vsh[jj], vsh[vn + jj], vsh[2 * vn + jj], f + jj,
                            f + 3 * S + jj);
  }
  if (N == 0) zero_lanes<S>(f, 6, cnt, kBlk);
}

template <bool kColVaries, int S>
inline void fill_2d_table(const Elems& e, const Matrix& mx, int64_t a, int64_t j, int cnt,
                          float* __restrict f) {
  if (cnt == kBlk)
    fill_2d_table_n<kColVaries, S, kBlk>(e, mx, a, j, cnt, f);
  else
    fill_2d_table_n<kColVaries, S, 0>(e, mx, a, j, cnt, f);
}

// The six table-dependent channels' squares of a wide matrix slice (phase 1 added the rest).
template <bool kColVaries>
void sumsq_2d_table_t(const Elems& e, const Matrix& mx, double* sumsq) {
  alignas(64) float f[6 * kChunkStride];
  SquareSums<6> sq;
  int len = 0;
  for_row_blocks(e, mx.cols, [&](int64_t a, int64_t j, int cnt) {
    fill_2d_table<kColVaries, kChunkStride>(e, mx, a, j, cnt, f + len);
    len += kBlk;
    if (len == kChunk) {
      sq.add(f, len);
      len = 0;
    }
  });
  if (len) sq.add(f, len);
  sq.flush(sumsq);
}

template <bool kColVaries>
void sumsq_2d_t(const Elems& e, const Matrix& mx, double* sumsq) {
  alignas(64) float f[kElem2d * kChunkStride];
  SquareSums<kElem2d> sq;
  int len = 0;
  auto filled = [&]() {
    len += kBlk;
    if (len == kChunk) {
      sq.add(f, len);
      len = 0;
    }
  };
  if (mx.cols >= kBlk) {
    for_row_blocks(e, mx.cols, [&](int64_t a, int64_t j, int cnt) {
      fill_2d<kColVaries, kChunkStride>(e, mx, a, j, cnt, f + len);
      filled();
    });
  } else {
    // Narrower than a block: whole chunks of consecutive elements across rows.
    for (int64_t li = 0; li < e.hi - e.lo; li += kChunk) {
      const int n = static_cast<int>(e.hi - e.lo - li < kChunk ? e.hi - e.lo - li : kChunk);
      sq.add(f, fill_2d_run<kColVaries, kChunkStride>(e, mx, li, n, f, [](int64_t, int64_t, int, int) {}));
    }
  }
  if (len) sq.add(f, len);
  sq.flush(sumsq);
}

// A block's first-layer biases when they are the same for every lane.
inline void splat_bias(const float* b, float* bias) {
  for (int o = 0; o < 8; ++o) {
    vstore(bias + o * kBlk, splat(b[o]));
    vstore(bias + o * kBlk + kV, splat(b[o]));
  }
}

template <bool kColVaries>
void mlp_2d_t(const Elems& e, const Matrix& mx, const Mlp& m, double* mag_sum) {
  alignas(64) float f[kElem2d * kBlk];
  Wide w;
  widen(m, w);
  OutSq out;
  OutSq* osq = m.out_sumsq ? &out : nullptr;
  if (mx.cols >= kBlk) {
    VF row[8];
    int64_t row_of = -1;
    for_row_blocks(e, mx.cols, [&](int64_t a, int64_t j, int cnt) {
      fill_2d<kColVaries, kBlk>(e, mx, a, j, cnt, f);
      if (a != row_of) {  // the row's first-layer biases, splat once per row segment
        const float* rb = m.row_bias + (a - m.row0) * m.row_bias_stride;
        for (int o = 0; o < 8; ++o) row[o] = splat(rb[o]);
        row_of = a;
      }
      float* u = e.u + (a * mx.cols + j - e.lo);
      if (e.prefetch)
        for (int h = 0; h < kBlk; h += kLine) prefetch_write(u + h);
      mlp_core<kBlk, kElem2d>(m, w, f, m.col_bias + j, cnt, u, mag_sum, m.col_stride, row, osq);
    });
  } else {
    // Narrower than a block: a chunk of consecutive elements across rows at a time, features
    // and biases built one row segment at a time, then the MLP on its blocks.
    alignas(64) float fc[kElem2d * kChunkStride];
    alignas(64) float bc[8 * kChunkStride];
    for (int64_t li = 0; li < e.hi - e.lo; li += kChunk) {
      const int n = static_cast<int>(e.hi - e.lo - li < kChunk ? e.hi - e.lo - li : kChunk);
      const int len = fill_2d_run<kColVaries, kChunkStride>(e, mx, li, n, fc, [&](int64_t a, int64_t j, int cnt, int k) {
        const float* rb = m.row_bias + (a - m.row0) * m.row_bias_stride;
        for (int o = 0; o < 8; ++o) {
          const float r = rb[o];
          const float* __restrict cb = m.col_bias + o * m.col_stride + j;
          float* __restrict b = bc + o * kChunkStride + k;
#pragma omp simd
          for (int jj = 0; jj < cnt; ++jj) b[jj] = r + cb[jj];
        }
      });
      zero_lanes<kChunkStride>(bc, 8, n, len);
      for (int k = 0; k < len; k += kBlk)
        mlp_core<kChunkStride, kElem2d>(m, w, fc + k, bc + k, n - k < kBlk ? n - k : kBlk,
                               e.u + li + k, mag_sum, kChunkStride, nullptr, osq);
    }
  }
  if (osq) *m.out_sumsq += out.total();
}

void sumsq_2d(const Elems& e, const Matrix& mx, bool table_only, double* sumsq) {
  if (table_only) {
    if (mx.col_varies)
      sumsq_2d_table_t<true>(e, mx, sumsq);
    else
      sumsq_2d_table_t<false>(e, mx, sumsq);
  } else if (mx.col_varies) {
    sumsq_2d_t<true>(e, mx, sumsq);
  } else {
    sumsq_2d_t<false>(e, mx, sumsq);
  }
}

void mlp_2d(const Elems& e, const Matrix& mx, const Mlp& m, double* mag_sum) {
  if (mx.col_varies)
    mlp_2d_t<true>(e, mx, m, mag_sum);
  else
    mlp_2d_t<false>(e, mx, m, mag_sum);
}

void sumsq_1d(const Elems& e, double* sumsq) {
  alignas(64) float f[kElem1d * kChunkStride];
  SquareSums<kElem1d> sq;
  int len = 0;
  for (int64_t i = e.lo; i < e.hi; i += kBlk) {
    const int cnt = static_cast<int>(e.hi - i < kBlk ? e.hi - i : kBlk);
    fill_1d<kChunkStride>(e, i - e.lo, cnt, f + len);
    len += kBlk;
    if (len == kChunk) {
      sq.add(f, len);
      len = 0;
    }
  }
  if (len) sq.add(f, len);
  sq.flush(sumsq);
}

void mlp_1d(const Elems& e, const Mlp& m, double* mag_sum) {
  alignas(64) float f[kElem1d * kBlk];
  alignas(64) float bias[8 * kBlk];
  Wide w;
  widen(m, w);
  splat_bias(m.row_bias, bias);
  OutSq out;
  OutSq* osq = m.out_sumsq ? &out : nullptr;
  for (int64_t i = e.lo; i < e.hi; i += kBlk) {
    const int cnt = static_cast<int>(e.hi - i < kBlk ? e.hi - i : kBlk);
    fill_1d<kBlk>(e, i - e.lo, cnt, f);
    float* u = e.u + (i - e.lo);
    if (e.prefetch)
      for (int h = 0; h < kBlk; h += kLine) prefetch_write(u + h);
    mlp_core<kBlk, kElem1d>(m, w, f, bias, cnt, u, mag_sum, kBlk, nullptr, osq);
  }
  if (osq) *m.out_sumsq += out.total();
}

void mlp_block(const Mlp& m, const float* f, int cnt, float* u, double* mag_sum) {
  constexpr int kIn = 16;  // rule_cpu.cc's block
  Wide w;
  widen(m, w);
  alignas(64) float x[kMaxChannels * kBlk];
  alignas(64) float bias[8 * kBlk];
  splat_bias(m.row_bias, bias);
  for (int j0 = 0; j0 < cnt; j0 += kBlk) {
    const int n = cnt - j0 < kBlk ? cnt - j0 : kBlk;
    for (int c = 0; c < m.channels; ++c)
      for (int j = 0; j < kBlk; ++j) x[c * kBlk + j] = j < n ? f[c * kIn + j0 + j] : 0.0f;
    mlp_core(m, w, x, bias, n, u + j0, mag_sum);
  }
}

// ---- Phase 1 with the element-local channels' squares ----
//
// One pass updates the state in place and squares the input channels that need nothing but
// the element's new state, from registers (the features phase 3 would otherwise rebuild from
// memory). The channels are the fills' operations in their order on the same floats, so the
// squares are those of the features the MLP pass sees. A tail of fewer than kV elements runs
// the same vector code on zero-padded copies, its padded lanes' channels multiplied by 0.

struct AccumV {
  VF bm[3], om[3], br, orr, bf[3], of[3], bc[3], bcr;
};

inline AccumV accum_v(const Accum& a) {
  AccumV v;
  for (int k = 0; k < 3; ++k) {
    v.bm[k] = splat(a.beta_mom[k]);
    v.om[k] = splat(1.0f - a.beta_mom[k]);
    v.bf[k] = splat(a.beta_fac[k]);
    v.of[k] = splat(1.0f - a.beta_fac[k]);
    v.bc[k] = splat(a.bc_mom[k]);
  }
  v.br = splat(a.beta_rms);
  v.orr = splat(1.0f - a.beta_rms);
  v.bcr = splat(a.bc_rms);
  return v;
}

// acc += both halves of x squared, in double.
// A vector's two halves widened to doubles. With AVX2, in registers (one extract, two
// conversions) instead of a store and two converting loads: phase 1 widens 12 to 15 channels
// per vector, and with 16 registers its accumulators already live in memory; measured on a
// Zen 4 (docs/PERF.md, 2026-12-02), phase 1 of a 64K 1-D tensor in cache 3.9-4.3 -> 2.9-4.1
// ns per element. The AVX-512 copy keeps the store and loads, which measured no slower there
// (1.5-1.6 against 1.6-1.9 ns at 128x512).
inline void widen_halves(VF x, VD& lo, VD& hi) {
#if defined(__AVX__) && !defined(__AVX512F__)
  const __m256 v = reinterpret_cast<__m256>(x);
  lo = reinterpret_cast<VD>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = reinterpret_cast<VD>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
  alignas(64) float t[kV];
  vstore(t, x);
  lo = vload_d(t);
  hi = vload_d(t + kV / 2);
#endif
}

inline void add_sq(VD& acc, VF x) {
  VD d0, d1;
  widen_halves(x, d0, d1);
  acc += d0 * d0;
  acc += d1 * d1;
}

// One vector of elements: g, p, m0..m2, r (and vd0..vd2 for 1-D) at their pointers; the new
// state stored back; the channels' squares into acc (15 for 1-D, kLocal2d for a matrix),
// multiplied by keep first when kMasked. Returns q = g² + 1e-30. prefetch: also prefetch the
// streams ahead (the callers ask once per cache line: every vector of 16 floats, every 16
// elements with narrower vectors).
template <bool k1d, bool kMasked>
inline VF accum_vec(const AccumV& c, const float* gp, const float* pp, float* m0, float* m1, float* m2,
                    float* rr, float* vd0, float* vd1, float* vd2, VF keep, VD* acc,
                    bool prefetch = false) {
  const VF gc = splat(ew::kGradClip), one = splat(1.0f), qe = splat(ew::kQEps);
  if (!kMasked && prefetch) {  // the callers ask once per 64-byte line
    prefetch_read(gp, pp);
    prefetch_write(m0, m1, m2, rr);
    if constexpr (k1d) prefetch_write(vd0, vd1, vd2);
  }
  const VF g = clampv(vload(gp), -gc, gc);
  const VF n0 = c.bm[0] * vload(m0) + c.om[0] * g;
  const VF n1 = c.bm[1] * vload(m1) + c.om[1] * g;
  const VF n2 = c.bm[2] * vload(m2) + c.om[2] * g;
  const VF nr = c.br * vload(rr) + c.orr * (g * g);
  vstore(m0, n0);
  vstore(m1, n1);
  vstore(m2, n2);
  vstore(rr, nr);
  const VF q = g * g + qe;
  VF f[15];
  const VF rho = local_channels(g, vload(pp), n0, n1, n2, nr, c.bc, c.bcr, f);
  int k = 11;
  if constexpr (k1d) {
    const VF fl = splat(ew::kSafeFloor);
    float* vd[3] = {vd0, vd1, vd2};
    for (int j = 0; j < 3; ++j) {
      const VF nv = c.bf[j] * vload(vd[j]) + c.of[j] * q;
      vstore(vd[j], nv);
      f[k++] = g * (one / simd::vsqrt(simd::vmax(nv + fl, fl)));
    }
  }
  f[k++] = g * rho;
  for (int x = 0; x < k; ++x) add_sq(acc[x], kMasked ? f[x] * keep : f[x]);
  return q;
}

inline void flush_sq(const VD* acc, int channels, double* sumsq) {
  for (int c = 0; c < channels; ++c) {
    double v = 0.0;
    for (int k = 0; k < kV / 2; ++k) v += acc[c][k];
    sumsq[c] += v;
  }
}

// Elements [i, i + n), n < kV, through accum_vec on zero-padded copies; returns q's lanes in qt.
template <bool k1d>
inline void accum_tail(const AccumV& c, const Accum& a, int64_t i, int n, VD* acc, float* qt) {
  alignas(64) float buf[10][kV] = {};
  const int64_t P = a.plane;
  const float* src[10] = {a.g + i, a.p + i, a.m + i, a.m + P + i, a.m + 2 * P + i, a.rms + i,
                          k1d ? a.v_diag + i : nullptr, k1d ? a.v_diag + P + i : nullptr,
                          k1d ? a.v_diag + 2 * P + i : nullptr, nullptr};
  const int arrays = k1d ? 9 : 6;
  for (int x = 0; x < arrays; ++x) std::memcpy(buf[x], src[x], n * sizeof(float));
  alignas(64) float keep[kV];
  for (int j = 0; j < kV; ++j) keep[j] = j < n ? 1.0f : 0.0f;
  const VF q = accum_vec<k1d, true>(c, buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8],
                                    vload(keep), acc);
  vstore(qt, q);
  float* dst[9] = {nullptr, nullptr, a.m + i, a.m + P + i, a.m + 2 * P + i, a.rms + i,
                   k1d ? a.v_diag + i : nullptr, k1d ? a.v_diag + P + i : nullptr,
                   k1d ? a.v_diag + 2 * P + i : nullptr};
  for (int x = 2; x < arrays; ++x) std::memcpy(dst[x], buf[x], n * sizeof(float));
}

void accumulate_1d(const Accum& a, int64_t n, double* sumsq) {
  const AccumV c = accum_v(a);
  VD acc[15] = {};
  alignas(64) float qt[kV];
  const int64_t P = a.plane;
  int64_t i = 0;
  for (; i + kV <= n; i += kV)
    accum_vec<true, false>(c, a.g + i, a.p + i, a.m + i, a.m + P + i, a.m + 2 * P + i, a.rms + i, a.v_diag + i,
                           a.v_diag + P + i, a.v_diag + 2 * P + i, VF{}, acc,
                           a.prefetch && (kV >= kLine || i % kLine == 0));
  if (i < n) accum_tail<true>(c, a, i, static_cast<int>(n - i), acc, qt);
  flush_sq(acc, 15, sumsq);
}

double accumulate_row(const Accum& a, int64_t n, double* col_q, double* sumsq) {
  const AccumV c = accum_v(a);
  VD acc[kLocal2d] = {};
  VD row = {};
  alignas(64) float qt[kV];
  const int64_t P = a.plane;
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    const VF q = accum_vec<false, false>(c, a.g + i, a.p + i, a.m + i, a.m + P + i, a.m + 2 * P + i,
                                         a.rms + i, nullptr, nullptr, nullptr, VF{}, acc,
                                         a.prefetch && (kV >= kLine || i % kLine == 0));
    VD half[2];
    widen_halves(q, half[0], half[1]);
    for (int hh = 0; hh < kV; hh += kV / 2) {
      const VD d = half[hh / (kV / 2)];
      VD cq;
      std::memcpy(&cq, col_q + i + hh, sizeof cq);
      cq += d;
      std::memcpy(col_q + i + hh, &cq, sizeof cq);
      row += d;
    }
  }
  double tail = 0.0;
  if (i < n) {
    const int left = static_cast<int>(n - i);
    accum_tail<false>(c, a, i, left, acc, qt);
    for (int j = 0; j < left; ++j) {
      const double d = qt[j];
      col_q[i + j] += d;
      tail += d;
    }
  }
  flush_sq(acc, kLocal2d, sumsq);
  double s = 0.0;
  for (int k = 0; k < kV / 2; ++k) s += row[k];
  return s + tail;
}

}  // namespace

extern const Kernels table;
const Kernels table = {kName, accumulate_1d, accumulate_row, sumsq_2d, sumsq_1d, mlp_2d, mlp_1d, mlp_block};

}  // namespace celo2::fast::CELO2_ISA_NS
