// The host-side layout test of the CUDA backend (kernels/cuda), run on any machine: no GPU,
// no nvcc, no CUDA headers.
//
// HostRuleSet below emulates cuda::RuleSet::step(): it builds the descriptor table, chunks,
// axis jobs, group runs and spans with the very code RuleSet uses
// (kernels/cuda/src: rule_layout.h), allocates the set's buffers with the sizes RuleSet allocates,
// and runs the kernels' per-element __host__ __device__ functions (rule_device.h)
// in plain host loops, kernel by kernel, in rule_cuda.cu's launch order:
//   k_accumulate · k_axis_contig/k_axis_strided + k_axis_combine · k_factored (fold, rest,
//   tables) · k_feature_sumsq + k_group_combine · k_mlp<H> (padded, packed weights as in
//   shared memory) · k_tensor_factor · Newton–Schulz (run_gathered: norm, load with the
//   factor, the GEMM plan of newton_schulz_plan.h through a host GEMM with
//   cuBLAS's column-major semantics, store) · k_output_sumsq + k_group_combine · k_finish.
// Each work item is indexed exactly as its kernel indexes it (find_span over the tables, the
// same base-pointer arithmetic); only the order of additions inside a reduction differs
// (plain double sums here, warp shuffles there), which is below float resolution.
//
// Every scratch buffer is refilled with NaN before each step and every buffer has a NaN guard
// band on both sides that must stay untouched: reading an entry the step did not write, or
// writing outside a buffer, shows up as a NaN or a failed guard check.
//
// Tolerances (checked per tensor and step):
//  - the step u vs celo2_update() (the CPU fast path, float32 too): max|err| / RMS(expected)
//    <= 1e-5 (kStepTol);
//  - u vs celo2_reference() (double precision): <= 1e-4 (kRefTol), the spec's §8 bound for a
//    float32 implementation against a double one (Newton–Schulz and relu kinks amplify
//    float rounding), the same bound rule_test.cc holds the fast path to;
//  - the state (m, rms, v_row, v_col, v_diag) vs celo2_update(): max|err| / RMS(expected)
//    <= 1e-6 (kStateTol), and vs celo2_reference() likewise;
//  - the padded MLP (hidden 8/16/32/64) vs the unpadded one: bit for bit;
//  - the Newton–Schulz GEMM plan vs celo2::newton_schulz(): <= 1e-5.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "unit/test_util.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"
// The CUDA kernels' private host-only headers (kernels/cuda/src/, on this test's include path).
#include "newton_schulz_plan.h"
#include "rule_layout.h"

namespace celo2 {
namespace {

using test_util::randn;
using test_util::rel_err;

using cuda::AxisJob;
using cuda::Chunk;
using cuda::GroupRun;
using cuda::SetBuffers;
using cuda::SetLayout;
using cuda::Span;
using cuda::TensorDesc;

constexpr double kStepTol = 1e-5;
constexpr double kRefTol = 1e-4;
constexpr double kStepTolNs = 1e-4;
constexpr double kStateTol = 1e-6;
constexpr double kStateRefTol = 1e-5;
constexpr double kNsTol = 1e-5;
constexpr double kNsPlanTol = 1e-6;



// A device-buffer stand-in: n elements with a guard band of NaN on both sides.
template <class T>
struct Guarded {
  static constexpr size_t kGuard = 64;
  std::vector<T> v;
  size_t n = 0;
  static T poison() {
    T x;
    std::memset(&x, 0xff, sizeof x);  // all-ones: a NaN for float, double and FacEntry's floats
    return x;
  }
  void alloc_zero(int64_t count) {
    n = static_cast<size_t>(std::max<int64_t>(count, 0));
    v.assign(n + 2 * kGuard, poison());
    for (size_t i = 0; i < n; ++i) std::memset(&v[kGuard + i], 0, sizeof(T));
  }
  void fill_poison() {
    for (size_t i = 0; i < n; ++i) v[kGuard + i] = poison();
  }
  T* ptr() { return v.data() + kGuard; }
  bool guards_intact() const {
    const T p = poison();
    for (size_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&v[i], &p, sizeof(T)) != 0 || std::memcmp(&v[kGuard + n + i], &p, sizeof(T)) != 0)
        return false;
    return true;
  }
};

// cublasSgemmStridedBatched on the host: column-major, C = alpha op(A) op(B) + beta C, with
// cuBLAS's argument checks and a check that every matrix fits its batch stride.
template <class T>
void host_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const T* A, int lda,
               long long sa, const T* B, int ldb, long long sb, float beta, T* C, int ldc,
               long long sc, int batch) {
  ASSERT_GE(m, 0);
  ASSERT_GE(n, 0);
  ASSERT_GE(k, 0);
  ASSERT_GE(lda, std::max(1, ta ? k : m)) << "lda";
  ASSERT_GE(ldb, std::max(1, tb ? n : k)) << "ldb";
  ASSERT_GE(ldc, std::max(1, m)) << "ldc";
  auto footprint = [](int rows, int cols, int ld) {
    return static_cast<long long>(cols - 1) * ld + rows;
  };
  if (batch > 1) {
    ASSERT_LE(footprint(ta ? k : m, ta ? m : k, lda), sa) << "A overlaps the next matrix";
    ASSERT_LE(footprint(tb ? n : k, tb ? k : n, ldb), sb) << "B overlaps the next matrix";
    ASSERT_LE(footprint(m, n, ldc), sc) << "C overlaps the next matrix";
  }
  std::vector<T> out(static_cast<size_t>(m) * n);
  for (int bt = 0; bt < batch; ++bt) {
    const T* Ab = A + bt * sa;
    const T* Bb = B + bt * sb;
    T* Cb = C + bt * sc;
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        double acc = 0.0;
        for (int l = 0; l < k; ++l) {
          const double a = ta ? Ab[l + static_cast<int64_t>(i) * lda] : Ab[i + static_cast<int64_t>(l) * lda];
          const double b = tb ? Bb[j + static_cast<int64_t>(l) * ldb] : Bb[l + static_cast<int64_t>(j) * ldb];
          acc += a * b;
        }
        const double c0 = beta == 0.0f ? 0.0 : static_cast<double>(Cb[i + static_cast<int64_t>(j) * ldc]);
        out[static_cast<size_t>(j) * m + i] = static_cast<T>(alpha * acc + beta * c0);
      }
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) Cb[i + static_cast<int64_t>(j) * ldc] = out[static_cast<size_t>(j) * m + i];
  }
}

// NewtonSchulzCuda::run_gathered (float32) on the host: per matrix b at x + offsets[b],
// scaled by factors[index[b]] first when factors is not null.
// T: the element type of x and of the work buffers (float as on the device; double to check
// the GEMM plan without float rounding).
template <class T>
void host_ns_gathered(const RuleConfig& cfg, int64_t rows, int64_t cols,
                      const std::vector<int64_t>& offsets, T* x, const float* factors,
                      const std::vector<int32_t>& index) {
  const int64_t batch = static_cast<int64_t>(offsets.size());
  if (rows == 0 || cols == 0 || batch == 0) return;
  const cuda::NsShape shape = cuda::NsShape::of(rows, cols);
  const int64_t rc = shape.rc, rr = shape.rr;
  std::vector<T> work(static_cast<size_t>(batch) * (2 * rc + 2 * rr),
                      std::numeric_limits<T>::quiet_NaN());
  T* X = work.data();
  T* Y = X + batch * rc;
  T* A = Y + batch * rc;
  T* B = A + batch * rr;
  // k_norm_partial + k_norm_final + k_load.
  for (int64_t b = 0; b < batch; ++b) {
    const float f = factors ? factors[index.empty() ? 0 : index[b]] : 1.0f;
    const T* m = x + offsets[b];
    double t = 0.0;
    for (int64_t i = 0; i < rc; ++i) {
      const T v = factors ? m[i] * f : m[i];
      t += static_cast<double>(v) * v;
    }
    const T scale = static_cast<T>(1.0 / (std::sqrt(t) + static_cast<double>(cfg.ns_eps)));
    for (int64_t e = 0; e < rc; ++e) {
      T v = m[e];
      if (factors) v *= f;
      X[b * rc + e] = v * scale;
    }
  }
  auto gemm = [](bool ta, bool tb, int m, int n, int k, float alpha, const T* A_, int lda,
                 long long sa, const T* B_, int ldb, long long sb, float beta, T* C_,
                 int ldc, long long sc, int bt) {
    host_gemm<T>(ta, tb, m, n, k, alpha, A_, lda, sa, B_, ldb, sb, beta, C_, ldc, sc, bt);
  };
  auto copy = [](T* dst, const T* src, size_t count) {
    std::memcpy(dst, src, count * sizeof(T));
  };
  for (int it = 0; it < cfg.ns_iters; ++it) {
    cuda::ns_iteration<T>(shape, static_cast<int>(batch), cfg.ns_coeffs[0], cfg.ns_coeffs[1],
                              cfg.ns_coeffs[2], X, Y, A, B, gemm, copy);
    std::swap(X, Y);
  }
  // k_store.
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t e = 0; e < rc; ++e) x[offsets[b] + e] = X[b * rc + e];
}

// k_mlp<H> for one chunk's elements on the host, on a copy of the packed weights as the
// kernel keeps them in shared memory.
template <int H>
void host_mlp_chunk(const TensorDesc& t, const Chunk& ch, const StepConstants& sc,
                    const SetBuffers& b, const std::vector<float>& packed, int hidden_layers,
                    bool relu, bool normalize_input, bool use_exp, bool aggregate_mag,
                    float exp_mult, double* mag_out) {
  auto act = [relu](float x) { return relu ? std::fmax(x, 0.0f) : std::tanh(x); };
  const int C = t.factored ? kChannels : kChannels1d;
  std::vector<float> sm(packed);
  EXPECT_EQ(static_cast<int64_t>(sm.size()), cuda::packed_theta_floats(H, hidden_layers));
  if (normalize_input)
    for (int k = 0; k < C * H; ++k) {
      const int c = k / H;
      sm[k] *= cuda::input_norm_scale(b.sumsq[t.sumsq_off + ch.group * C + c], t.norm_size);
    }
  const float* w0 = sm.data();
  const float* b0 = w0 + kChannels * H;
  const float* hidden = b0 + H;
  const float* wout = hidden + (hidden_layers - 1) * (H * H + H);
  const float* bout = wout + 2 * H;
  double mag_acc = 0.0;
  float f[kChannels];
  for (int64_t i = ch.lo; i < ch.hi; ++i) {
    cuda::features_of(t, sc, b, i, f);
    float h[H];
    for (int o = 0; o < H; ++o) h[o] = b0[o];
    for (int c = 0; c < C; ++c)
      for (int o = 0; o < H; ++o) h[o] = std::fma(w0[c * H + o], f[c], h[o]);
    for (int l = 0; l < hidden_layers - 1; ++l) {
      const float* w = hidden + l * (H * H + H);
      const float* bb = w + H * H;
      float h2[H];
      for (int o = 0; o < H; ++o) h2[o] = bb[o];
      for (int c = 0; c < H; ++c) {
        const float a = act(h[c]);
        for (int o = 0; o < H; ++o) h2[o] = std::fma(w[c * H + o], a, h2[o]);
      }
      for (int o = 0; o < H; ++o) h[o] = h2[o];
    }
    float dir = bout[0], mag = bout[1];
    for (int c = 0; c < H; ++c) {
      const float a = act(h[c]);
      dir = std::fma(wout[c * 2 + 0], a, dir);
      mag = std::fma(wout[c * 2 + 1], a, mag);
    }
    b.u[t.x_off + i] = use_exp ? dir * ew::magnitude(mag, exp_mult) : dir;
    if (aggregate_mag) mag_acc += mag;
  }
  if (aggregate_mag) *mag_out = mag_acc;
}

// cuda::RuleSet, emulated on the host.
class HostRuleSet {
 public:
  HostRuleSet(const RuleConfig& cfg, const Theta& theta, const std::vector<std::vector<int64_t>>& shapes)
      : cfg_(cfg), theta_(theta), L_(SetLayout::build(cfg, shapes)) {
    H_ = cuda::padded_hidden(theta.hidden());
    packed_ = cuda::pack_theta(theta, H_);
    // The allocations of RuleSet::Impl::build.
    m_.alloc_zero(L_.m);
    rms_.alloc_zero(L_.r);
    vdiag_.alloc_zero(L_.vd);
    vrow_.alloc_zero(L_.vrow);
    vcol_.alloc_zero(L_.vcol);
    rowsum_.alloc_zero(L_.vrow / kFac);
    colsum_.alloc_zero(L_.vcol / kFac);
    rest_.alloc_zero(L_.rest);
    rtab_.alloc_zero(L_.vrow / kFac);
    ctab_.alloc_zero(L_.vcol / kFac);
    sumsq_.alloc_zero(L_.sumsq);
    osumsq_.alloc_zero(L_.osumsq);
    factor_.alloc_zero(static_cast<int64_t>(L_.descs.size()));
    const int64_t nch = static_cast<int64_t>(L_.chunks.size());
    axis_part_.alloc_zero(L_.part);
    chunk_part_.alloc_zero(nch * kChannels);
    mag_part_.alloc_zero(nch);
    p2_part_.alloc_zero(nch);
    buf_.m = m_.ptr();
    buf_.rms = rms_.ptr();
    buf_.vdiag = vdiag_.ptr();
    buf_.vrow = vrow_.ptr();
    buf_.vcol = vcol_.ptr();
    buf_.rowsum = rowsum_.ptr();
    buf_.colsum = colsum_.ptr();
    buf_.rest = rest_.ptr();
    buf_.rtab = rtab_.ptr();
    buf_.ctab = ctab_.ptr();
    buf_.sumsq = sumsq_.ptr();
    buf_.osumsq = osumsq_.ptr();
    buf_.factor = factor_.ptr();
  }

  const SetLayout& layout() const { return L_; }
  // Of the last step: u before Newton–Schulz (times the magnitude factor), and per tensor the
  // largest error of a Newton–Schulz output against newton_schulz() on the same input.
  const std::vector<float>& pre_ns() const { return pre_ns_; }
  double ns_error(size_t i) const { return ns_err_.at(i); }
  int64_t total() const { return L_.total; }
  int64_t offset(size_t i) const { return L_.descs.at(i).x_off; }

  // g, p: total() floats; u: a Guarded buffer of total() floats.
  void step(const float* g, const float* p, float* u) {
    iteration_ += 1;
    if (L_.chunks.empty()) return;
    // Scratch that a step must write before it reads it: poison it.
    for (auto* d : {&rowsum_, &colsum_, &rest_, &sumsq_, &osumsq_, &axis_part_, &chunk_part_,
                    &mag_part_, &p2_part_})
      d->fill_poison();
    rtab_.fill_poison();
    ctab_.fill_poison();
    factor_.fill_poison();
    const StepConstants sc = StepConstants::of(cfg_, iteration_);
    SetBuffers b = buf_;
    b.g = g;
    b.p = p;
    b.u = u;
    const std::vector<TensorDesc>& descs = L_.descs;
    const int64_t nch = static_cast<int64_t>(L_.chunks.size());

    // k_accumulate.
    for (int64_t bi = 0; bi < nch; ++bi) {
      const Chunk ch = L_.chunks[bi];
      const TensorDesc& t = descs[ch.tensor];
      double p2 = 0.0;
      for (int64_t i = ch.lo; i < ch.hi; ++i) {
        cuda::accumulate_element(t, sc, b, i);
        if (cfg_.param_scale_mult) {
          const float pv = b.p[t.x_off + i];
          p2 += static_cast<double>(pv) * pv;
        }
      }
      if (cfg_.param_scale_mult) p2_part_.ptr()[bi] = p2;
    }
    // k_axis_contig: one warp per (output, segment).
    for (int64_t item = 0; item < L_.contig_items; ++item) {
      const int64_t j = cuda::find_span(L_.contig.data(), static_cast<int64_t>(L_.contig.size()), item,
                                        [](const AxisJob& a) { return a.item_begin; });
      const AxisJob job = L_.contig[j];
      const int64_t local = item - job.item_begin;
      const int64_t o = local / job.segs, seg = local - o * job.segs;
      const TensorDesc& t = descs[job.tensor];
      const float* base = g + t.x_off + o * job.len;
      const int64_t lo = seg * cuda::kSegment, hi = std::min(job.len, lo + cuda::kSegment);
      double acc = 0.0;
      for (int64_t x = lo; x < hi; ++x) acc += cuda::q_of(base[x]);
      axis_part_.ptr()[job.part_off + seg * job.n_out + o] = acc;
    }
    axis_combine(L_.contig, L_.contig_out, b);
    // k_axis_strided: one thread per (output, segment).
    for (int64_t item = 0; item < L_.strided_items; ++item) {
      const int64_t j = cuda::find_span(L_.strided.data(), static_cast<int64_t>(L_.strided.size()), item,
                                        [](const AxisJob& a) { return a.item_begin; });
      const AxisJob job = L_.strided[j];
      const int64_t local = item - job.item_begin;
      const int64_t seg = local / job.n_out, o = local - seg * job.n_out;
      const TensorDesc& t = descs[job.tensor];
      const int64_t outer = o / job.stride, inner = o - outer * job.stride;
      const float* base = g + t.x_off + outer * job.len * job.stride + inner;
      const int64_t lo = seg * cuda::kSegment, hi = std::min(job.len, lo + cuda::kSegment);
      double acc = 0.0;
      for (int64_t x = lo; x < hi; ++x) acc += cuda::q_of(base[x * job.stride]);
      axis_part_.ptr()[job.part_off + seg * job.n_out + o] = acc;
    }
    axis_combine(L_.strided, L_.strided_out, b);
    // k_factored, modes 0 (fold), 1 (rest means), 2 (tables).
    if (L_.fold_total) {
      const int64_t ns = static_cast<int64_t>(L_.fold.size());
      for (int mode = 0; mode < 3; ++mode) {
        const std::vector<Span>& spans = mode == 1 ? L_.rest_spans : L_.fold;
        const int64_t total = mode == 1 ? L_.rest_total : L_.fold_total;
        for (int64_t x = 0; x < total; ++x) {
          const int64_t s = cuda::find_span(spans.data(), ns, x, [](const Span& v) { return v.begin; });
          const TensorDesc& t = descs[spans[s].tensor];
          const int64_t local = x - spans[s].begin;
          if (mode == 0)
            cuda::fold_factored_entry(t, sc, b, local);
          else if (mode == 1)
            cuda::rest_mean(t, b, local);
          else
            cuda::build_table_entry(t, sc, b, local);
        }
      }
    }
    // k_feature_sumsq + k_group_combine.
    if (cfg_.normalize_input) {
      float f[kChannels];
      for (int64_t bi = 0; bi < nch; ++bi) {
        const Chunk ch = L_.chunks[bi];
        const TensorDesc& t = descs[ch.tensor];
        const int C = t.factored ? kChannels : kChannels1d;
        double acc[kChannels] = {};
        for (int64_t i = ch.lo; i < ch.hi; ++i) {
          EXPECT_EQ(cuda::features_of(t, sc, b, i, f), C);
          for (int c = 0; c < C; ++c) acc[c] += static_cast<double>(f[c]) * f[c];
        }
        for (int c = 0; c < C; ++c) chunk_part_.ptr()[bi * kChannels + c] = acc[c];
      }
      group_combine(L_.fruns, L_.frun_items, kChannels, sumsq_.ptr(), false);
    }
    // k_mlp<H>.
    const int hl = static_cast<int>(theta_.layers.size()) - 1;
    const bool relu = cfg_.mlp_activation == Activation::kRelu;
    const bool use_exp = cfg_.exp_mult != 0.0f && !cfg_.aggregate_mag;
    for (int64_t bi = 0; bi < nch; ++bi) {
      const Chunk ch = L_.chunks[bi];
      const TensorDesc& t = descs[ch.tensor];
      double* mo = mag_part_.ptr() + bi;
      switch (H_) {
        case 8: host_mlp_chunk<8>(t, ch, sc, b, packed_, hl, relu, cfg_.normalize_input, use_exp, cfg_.aggregate_mag, cfg_.exp_mult, mo); break;
        case 16: host_mlp_chunk<16>(t, ch, sc, b, packed_, hl, relu, cfg_.normalize_input, use_exp, cfg_.aggregate_mag, cfg_.exp_mult, mo); break;
        case 32: host_mlp_chunk<32>(t, ch, sc, b, packed_, hl, relu, cfg_.normalize_input, use_exp, cfg_.aggregate_mag, cfg_.exp_mult, mo); break;
        default: host_mlp_chunk<64>(t, ch, sc, b, packed_, hl, relu, cfg_.normalize_input, use_exp, cfg_.aggregate_mag, cfg_.exp_mult, mo); break;
      }
    }
    // k_tensor_factor.
    for (size_t ti = 0; ti < descs.size(); ++ti) {
      const double n = static_cast<double>(descs[ti].numel);
      float fct = 1.0f;
      if (cfg_.aggregate_mag) {
        double s = 0.0;
        for (int64_t c = L_.chunk_begin[ti]; c < L_.chunk_begin[ti + 1]; ++c) s += mag_part_.ptr()[c];
        fct *= std::exp(static_cast<float>(s / n) * cfg_.exp_mult);
      }
      if (cfg_.param_scale_mult) {
        double s = 0.0;
        for (int64_t c = L_.chunk_begin[ti]; c < L_.chunk_begin[ti + 1]; ++c) s += p2_part_.ptr()[c];
        fct *= static_cast<float>(std::sqrt(s / n + 1e-9));
      }
      factor_.ptr()[ti] = fct;
    }
    // The step before Newton–Schulz, with the magnitude factor applied as run_gathered
    // applies it (for the checks of check_set).
    pre_ns_.assign(u, u + L_.total);
    for (size_t ti = 0; ti < descs.size(); ++ti)
      if (descs[ti].ns)
        for (int64_t i = 0; i < descs[ti].numel; ++i) pre_ns_[descs[ti].x_off + i] *= factor_.ptr()[ti];
    // Newton–Schulz, one gathered batch per class of matrix shapes.
    for (const cuda::NsClassLayout& c : L_.ns_classes)
      host_ns_gathered<float>(cfg_, c.rows, c.cols, c.offsets, u, factor_.ptr(), c.tensor_of);
    // The same GEMM plan in double on the same input, each matrix against
    // newton_schulz_reference() (double): only a wrong plan can make these differ by more than
    // the final rounding to float. (The float32 results differ from the CPU's by float
    // rounding amplified by the iteration; check_set bounds them.)
    ns_err_.assign(descs.size(), 0.0);
    std::vector<double> pre_d(pre_ns_.begin(), pre_ns_.end());
    for (const cuda::NsClassLayout& c : L_.ns_classes) {
      host_ns_gathered<double>(cfg_, c.rows, c.cols, c.offsets, pre_d.data(), nullptr, {});
      for (size_t k = 0; k < c.offsets.size(); ++k) {
        const int64_t rc = c.rows * c.cols;
        std::vector<float> want(pre_ns_.begin() + c.offsets[k], pre_ns_.begin() + c.offsets[k] + rc);
        newton_schulz_reference(cfg_, c.rows, c.cols, want.data());
        std::vector<float> got(pre_d.begin() + c.offsets[k], pre_d.begin() + c.offsets[k] + rc);
        double& e = ns_err_[c.tensor_of[k]];
        e = std::max(e, rel_err(got.data(), want.data(), rc));
      }
    }
    // k_output_sumsq + k_group_combine.
    if (cfg_.normalize_output) {
      for (int64_t bi = 0; bi < nch; ++bi) {
        const Chunk ch = L_.chunks[bi];
        const TensorDesc& t = descs[ch.tensor];
        double acc = 0.0;
        for (int64_t i = ch.lo; i < ch.hi; ++i) acc += static_cast<double>(u[t.x_off + i]) * u[t.x_off + i];
        chunk_part_.ptr()[bi] = acc;
      }
      group_combine(L_.oruns, L_.orun_items, 1, osumsq_.ptr(), true);
    }
    // k_finish.
    for (int64_t bi = 0; bi < nch; ++bi) {
      const Chunk ch = L_.chunks[bi];
      const TensorDesc& t = descs[ch.tensor];
      const float fct = factor_.ptr()[ch.tensor];
      double s = osumsq_.ptr()[t.osumsq_off + ch.group];
      if (!t.ns) s *= static_cast<double>(fct) * fct;
      const float scale = cuda::output_scale(cfg_, s, t.norm_size);
      for (int64_t i = ch.lo; i < ch.hi; ++i) cuda::finish_element(cfg_, t, sc, b, i, fct, scale);
    }
  }

  // RuleSet::download_state.
  RuleState state(size_t i) const {
    const TensorDesc& d = L_.descs.at(i);
    const Geometry& g = L_.geos[i];
    RuleState s = RuleState::zeros(g);
    s.iteration = iteration_;
    auto get = [](std::vector<float>& dst, const float* base, int64_t off) {
      if (!dst.empty()) std::memcpy(dst.data(), base + off, dst.size() * sizeof(float));
    };
    get(s.m, buf_.m, d.m_off);
    get(s.rms, buf_.rms, d.r_off);
    if (g.factored) {
      get(s.v_row, buf_.vrow, d.vrow_off);
      get(s.v_col, buf_.vcol, d.vcol_off);
    } else {
      get(s.v_diag, buf_.vdiag, d.vd_off);
    }
    return s;
  }

  // Every buffer's guard bands are still NaN (nothing wrote outside a buffer).
  std::string broken_guards() const {
    std::string out;
    auto chk = [&](const char* name, bool ok) { if (!ok) out += std::string(" ") + name; };
    chk("m", m_.guards_intact());
    chk("rms", rms_.guards_intact());
    chk("vdiag", vdiag_.guards_intact());
    chk("vrow", vrow_.guards_intact());
    chk("vcol", vcol_.guards_intact());
    chk("rowsum", rowsum_.guards_intact());
    chk("colsum", colsum_.guards_intact());
    chk("rest", rest_.guards_intact());
    chk("rtab", rtab_.guards_intact());
    chk("ctab", ctab_.guards_intact());
    chk("sumsq", sumsq_.guards_intact());
    chk("osumsq", osumsq_.guards_intact());
    chk("factor", factor_.guards_intact());
    chk("axis_part", axis_part_.guards_intact());
    chk("chunk_part", chunk_part_.guards_intact());
    chk("mag_part", mag_part_.guards_intact());
    chk("p2_part", p2_part_.guards_intact());
    return out;
  }

 private:
  // k_axis_combine: the segment partials of each output in segment order.
  void axis_combine(const std::vector<AxisJob>& jobs, int64_t total_out, const SetBuffers& b) {
    for (int64_t x = 0; x < total_out; ++x) {
      const int64_t j = cuda::find_span(jobs.data(), static_cast<int64_t>(jobs.size()), x,
                                        [](const AxisJob& a) { return a.out_begin; });
      const AxisJob job = jobs[j];
      const int64_t o = x - job.out_begin;
      double s = 0.0;
      for (int64_t seg = 0; seg < job.segs; ++seg) s += axis_part_.ptr()[job.part_off + seg * job.n_out + o];
      const TensorDesc& t = L_.descs[job.tensor];
      if (job.is_row)
        b.rowsum[t.rowsum_off + o] = s;
      else
        b.colsum[t.colsum_off + o] = s;
    }
  }
  // k_group_combine.
  void group_combine(const std::vector<GroupRun>& runs, int64_t total, int pstride, double* out,
                     bool output_sums) {
    for (int64_t x = 0; x < total; ++x) {
      const int64_t r = cuda::find_span(runs.data(), static_cast<int64_t>(runs.size()), x,
                                        [](const GroupRun& v) { return v.item_begin; });
      const GroupRun run = runs[r];
      const int c = static_cast<int>(x - run.item_begin);
      double s = 0.0;
      for (int64_t k = run.c0; k < run.c1; ++k) s += chunk_part_.ptr()[k * pstride + c];
      const TensorDesc& t = L_.descs[run.tensor];
      if (output_sums)
        out[t.osumsq_off + run.group] = s;
      else
        out[t.sumsq_off + run.group * run.width + c] = s;
    }
  }

  RuleConfig cfg_;
  Theta theta_;
  SetLayout L_;
  int H_ = 8;
  std::vector<float> packed_;
  int64_t iteration_ = 0;
  std::vector<float> pre_ns_;
  std::vector<double> ns_err_;
  SetBuffers buf_;
  Guarded<float> m_, rms_, vdiag_, vrow_, vcol_, factor_;
  Guarded<double> rowsum_, colsum_, rest_, sumsq_, osumsq_, axis_part_, chunk_part_, mag_part_, p2_part_;
  Guarded<ew::FacEntry> rtab_, ctab_;
};

// Runs `steps` steps of a set through the emulator, celo2_update() and celo2_reference() and
// checks every tensor's step and state against both.
void check_set(const std::string& label, const RuleConfig& cfg, const Theta& theta,
               const std::vector<std::vector<int64_t>>& shapes, int steps, uint64_t seed) {
  SCOPED_TRACE(label);
  HostRuleSet set(cfg, theta, shapes);
  const SetLayout& L = set.layout();
  const size_t nt = shapes.size();
  const int64_t total = set.total();
  std::vector<float> p = randn(total, seed, 0.5f);
  std::vector<RuleState> fast, ref;
  std::vector<Workspace> ws(nt);
  for (size_t i = 0; i < nt; ++i) {
    fast.push_back(RuleState::zeros(L.geos[i]));
    ref.push_back(RuleState::zeros(L.geos[i]));
  }
  Guarded<float> u;
  u.alloc_zero(total);
  for (int k = 0; k < steps; ++k) {
    SCOPED_TRACE("step " + std::to_string(k));
    std::vector<float> g = randn(total, seed * 1000 + k + 1, 1.0f);
    if (k == 1 && total > 3) {  // clipped and tiny gradients
      g[0] = 5000.0f;
      g[total / 2] = -3000.0f;
      g[total - 1] = 1e-20f;
    }
    u.fill_poison();
    set.step(g.data(), p.data(), u.ptr());
    EXPECT_EQ(set.broken_guards(), "") << "a buffer was written outside its bounds";
    EXPECT_TRUE(u.guards_intact()) << "u was written outside its bounds";
    std::vector<float> p_next = p;
    for (size_t i = 0; i < nt; ++i) {
      const Geometry& geo = L.geos[i];
      SCOPED_TRACE("tensor " + std::to_string(i) + " " + geo.shape_str());
      const int64_t off = set.offset(i), n = geo.numel;
      std::vector<float> u_fast(n), u_ref(n);
      const bool ns = cfg.orthogonalize && geo.factored && n > 0;
      if (ns) {
        // The CPU's step before Newton–Schulz: the same rule without it, without the output
        // normalization and its scales, on a copy of the state.
        RuleConfig pre = cfg;
        pre.orthogonalize = false;
        pre.normalize_output = false;
        pre.precondition_output = false;
        pre.rmsmult = 1.0f;
        RuleState st = fast[i];
        std::vector<float> u_pre(n);
        celo2_update(pre, theta, geo, st, g.data() + off, p.data() + off, u_pre.data(), ws[i]);
        EXPECT_LE(rel_err(set.pre_ns().data() + off, u_pre.data(), n), kStepTol) << "u before Newton-Schulz";
        EXPECT_LE(set.ns_error(i), kNsPlanTol) << "Newton-Schulz GEMM plan in double vs reference, same input";
      }
      celo2_update(cfg, theta, geo, fast[i], g.data() + off, p.data() + off, u_fast.data(), ws[i]);
      if (n > 0)
        celo2_reference(cfg, theta, geo, ref[i], g.data() + off, p.data() + off, u_ref.data());
      const float* got = u.ptr() + off;
      EXPECT_LE(rel_err(got, u_fast.data(), n), ns ? kStepTolNs : kStepTol) << "u vs celo2_update";
      if (n > 0) {
        // With Newton–Schulz, tiny matrices (2×2, 3×3) can be ill-conditioned enough that the
        // CPU's float32 path itself is off the reference by about the spec's bound; the
        // emulated step must then be no further off than twice the CPU's distance.
        const double fast_ref = rel_err(u_fast.data(), u_ref.data(), n);
        EXPECT_LE(rel_err(got, u_ref.data(), n), ns ? std::max(kRefTol, 2 * fast_ref) : kRefTol)
            << "u vs celo2_reference (celo2_update vs reference: " << fast_ref << ")";
      }
      const RuleState st = set.state(i);
      EXPECT_EQ(st.iteration, fast[i].iteration);
      EXPECT_LE(rel_err(st.m, fast[i].m), kStateTol) << "m";
      EXPECT_LE(rel_err(st.rms, fast[i].rms), kStateTol) << "rms";
      EXPECT_LE(rel_err(st.v_row, fast[i].v_row), kStateTol) << "v_row";
      EXPECT_LE(rel_err(st.v_col, fast[i].v_col), kStateTol) << "v_col";
      EXPECT_LE(rel_err(st.v_diag, fast[i].v_diag), kStateTol) << "v_diag";
      if (n > 0) {
        EXPECT_LE(rel_err(st.m, ref[i].m), kStateRefTol) << "m vs reference";
        EXPECT_LE(rel_err(st.rms, ref[i].rms), kStateRefTol) << "rms vs reference";
        EXPECT_LE(rel_err(st.v_row, ref[i].v_row), kStateRefTol) << "v_row vs reference";
        EXPECT_LE(rel_err(st.v_col, ref[i].v_col), kStateRefTol) << "v_col vs reference";
        EXPECT_LE(rel_err(st.v_diag, ref[i].v_diag), kStateRefTol) << "v_diag vs reference";
      }
      for (int64_t j = 0; j < n; ++j)
        p_next[off + j] = static_cast<float>(static_cast<double>(p[off + j]) - 0.01 * u_fast[j]);
    }
    p = p_next;
  }
}

// Shapes: 0-d, 1-d (one element, a few, more than a chunk), 2-d wide/tall/square (factored
// axis contiguous and strided, axes longer than a segment, groups longer than a chunk), 3-d
// and 4-d (d0/d1 in every position, many small Newton–Schulz matrices of one class), and an
// empty tensor among them.
const std::vector<std::vector<int64_t>> kSmallSet = {
    {}, {1}, {7}, {6, 10}, {12, 5}, {8, 8}, {1, 9}, {9, 1}, {3, 4, 5}, {5, 4, 3},
    {4, 4, 4}, {64, 3, 3}, {2, 3, 4, 5}, {3, 1, 2, 6}, {0, 5}, {6, 10}};
const std::vector<std::vector<int64_t>> kLargeSet = {
    {5000},          // 1-d: two chunks, the second partial
    {3000, 7},       // tall: d0 = 0 strided, 3 segments; groups of 21000 (6 chunks)
    {5, 2100},       // wide: d0 = 1 contiguous, 3 segments
    {70, 70},        // square: a group of 4900 = one full chunk + a partial one
    {3, 50, 90},     // 3-d: three groups of 4500
    {2, 1100, 3},    // d0 = 1 in the middle (strided, 2 segments), d1 = 2 contiguous
    {1030, 2, 2},    // d0 = 0 strided over 4-element rows, 2 segments
    {2, 2, 33, 65},  // 4-d
};

RuleConfig with_hidden(RuleConfig c, int h, int layers = 2) {
  c.ff_hidden_size = h;
  c.ff_hidden_layers = layers;
  return c;
}

TEST(RuleLayout, DefaultConfigSmallShapes) {
  const RuleConfig cfg;
  check_set("default/small", cfg, Theta::random(cfg, 11), kSmallSet, 3, 1);
}

TEST(RuleLayout, DefaultConfigLargeShapes) {
  const RuleConfig cfg;
  check_set("default/large", cfg, Theta::random(cfg, 12), kLargeSet, 2, 2);
}

TEST(RuleLayout, Celo2Base) {
  const RuleConfig cfg = RuleConfig::celo2_base();
  check_set("base/small", cfg, Theta::random(cfg, 13), kSmallSet, 3, 3);
  check_set("base/large", cfg, Theta::random(cfg, 14), kLargeSet, 2, 4);
}

TEST(RuleLayout, Variants) {
  struct Case {
    std::string name;
    RuleConfig cfg;
  };
  std::vector<Case> cases;
  auto add = [&](const std::string& name, auto edit) {
    RuleConfig c;
    edit(c);
    cases.push_back({name, c});
  };
  add("aggregate_mag", [](RuleConfig& c) { c.aggregate_mag = true; c.exp_mult = 0.7f; });
  add("aggregate_mag_base", [](RuleConfig& c) { c.aggregate_mag = true; c.exp_mult = 0.7f; c.orthogonalize = false; });
  add("exp_mult", [](RuleConfig& c) { c.exp_mult = 0.5f; });
  add("param_scale_mult", [](RuleConfig& c) { c.param_scale_mult = true; });
  add("param_scale_mult_base", [](RuleConfig& c) { c.param_scale_mult = true; c.orthogonalize = false; });
  add("bias_correction", [](RuleConfig& c) { c.bias_correction = true; });
  add("no_normalize_input", [](RuleConfig& c) { c.normalize_input = false; });
  add("no_normalize_output", [](RuleConfig& c) { c.normalize_output = false; c.rmsmult = 0.5f; });
  add("no_normalize_output_base", [](RuleConfig& c) { c.normalize_output = false; c.orthogonalize = false; });
  add("precondition_output", [](RuleConfig& c) { c.precondition_output = true; c.rmsmult = 2.0f; });
  add("tanh", [](RuleConfig& c) { c.mlp_activation = Activation::kTanh; });
  add("hidden16", [](RuleConfig& c) { c = with_hidden(c, 16); });
  add("hidden5", [](RuleConfig& c) { c = with_hidden(c, 5); });             // padded to 8
  add("hidden12_3layers", [](RuleConfig& c) { c = with_hidden(c, 12, 3); });  // padded to 16
  add("hidden32_1layer", [](RuleConfig& c) { c = with_hidden(c, 32, 1); });
  add("hidden40", [](RuleConfig& c) { c = with_hidden(c, 40); });           // padded to 64
  add("everything", [](RuleConfig& c) {
    c.aggregate_mag = true; c.exp_mult = 0.3f; c.param_scale_mult = true; c.bias_correction = true;
    c.precondition_output = true; c = with_hidden(c, 16);
  });
  uint64_t seed = 100;
  for (const Case& k : cases) {
    check_set(k.name + "/small", k.cfg, Theta::random(k.cfg, seed), kSmallSet, 3, seed + 1);
    seed += 2;
  }
  // The large shapes for the variants whose tensor-wide reductions span many chunks.
  for (const Case& k : cases)
    if (k.name == "aggregate_mag" || k.name == "param_scale_mult_base" || k.name == "bias_correction" ||
        k.name == "no_normalize_output" || k.name == "hidden40")
      check_set(k.name + "/large", k.cfg, Theta::random(k.cfg, seed), kLargeSet, 2, seed + 1), seed += 2;
}

// The tables the kernels index: chunks tile each normalization group, axis jobs cover each
// tensor's statistics exactly once, prefixes are consistent with the buffer sizes.
TEST(RuleLayout, WorkTablesTileTheSet) {
  std::vector<std::vector<int64_t>> shapes = kSmallSet;
  shapes.insert(shapes.end(), kLargeSet.begin(), kLargeSet.end());
  const SetLayout L = SetLayout::build(RuleConfig{}, shapes);
  ASSERT_EQ(L.descs.size(), shapes.size());
  int64_t x = 0;
  for (size_t ti = 0; ti < shapes.size(); ++ti) {
    const TensorDesc& d = L.descs[ti];
    EXPECT_EQ(d.x_off, x);
    x += d.numel;
    // Chunks of this tensor: contiguous, inside one group, at most kChunk long.
    int64_t next = 0;
    for (int64_t c = L.chunk_begin[ti]; c < L.chunk_begin[ti + 1]; ++c) {
      const Chunk& ch = L.chunks[c];
      EXPECT_EQ(ch.tensor, static_cast<int32_t>(ti));
      EXPECT_EQ(ch.lo, next);
      EXPECT_GT(ch.hi, ch.lo);
      EXPECT_LE(ch.hi - ch.lo, cuda::kChunk);
      EXPECT_EQ(ch.group, ch.lo / d.norm_size);
      EXPECT_EQ((ch.hi - 1) / d.norm_size, ch.group);
      next = ch.hi;
    }
    EXPECT_EQ(next, d.numel);
  }
  EXPECT_EQ(x, L.total);
  // Axis jobs: partial slots disjoint and covering [0, part).
  std::vector<int> used(L.part, 0);
  int64_t rows = 0, cols = 0;
  for (const auto* list : {&L.contig, &L.strided})
    for (const AxisJob& j : *list) {
      const TensorDesc& d = L.descs[j.tensor];
      EXPECT_EQ(j.n_out, j.is_row ? d.row_count : d.col_count);
      EXPECT_EQ(j.len * j.n_out, d.numel);
      (j.is_row ? rows : cols) += j.n_out;
      for (int64_t k = 0; k < j.segs * j.n_out; ++k) used[j.part_off + k] += 1;
    }
  for (int64_t k = 0; k < L.part; ++k) EXPECT_EQ(used[k], 1) << "partial slot " << k;
  // Every statistic of a non-empty factored tensor has a job (an empty tensor's v_col may
  // have entries, e.g. (0, 5); they stay zero, as on the CPU).
  int64_t want_rows = 0, want_cols = 0;
  for (const TensorDesc& d : L.descs)
    if (d.factored && d.numel > 0) {
      want_rows += d.row_count;
      want_cols += d.col_count;
    }
  EXPECT_EQ(rows, want_rows);
  EXPECT_EQ(cols, want_cols);
  EXPECT_EQ(L.contig_out + L.strided_out, rows + cols);
  // Group runs: one per group, chunk ranges back to back.
  int64_t c = 0;
  for (const GroupRun& r : L.fruns) {
    EXPECT_EQ(r.c0, c);
    c = r.c1;
  }
  EXPECT_EQ(c, static_cast<int64_t>(L.chunks.size()));
  EXPECT_EQ(L.frun_items, L.sumsq);
  EXPECT_EQ(L.orun_items, L.osumsq);
}

// The MLP padded to 8/16/32/64 and packed as the kernels keep it in shared memory gives the
// outputs of the unpadded MLP (zero rows and columns feed nothing forward).
TEST(RuleLayout, PaddedMlpMatchesUnpadded) {
  for (int h : {1, 3, 8, 11, 16, 20, 32, 50, 64})
    for (int layers : {1, 2, 3})
      for (Activation act : {Activation::kRelu, Activation::kTanh}) {
        RuleConfig cfg = with_hidden(RuleConfig{}, h, layers);
        cfg.mlp_activation = act;
        const Theta theta = Theta::random(cfg, 1000 + h * 10 + layers, 1.0f);
        const std::vector<float> feats = randn(kChannels * 64, h * 7 + layers, 2.0f);
        const bool relu = act == Activation::kRelu;
        auto actf = [relu](float x) { return relu ? std::max(x, 0.0f) : std::tanh(x); };
        // Unpadded, straight from theta.layers, in k_mlp's order of operations (fma chains
        // over the inputs in order): padding adds fma(0, x, h) = h and act(0) * 0 terms, which
        // change no bit, so the padded MLP must give exactly these floats.
        std::vector<float> want_dir, want_mag;
        for (int e = 0; e < 64; ++e) {
          const int C = e % 2 ? kChannels : kChannels1d;  // 1-d tensors use the first 15 rows
          const DenseLayer& l0 = theta.layers[0];
          std::vector<float> hcur(l0.b.begin(), l0.b.end());
          for (int c = 0; c < C; ++c)
            for (int o = 0; o < h; ++o) hcur[o] = std::fma(l0.w[c * h + o], feats[e * kChannels + c], hcur[o]);
          for (int l = 1; l < static_cast<int>(theta.layers.size()); ++l) {
            const DenseLayer& d = theta.layers[l];
            std::vector<float> nxt(d.b.begin(), d.b.end());
            for (int c = 0; c < d.in; ++c)
              for (int o = 0; o < d.out; ++o) nxt[o] = std::fma(d.w[c * d.out + o], actf(hcur[c]), nxt[o]);
            hcur = nxt;
          }
          want_dir.push_back(hcur[0]);
          want_mag.push_back(hcur[1]);
        }
        for (int H : {8, 16, 32, 64}) {
          if (H < h) continue;
          SCOPED_TRACE("hidden " + std::to_string(h) + " layers " + std::to_string(layers) +
                       " padded to " + std::to_string(H) + (relu ? " relu" : " tanh"));
          const std::vector<float> packed = cuda::pack_theta(theta, H);
          ASSERT_EQ(static_cast<int64_t>(packed.size()), cuda::packed_theta_floats(H, layers));
          // k_mlp's reads of the packed block.
          const float* w0 = packed.data();
          const float* b0 = w0 + kChannels * H;
          const float* hidden = b0 + H;
          const float* wout = hidden + (layers - 1) * (H * H + H);
          const float* bout = wout + 2 * H;
          EXPECT_EQ(bout + 2, packed.data() + packed.size());
          std::vector<float> dir(64), mag(64);
          for (int e = 0; e < 64; ++e) {
            const int C = e % 2 ? kChannels : kChannels1d;
            std::vector<float> hv(H), h2(H);
            for (int o = 0; o < H; ++o) hv[o] = b0[o];
            for (int c = 0; c < C; ++c)
              for (int o = 0; o < H; ++o) hv[o] = std::fma(w0[c * H + o], feats[e * kChannels + c], hv[o]);
            for (int l = 0; l < layers - 1; ++l) {
              const float* w = hidden + l * (H * H + H);
              for (int o = 0; o < H; ++o) h2[o] = w[H * H + o];
              for (int c = 0; c < H; ++c)
                for (int o = 0; o < H; ++o) h2[o] = std::fma(w[c * H + o], actf(hv[c]), h2[o]);
              hv = h2;
            }
            dir[e] = bout[0];
            mag[e] = bout[1];
            for (int c = 0; c < H; ++c) {
              dir[e] = std::fma(wout[c * 2 + 0], actf(hv[c]), dir[e]);
              mag[e] = std::fma(wout[c * 2 + 1], actf(hv[c]), mag[e]);
            }
          }
          EXPECT_EQ(dir, want_dir) << "direction";
          EXPECT_EQ(mag, want_mag) << "magnitude";
        }
        EXPECT_EQ(cuda::padded_hidden(h), h <= 8 ? 8 : h <= 16 ? 16 : h <= 32 ? 32 : 64);
      }
}

// The cuBLAS GEMM plan of Newton–Schulz (operand order, transposes, leading dimensions, batch
// strides) through a host GEMM with cuBLAS's semantics, against the CPU's newton_schulz(), on
// gathered matrices with per-matrix factors.
TEST(RuleLayout, NewtonSchulzGemmPlanMatchesCpu) {
  const RuleConfig cfg;
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {1, 7}, {7, 1}, {6, 10}, {10, 6}, {8, 8}, {3, 40}, {40, 3}, {33, 65}, {65, 33}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
    const int64_t rc = rows * cols, batch = 4;
    // Matrices scattered in a buffer (gaps between them), two tensors' factors.
    std::vector<int64_t> offsets;
    std::vector<int32_t> index;
    for (int64_t b = 0; b < batch; ++b) {
      offsets.push_back(b * (rc + 5) + 3);
      index.push_back(static_cast<int32_t>(b % 2));
    }
    std::vector<float> x = randn(batch * (rc + 5) + 3, rows * 100 + cols);
    const std::vector<float> x0 = x;
    const float factors[2] = {0.5f, 3.0f};
    host_ns_gathered<float>(cfg, rows, cols, offsets, x.data(), factors, index);
    std::vector<float> scratch;
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<float> want(x0.begin() + offsets[b], x0.begin() + offsets[b] + rc);
      for (float& v : want) v *= factors[index[b]];
      newton_schulz(cfg, rows, cols, want.data(), scratch);
      EXPECT_LE(rel_err(x.data() + offsets[b], want.data(), rc), kNsTol) << "matrix " << b;
    }
    // The gaps between the matrices are untouched.
    std::vector<bool> inside(x.size(), false);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t e = 0; e < rc; ++e) inside[offsets[b] + e] = true;
    for (size_t i = 0; i < x.size(); ++i)
      if (!inside[i]) {
        EXPECT_EQ(x[i], x0[i]) << "gap element " << i;
      }
  }
}

}  // namespace
}  // namespace celo2
