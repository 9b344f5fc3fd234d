// The Celo2 rule on a CUDA device: the multi-tensor kernels of rule_cuda.h and RuleSet.
// Per-element arithmetic comes from celo2/elementwise.h through rule_device.h (private, here);
// this file holds launch geometry, reductions and the MLP.
//
// The work tables (chunks, axis jobs, group runs, spans) are built on the host by
// rule_layout.h (private, here), which tests/unit/rule_layout_test.cc shares.
// All partial sums are double and combined in a fixed order: deterministic without atomics.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string>

#include "celo2/cuda/check.h"
#include "celo2/cuda/rule_cuda.h"
#include "rule_device.h"
#include "rule_layout.h"
#include "celo2/lowp.h"
#include "celo2/newton_schulz.h"

namespace celo2::cuda {

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why)
      *why = e != cudaSuccess ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e)
                              : std::string("no CUDA device");
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return false;
  }
  return true;
}

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Fixed-order block reduction of one double per thread; result valid in thread 0.
__device__ inline double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) t += smem[w];
  __syncthreads();
  return t;
}

// ---- Phase 1 ------------------------------------------------------------------------
__global__ void k_accumulate(const Chunk* chunks, const TensorDesc* descs, StepConstants sc,
                             SetBuffers b, bool want_p2, double* p2_part) {
  const Chunk ch = chunks[blockIdx.x];
  const TensorDesc& t = descs[ch.tensor];
  double p2 = 0.0;
  for (int64_t i = ch.lo + threadIdx.x; i < ch.hi; i += kThreads) {
    accumulate_element(t, sc, b, i);
    if (want_p2) {
      const float p = b.p[t.x_off + i];
      p2 += static_cast<double>(p) * p;
    }
  }
  if (want_p2) {
    __shared__ double smem[kWarps];
    const double s = block_sum(p2, smem);
    if (threadIdx.x == 0) p2_part[blockIdx.x] = s;
  }
}

// ---- Row/col statistics: sums of q along one axis -------------------------------------
// Contiguous axis (stride 1): one warp per (output, segment), lanes over the segment.
__global__ void k_axis_contig(const AxisJob* jobs, int njobs, int64_t total_items,
                              const TensorDesc* descs, const float* g, double* part) {
  const int64_t item = (blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (item >= total_items) return;  // whole warps exit together
  const int64_t j = find_span(jobs, njobs, item, [](const AxisJob& a) { return a.item_begin; });
  const AxisJob job = jobs[j];
  const int64_t local = item - job.item_begin;
  const int64_t o = local / job.segs, seg = local - o * job.segs;
  const TensorDesc& t = descs[job.tensor];
  const float* base = g + t.x_off + o * job.len;
  const int64_t lo = seg * kSegment, hi = min(job.len, lo + kSegment);
  double acc = 0.0;
  for (int64_t x = lo + lane; x < hi; x += 32) acc += q_of(base[x]);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) part[job.part_off + seg * job.n_out + o] = acc;
}

// Strided axis: one thread per (output, segment), consecutive outputs on consecutive lanes
// (coalesced), the segment summed in order.
__global__ void k_axis_strided(const AxisJob* jobs, int njobs, int64_t total_items,
                               const TensorDesc* descs, const float* g, double* part) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= total_items) return;
  const int64_t j = find_span(jobs, njobs, item, [](const AxisJob& a) { return a.item_begin; });
  const AxisJob job = jobs[j];
  const int64_t local = item - job.item_begin;
  const int64_t seg = local / job.n_out, o = local - seg * job.n_out;
  const TensorDesc& t = descs[job.tensor];
  const int64_t outer = o / job.stride, inner = o - outer * job.stride;
  const float* base = g + t.x_off + outer * job.len * job.stride + inner;
  const int64_t lo = seg * kSegment, hi = min(job.len, lo + kSegment);
  double acc = 0.0;
  for (int64_t x = lo; x < hi; ++x) acc += q_of(base[x * job.stride]);
  part[job.part_off + seg * job.n_out + o] = acc;
}

__global__ void k_axis_combine(const AxisJob* jobs, int njobs, int64_t total_out,
                               const TensorDesc* descs, const double* part, SetBuffers b) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= total_out) return;
  const int64_t j = find_span(jobs, njobs, x, [](const AxisJob& a) { return a.out_begin; });
  const AxisJob job = jobs[j];
  const int64_t o = x - job.out_begin;
  double s = 0.0;
  for (int64_t seg = 0; seg < job.segs; ++seg) s += part[job.part_off + seg * job.n_out + o];
  const TensorDesc& t = descs[job.tensor];
  if (job.is_row)
    b.rowsum[t.rowsum_off + o] = s;
  else
    b.colsum[t.colsum_off + o] = s;
}

// ---- Phase 2 ------------------------------------------------------------------------
// mode 0: fold row/col sums into v_row/v_col; 1: rest means; 2: feature tables.
__global__ void k_factored(int mode, const Span* spans, int nspans, int64_t total,
                           const TensorDesc* descs, StepConstants sc, SetBuffers b) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= total) return;
  const int64_t s = find_span(spans, nspans, x, [](const Span& v) { return v.begin; });
  const TensorDesc& t = descs[spans[s].tensor];
  const int64_t local = x - spans[s].begin;
  if (mode == 0)
    fold_factored_entry(t, sc, b, local);
  else if (mode == 1)
    rest_mean(t, b, local);
  else
    build_table_entry(t, sc, b, local);
}

// ---- Phase 3: per-channel sums of squares of the features ----------------------------
__global__ void k_feature_sumsq(const Chunk* chunks, const TensorDesc* descs, StepConstants sc,
                                SetBuffers b, double* part) {
  const Chunk ch = chunks[blockIdx.x];
  const TensorDesc& t = descs[ch.tensor];
  const int C = t.factored ? kChannels : kChannels1d;
  double acc[kChannels];
  for (int c = 0; c < kChannels; ++c) acc[c] = 0.0;
  float f[kChannels];
  for (int64_t i = ch.lo + threadIdx.x; i < ch.hi; i += kThreads) {
    features_of(t, sc, b, i, f);
#pragma unroll
    for (int c = 0; c < kChannels; ++c)
      if (c < C) acc[c] += static_cast<double>(f[c]) * f[c];
  }
  __shared__ double smem[kWarps][kChannels];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kChannels; ++c) {
    double v = acc[c];
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) smem[warp][c] = v;
  }
  __syncthreads();
  if (threadIdx.x < C) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += smem[w][threadIdx.x];
    part[blockIdx.x * static_cast<int64_t>(kChannels) + threadIdx.x] = s;
  }
}

// Sums chunk partials of each normalization group in chunk order: width values per chunk
// (stride `pstride` in part), into the group's slot of `out_base + off(tensor)`.
__global__ void k_group_combine(const GroupRun* runs, int nruns, int64_t total,
                                const TensorDesc* descs, const double* part, int pstride,
                                double* out, bool output_sums) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= total) return;
  const int64_t r = find_span(runs, nruns, x, [](const GroupRun& v) { return v.item_begin; });
  const GroupRun run = runs[r];
  const int c = static_cast<int>(x - run.item_begin);
  double s = 0.0;
  for (int64_t k = run.c0; k < run.c1; ++k) s += part[k * pstride + c];
  const TensorDesc& t = descs[run.tensor];
  if (output_sums)
    out[t.osumsq_off + run.group] = s;
  else
    out[t.sumsq_off + run.group * run.width + c] = s;
}

// ---- Phase 4: the MLP ---------------------------------------------------------------
struct MlpParams {
  const float* theta;  // packed, padded to H (rule_device.h)
  int hidden_layers;
  bool relu, normalize_input, use_exp, aggregate_mag;
  float exp_mult;
};

template <int H>
__device__ __forceinline__ float act(bool relu, float x) {
  return relu ? fmaxf(x, 0.0f) : tanhf(x);
}

template <int H>
__global__ void __launch_bounds__(kThreads) k_mlp(const Chunk* chunks, const TensorDesc* descs,
                                                  StepConstants sc, SetBuffers b, MlpParams mp,
                                                  double* mag_part) {
  extern __shared__ float sm[];
  const Chunk ch = chunks[blockIdx.x];
  const TensorDesc& t = descs[ch.tensor];
  const int C = t.factored ? kChannels : kChannels1d;
  const int64_t nfloats = packed_theta_floats(H, mp.hidden_layers);
  for (int64_t k = threadIdx.x; k < nfloats; k += kThreads) sm[k] = mp.theta[k];
  __syncthreads();
  // Fold the input normalization into the first layer (as the CPU path does).
  if (mp.normalize_input) {
    for (int k = threadIdx.x; k < C * H; k += kThreads) {
      const int c = k / H;
      const float inv = input_norm_scale(b.sumsq[t.sumsq_off + ch.group * C + c], t.norm_size);
      sm[k] = sm[k] * inv;
    }
    __syncthreads();
  }
  const float* w0 = sm;
  const float* b0 = w0 + kChannels * H;
  const float* hidden = b0 + H;
  const float* wout = hidden + (mp.hidden_layers - 1) * (H * H + H);
  const float* bout = wout + 2 * H;
  double mag_acc = 0.0;
  float f[kChannels];
  for (int64_t i = ch.lo + threadIdx.x; i < ch.hi; i += kThreads) {
    features_of(t, sc, b, i, f);
    float h[H];
#pragma unroll
    for (int o = 0; o < H; ++o) h[o] = b0[o];
    for (int c = 0; c < C; ++c) {
      const float x = f[c];
#pragma unroll
      for (int o = 0; o < H; ++o) h[o] = fmaf(w0[c * H + o], x, h[o]);
    }
    for (int l = 0; l < mp.hidden_layers - 1; ++l) {
      const float* w = hidden + l * (H * H + H);
      const float* bb = w + H * H;
      float h2[H];
#pragma unroll
      for (int o = 0; o < H; ++o) h2[o] = bb[o];
#pragma unroll
      for (int c = 0; c < H; ++c) {
        const float a = act<H>(mp.relu, h[c]);
#pragma unroll
        for (int o = 0; o < H; ++o) h2[o] = fmaf(w[c * H + o], a, h2[o]);
      }
#pragma unroll
      for (int o = 0; o < H; ++o) h[o] = h2[o];
    }
    float dir = bout[0], mag = bout[1];
#pragma unroll
    for (int c = 0; c < H; ++c) {
      const float a = act<H>(mp.relu, h[c]);
      dir = fmaf(wout[c * 2 + 0], a, dir);
      mag = fmaf(wout[c * 2 + 1], a, mag);
    }
    b.u[t.x_off + i] = mp.use_exp ? dir * ew::magnitude(mag, mp.exp_mult) : dir;
    if (mp.aggregate_mag) mag_acc += mag;
  }
  if (mp.aggregate_mag) {
    __shared__ double red[kWarps];
    const double s = block_sum(mag_acc, red);
    if (threadIdx.x == 0) mag_part[blockIdx.x] = s;
  }
}

// Per tensor: the magnitude factor from the chunk partials (summed in chunk order).
__global__ void k_tensor_factor(const TensorDesc* descs, const int64_t* chunk_begin, int ntensors,
                                const double* mag_part, const double* p2_part, bool aggregate_mag,
                                bool param_scale_mult, float exp_mult, float* factor) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= ntensors) return;
  const double n = static_cast<double>(descs[t].numel);
  float f = 1.0f;
  if (aggregate_mag) {
    double s = 0.0;
    for (int64_t c = chunk_begin[t]; c < chunk_begin[t + 1]; ++c) s += mag_part[c];
    f *= expf(static_cast<float>(s / n) * exp_mult);
  }
  if (param_scale_mult) {
    double s = 0.0;
    for (int64_t c = chunk_begin[t]; c < chunk_begin[t + 1]; ++c) s += p2_part[c];
    f *= static_cast<float>(sqrt(s / n + 1e-9));
  }
  factor[t] = f;
}

// ---- Phase 5 ------------------------------------------------------------------------
__global__ void k_output_sumsq(const Chunk* chunks, const TensorDesc* descs, SetBuffers b,
                               double* part) {
  const Chunk ch = chunks[blockIdx.x];
  const TensorDesc& t = descs[ch.tensor];
  double acc = 0.0;
  for (int64_t i = ch.lo + threadIdx.x; i < ch.hi; i += kThreads) {
    const float u = b.u[t.x_off + i];
    acc += static_cast<double>(u) * u;
  }
  __shared__ double smem[kWarps];
  const double s = block_sum(acc, smem);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void k_finish(const Chunk* chunks, const TensorDesc* descs, StepConstants sc,
                         SetBuffers b, RuleConfig cfg) {
  const Chunk ch = chunks[blockIdx.x];
  const TensorDesc& t = descs[ch.tensor];
  const float factor = b.factor[ch.tensor];
  double s = b.osumsq[t.osumsq_off + ch.group];
  if (!t.ns) s *= static_cast<double>(factor) * factor;  // the sums were of the unscaled u
  const float scale = output_scale(cfg, s, t.norm_size);
  for (int64_t i = ch.lo + threadIdx.x; i < ch.hi; i += kThreads)
    finish_element(cfg, t, sc, b, i, factor, scale);
}

// ---- Element-wise helpers -------------------------------------------------------------
__global__ void k_adamw(int64_t n, float* p, const float* g, float* mu, float* nu, float b1,
                        float b2, float eps, float lr, float wd, float ic1, float ic2) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float m = b1 * mu[i] + (1.0f - b1) * gi;
    const float v = b2 * nu[i] + (1.0f - b2) * gi * gi;
    mu[i] = m;
    nu[i] = v;
    const float pi = p[i];
    p[i] = pi - lr * ((m * ic1) / (sqrtf(v * ic2) + eps) + wd * pi);
  }
}

__global__ void k_apply_step(int64_t n, float* p, const float* u, float lr, float wd) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] -= ew::applied_step(lr, wd, p[i], u[i]);
}

__global__ void k_bf16_to_float(const __nv_bfloat16* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void k_scale(float* x, float s, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] *= s;
}

__global__ void k_count_nonfinite(const float* x, int64_t n, unsigned long long* counter) {
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    c += isfinite(x[i]) ? 0ull : 1ull;
  if (c) atomicAdd(counter, c);
}

__global__ void k_count_nonfinite_bf16(const __nv_bfloat16* x, int64_t n, unsigned long long* counter) {
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    c += isfinite(__bfloat162float(x[i])) ? 0ull : 1ull;
  if (c) atomicAdd(counter, c);
}

__global__ void k_store_lowp(bool bf16, uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = lowp::to_half(bf16, src[i]);
}

__global__ void k_reseed_master(bool bf16, float* master, const uint16_t* lowp_in, int64_t n,
                                unsigned long long* counter) {
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint16_t h = lowp_in[i];
    if (lowp::to_half(bf16, master[i]) != h) {
      master[i] = lowp::from_half(bf16, h);
      ++c;
    }
  }
  if (c) atomicAdd(counter, c);
}

__global__ void k_scale_zero_nonfinite(float* x, int64_t n, float s, unsigned long long* counter) {
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    if (isfinite(v)) {
      x[i] = v * s;
    } else {
      x[i] = 0.0f;
      ++c;
    }
  }
  if (c) atomicAdd(counter, c);
}

// One double per block over a grid-stride partition fixed by (kSumsqBlocks, kThreads); the
// block's values are combined by a fixed shared-memory tree.
template <int kMode>  // 0: x², 1: (a−b)², 2: apply step (a = p in/out, b = u) and d²
__global__ void k_sumsq_partial(float* a, const float* b, int64_t n, float lr, float wd,
                                double* partials) {
  __shared__ double sh[kThreads];
  double s = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double v;
    if (kMode == 0) {
      v = a[i];
    } else if (kMode == 1) {
      v = static_cast<double>(a[i]) - b[i];
    } else {
      const float d = ew::applied_step(lr, wd, a[i], b[i]);
      a[i] -= d;
      v = d;
    }
    s += v * v;
  }
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

__global__ void k_sumsq_combine(const double* partials, int count, double* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0.0;
  for (int i = 0; i < count; ++i) s += partials[i];
  *out += s;
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void k_fill_random(float* x, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ mix64(static_cast<uint64_t>(i)));
    // Four 16-bit uniforms summed: mean 2, variance 4/12; centred and scaled to unit variance.
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) s += static_cast<float>((h >> (16 * k)) & 0xffff) * (1.0f / 65536.0f);
    x[i] = (s - 2.0f) * 1.7320508f * scale;
  }
}

int grid_stride_blocks(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 132 * 16));
}
unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

template <class T>
T* device_copy(const std::vector<T>& v) {
  if (v.empty()) return nullptr;
  T* d = nullptr;
  CELO2_CUDA_CHECK(cudaMalloc(&d, v.size() * sizeof(T)));
  CELO2_CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <class T>
T* device_zeros(int64_t n) {
  if (n <= 0) return nullptr;
  T* d = nullptr;
  CELO2_CUDA_CHECK(cudaMalloc(&d, n * sizeof(T)));
  CELO2_CUDA_CHECK(cudaMemset(d, 0, n * sizeof(T)));
  return d;
}

}  // namespace

// ---------------------------------------------------------------------------------------
struct RuleSet::Impl {
  RuleConfig cfg;
  Theta theta;
  int H = 8;  // padded hidden width
  SetLayout L;  // the host tables (rule_layout.h); their device copies below
  struct NsClass {
    int64_t rows, cols;
    std::vector<int64_t> offsets;
    std::vector<int32_t> tensor_of;
    int64_t* offsets_d = nullptr;
    int32_t* tensor_of_d = nullptr;
  };
  std::vector<NsClass> ns_classes;
  int64_t total = 0, iteration = 0;

  // Device memory.
  TensorDesc* descs = nullptr;
  Chunk* chunks = nullptr;
  int64_t* chunk_begin = nullptr;
  AxisJob *contig = nullptr, *strided = nullptr;
  GroupRun *fruns = nullptr, *oruns = nullptr;
  Span *fold = nullptr, *rest_spans = nullptr;
  float* theta_d = nullptr;
  SetBuffers buf;  // g, p, u set per step
  double* axis_part = nullptr;
  double* chunk_part = nullptr;  // kChannels per chunk
  double* mag_part = nullptr;
  double* p2_part = nullptr;
  std::shared_ptr<NewtonSchulzCuda> ns;
  cudaEvent_t ev[3] = {};

  ~Impl() {
    for (void* p : std::initializer_list<void*>{
             descs, chunks, chunk_begin, contig, strided, fruns, oruns, fold, rest_spans,
             theta_d, buf.m, buf.rms, buf.vdiag, buf.vrow, buf.vcol, buf.rowsum, buf.colsum,
             buf.rest, buf.rtab, buf.ctab, buf.sumsq, buf.osumsq, buf.factor, axis_part,
             chunk_part, mag_part, p2_part})
      cudaFree(p);
    for (auto& c : ns_classes) {
      cudaFree(c.offsets_d);
      cudaFree(c.tensor_of_d);
    }
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }

  void build(const std::vector<std::vector<int64_t>>& shapes) {
    L = SetLayout::build(cfg, shapes);
    total = L.total;
    for (NsClassLayout& c : L.ns_classes)
      ns_classes.push_back({c.rows, c.cols, std::move(c.offsets), std::move(c.tensor_of)});
    const int64_t m = L.m, r = L.r, vd = L.vd, vrow = L.vrow, vcol = L.vcol, rest = L.rest,
                  sumsq = L.sumsq, osumsq = L.osumsq, part = L.part;
    const int nt = static_cast<int>(L.descs.size());

    // Device copies.
    descs = device_copy(L.descs);
    chunks = device_copy(L.chunks);
    chunk_begin = device_copy(L.chunk_begin);
    contig = device_copy(L.contig);
    strided = device_copy(L.strided);
    fruns = device_copy(L.fruns);
    oruns = device_copy(L.oruns);
    fold = device_copy(L.fold);
    rest_spans = device_copy(L.rest_spans);
    theta_d = device_copy(pack_theta(theta, H));
    for (auto& c : ns_classes) {
      c.offsets_d = device_copy(c.offsets);
      c.tensor_of_d = device_copy(c.tensor_of);
    }
    buf.m = device_zeros<float>(m);
    buf.rms = device_zeros<float>(r);
    buf.vdiag = device_zeros<float>(vd);
    buf.vrow = device_zeros<float>(vrow);
    buf.vcol = device_zeros<float>(vcol);
    buf.rowsum = device_zeros<double>(vrow / kFac);
    buf.colsum = device_zeros<double>(vcol / kFac);
    buf.rest = device_zeros<double>(rest);
    buf.rtab = device_zeros<ew::FacEntry>(vrow / kFac);
    buf.ctab = device_zeros<ew::FacEntry>(vcol / kFac);
    buf.sumsq = device_zeros<double>(sumsq);
    buf.osumsq = device_zeros<double>(osumsq);
    buf.factor = device_zeros<float>(nt);
    axis_part = device_zeros<double>(part);
    const int64_t nch = static_cast<int64_t>(L.chunks.size());
    chunk_part = device_zeros<double>(nch * kChannels);
    mag_part = device_zeros<double>(nch);
    p2_part = device_zeros<double>(nch);
    for (cudaEvent_t& e : ev) CELO2_CUDA_CHECK(cudaEventCreate(&e));
  }

  void launch_mlp(const StepConstants& sc, cudaStream_t stream) {
    MlpParams mp;
    mp.theta = theta_d;
    mp.hidden_layers = static_cast<int>(theta.layers.size()) - 1;
    mp.relu = cfg.mlp_activation == Activation::kRelu;
    mp.normalize_input = cfg.normalize_input;
    mp.use_exp = cfg.exp_mult != 0.0f && !cfg.aggregate_mag;
    mp.aggregate_mag = cfg.aggregate_mag;
    mp.exp_mult = cfg.exp_mult;
    const size_t smem = packed_theta_floats(H, mp.hidden_layers) * sizeof(float);
    const unsigned nch = static_cast<unsigned>(L.chunks.size());
    switch (H) {
      case 8: k_mlp<8><<<nch, kThreads, smem, stream>>>(chunks, descs, sc, buf, mp, mag_part); break;
      case 16: k_mlp<16><<<nch, kThreads, smem, stream>>>(chunks, descs, sc, buf, mp, mag_part); break;
      case 32: k_mlp<32><<<nch, kThreads, smem, stream>>>(chunks, descs, sc, buf, mp, mag_part); break;
      default: k_mlp<64><<<nch, kThreads, smem, stream>>>(chunks, descs, sc, buf, mp, mag_part); break;
    }
    CELO2_CUDA_LAUNCH_CHECK("k_mlp");
  }

  void run(const float* g, const float* p, float* u, cudaStream_t stream, bool timed) {
    iteration += 1;
    if (L.chunks.empty()) return;
    const StepConstants sc = StepConstants::of(cfg, iteration);
    buf.g = g;
    buf.p = p;
    buf.u = u;
    const int nt = static_cast<int>(L.descs.size());
    const unsigned nch = static_cast<unsigned>(L.chunks.size());
    if (timed) CELO2_CUDA_CHECK(cudaEventRecord(ev[0], stream));

    k_accumulate<<<nch, kThreads, 0, stream>>>(chunks, descs, sc, buf, cfg.param_scale_mult, p2_part);
    CELO2_CUDA_LAUNCH_CHECK("k_accumulate");
    if (L.contig_items) {
      k_axis_contig<<<blocks_for(L.contig_items * 32, kThreads), kThreads, 0, stream>>>(
          contig, static_cast<int>(L.contig.size()), L.contig_items, descs, g, axis_part);
      CELO2_CUDA_LAUNCH_CHECK("k_axis_contig");
      k_axis_combine<<<blocks_for(L.contig_out, kThreads), kThreads, 0, stream>>>(
          contig, static_cast<int>(L.contig.size()), L.contig_out, descs, axis_part, buf);
      CELO2_CUDA_LAUNCH_CHECK("k_axis_combine");
    }
    if (L.strided_items) {
      k_axis_strided<<<blocks_for(L.strided_items, kThreads), kThreads, 0, stream>>>(
          strided, static_cast<int>(L.strided.size()), L.strided_items, descs, g, axis_part);
      CELO2_CUDA_LAUNCH_CHECK("k_axis_strided");
      k_axis_combine<<<blocks_for(L.strided_out, kThreads), kThreads, 0, stream>>>(
          strided, static_cast<int>(L.strided.size()), L.strided_out, descs, axis_part, buf);
      CELO2_CUDA_LAUNCH_CHECK("k_axis_combine");
    }
    if (L.fold_total) {
      const int ns = static_cast<int>(L.fold.size());
      k_factored<<<blocks_for(L.fold_total, kThreads), kThreads, 0, stream>>>(0, fold, ns, L.fold_total, descs, sc, buf);
      CELO2_CUDA_LAUNCH_CHECK("k_factored(fold)");
      k_factored<<<blocks_for(L.rest_total, kThreads), kThreads, 0, stream>>>(1, rest_spans, ns, L.rest_total, descs, sc, buf);
      CELO2_CUDA_LAUNCH_CHECK("k_factored(rest)");
      k_factored<<<blocks_for(L.fold_total, kThreads), kThreads, 0, stream>>>(2, fold, ns, L.fold_total, descs, sc, buf);
      CELO2_CUDA_LAUNCH_CHECK("k_factored(tables)");
    }
    if (cfg.normalize_input) {
      k_feature_sumsq<<<nch, kThreads, 0, stream>>>(chunks, descs, sc, buf, chunk_part);
      CELO2_CUDA_LAUNCH_CHECK("k_feature_sumsq");
      k_group_combine<<<blocks_for(L.frun_items, kThreads), kThreads, 0, stream>>>(
          fruns, static_cast<int>(L.fruns.size()), L.frun_items, descs, chunk_part, kChannels,
          buf.sumsq, false);
      CELO2_CUDA_LAUNCH_CHECK("k_group_combine(features)");
    }
    launch_mlp(sc, stream);
    k_tensor_factor<<<blocks_for(nt, 128), 128, 0, stream>>>(descs, chunk_begin, nt, mag_part, p2_part,
                                                            cfg.aggregate_mag, cfg.param_scale_mult,
                                                            cfg.exp_mult, buf.factor);
    CELO2_CUDA_LAUNCH_CHECK("k_tensor_factor");
    if (timed) CELO2_CUDA_CHECK(cudaEventRecord(ev[1], stream));
    for (NsClass& c : ns_classes)
      ns->run_gathered(cfg, c.rows, c.cols, static_cast<int64_t>(c.offsets.size()), u,
                       c.offsets_d, buf.factor, c.tensor_of_d, stream);
    if (timed) CELO2_CUDA_CHECK(cudaEventRecord(ev[2], stream));
    if (cfg.normalize_output) {
      k_output_sumsq<<<nch, kThreads, 0, stream>>>(chunks, descs, buf, chunk_part);
      CELO2_CUDA_LAUNCH_CHECK("k_output_sumsq");
      k_group_combine<<<blocks_for(L.orun_items, kThreads), kThreads, 0, stream>>>(
          oruns, static_cast<int>(L.oruns.size()), L.orun_items, descs, chunk_part, 1,
          buf.osumsq, true);
      CELO2_CUDA_LAUNCH_CHECK("k_group_combine(output)");
    }
    k_finish<<<nch, kThreads, 0, stream>>>(chunks, descs, sc, buf, cfg);
    CELO2_CUDA_LAUNCH_CHECK("k_finish");
  }
};

RuleSet::RuleSet(const RuleConfig& cfg, const Theta& theta,
                 const std::vector<std::vector<int64_t>>& shapes, std::shared_ptr<NewtonSchulzCuda> ns)
    : impl_(std::make_unique<Impl>()) {
  cfg.validate();
  theta.check_fits(cfg);
  if (theta.hidden_layers() < 1)
    throw std::invalid_argument("the CUDA rule needs at least one hidden layer");
  const int h = theta.hidden();
  if (h > kMaxHiddenGpu)
    throw std::invalid_argument("the CUDA rule supports hidden sizes up to " +
                                std::to_string(kMaxHiddenGpu) + ", not " + std::to_string(h));
  impl_->cfg = cfg;
  impl_->theta = theta;
  impl_->H = padded_hidden(h);
  const size_t smem = packed_theta_floats(impl_->H, theta.hidden_layers()) * sizeof(float);
  if (smem > 48 * 1024)
    throw std::invalid_argument("the CUDA rule's MLP does not fit in 48 KiB of shared memory (" +
                                std::to_string(theta.hidden_layers()) + " hidden layers of " +
                                std::to_string(h) + ")");
  if (!ns) throw std::invalid_argument("RuleSet: null Newton-Schulz runner");
  impl_->ns = std::move(ns);
  impl_->build(shapes);
  for (const auto& c : impl_->ns_classes)
    impl_->ns->reserve(c.rows, c.cols, static_cast<int64_t>(c.offsets.size()));
  // Tables and zeroed state were written on the legacy stream (cudaMemset, pageable copies);
  // a step on a non-blocking stream must not overtake them.
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());
}

RuleSet::RuleSet(const RuleConfig& cfg, const Theta& theta,
                 const std::vector<std::vector<int64_t>>& shapes, NsPrecision ns)
    : RuleSet(cfg, theta, shapes, std::make_shared<NewtonSchulzCuda>(ns)) {}

RuleSet::~RuleSet() = default;
size_t RuleSet::size() const { return impl_->L.geos.size(); }
int64_t RuleSet::total() const { return impl_->total; }
int64_t RuleSet::offset(size_t i) const { return impl_->L.descs.at(i).x_off; }
const Geometry& RuleSet::geometry(size_t i) const { return impl_->L.geos.at(i); }
int64_t RuleSet::iteration() const { return impl_->iteration; }

void RuleSet::step(const float* g, const float* p, float* u, cudaStream_t stream) {
  impl_->run(g, p, u, stream, false);
}

RuleTiming RuleSet::step_timed(const float* g, const float* p, float* u, cudaStream_t stream) {
  CELO2_CUDA_CHECK(cudaEventRecord(impl_->ev[0], stream));
  impl_->run(g, p, u, stream, true);
  cudaEvent_t end;
  CELO2_CUDA_CHECK(cudaEventCreate(&end));
  CELO2_CUDA_CHECK(cudaEventRecord(end, stream));
  CELO2_CUDA_CHECK(cudaEventSynchronize(end));
  float a = 0, n = 0, b = 0;
  if (!impl_->L.chunks.empty()) {
    CELO2_CUDA_CHECK(cudaEventElapsedTime(&a, impl_->ev[0], impl_->ev[1]));
    CELO2_CUDA_CHECK(cudaEventElapsedTime(&n, impl_->ev[1], impl_->ev[2]));
    CELO2_CUDA_CHECK(cudaEventElapsedTime(&b, impl_->ev[2], end));
  }
  CELO2_CUDA_CHECK(cudaEventDestroy(end));
  return RuleTiming{a + b, n};
}

RuleState RuleSet::download_state(size_t i) const {
  const TensorDesc& d = impl_->L.descs.at(i);
  const Geometry& g = impl_->L.geos[i];
  RuleState s = RuleState::zeros(g);
  s.iteration = impl_->iteration;
  // step() may have run on a non-blocking stream, which a plain cudaMemcpy (legacy default
  // stream) does not wait for.
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());
  auto get = [](std::vector<float>& dst, const float* base, int64_t off) {
    if (!dst.empty())
      CELO2_CUDA_CHECK(cudaMemcpy(dst.data(), base + off, dst.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost));
  };
  get(s.m, impl_->buf.m, d.m_off);
  get(s.rms, impl_->buf.rms, d.r_off);
  if (g.factored) {
    get(s.v_row, impl_->buf.vrow, d.vrow_off);
    get(s.v_col, impl_->buf.vcol, d.vcol_off);
  } else {
    get(s.v_diag, impl_->buf.vdiag, d.vd_off);
  }
  return s;
}

void RuleSet::upload_state(size_t i, const RuleState& s) {
  const TensorDesc& d = impl_->L.descs.at(i);
  const Geometry& g = impl_->L.geos[i];
  const RuleState z = RuleState::zeros(g);
  auto check = [&](const char* what, const std::vector<float>& have, const std::vector<float>& want) {
    if (have.size() != want.size())
      throw std::invalid_argument("RuleSet::upload_state: tensor " + std::to_string(i) + " (" +
                                  g.shape_str() + "): " + what + " has " +
                                  std::to_string(have.size()) + " values, expected " +
                                  std::to_string(want.size()));
  };
  check("m", s.m, z.m);
  check("rms", s.rms, z.rms);
  check("v_row", s.v_row, z.v_row);
  check("v_col", s.v_col, z.v_col);
  check("v_diag", s.v_diag, z.v_diag);
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());
  auto put = [](const std::vector<float>& src, float* base, int64_t off) {
    if (!src.empty())
      CELO2_CUDA_CHECK(cudaMemcpy(base + off, src.data(), src.size() * sizeof(float),
                                  cudaMemcpyHostToDevice));
  };
  put(s.m, impl_->buf.m, d.m_off);
  put(s.rms, impl_->buf.rms, d.r_off);
  if (g.factored) {
    put(s.v_row, impl_->buf.vrow, d.vrow_off);
    put(s.v_col, impl_->buf.vcol, d.vcol_off);
  } else {
    put(s.v_diag, impl_->buf.vdiag, d.vd_off);
  }
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());  // pageable copies may return before the DMA ends
}

void RuleSet::set_iteration(int64_t it) {
  if (it < 0) throw std::invalid_argument("RuleSet::set_iteration: negative iteration");
  impl_->iteration = it;
}

double RuleSet::elementwise_bytes() const {
  double bytes = 0;
  for (size_t i = 0; i < impl_->L.geos.size(); ++i) {
    const Geometry& g = impl_->L.geos[i];
    const double n = static_cast<double>(g.numel);
    // accumulate: g, m r/w, rms r/w (+ v_diag r/w); statistics: g twice (factored);
    // features and MLP: g, p, m, rms (+ v_diag) twice, u written; output sums: u; finish: u r/w.
    const double vd = g.factored ? 0 : 4.0 * kFac;
    double per = 4 + 8 * kMom + 8 * kRms + 2 * vd;
    if (g.factored) per += 8;
    const double feat = 4 + 4 + 4 * kMom + 4 * kRms + vd;
    per += (impl_->cfg.normalize_input ? 2 : 1) * feat + 4;
    if (impl_->cfg.normalize_output) per += 4;
    per += 8;
    bytes += per * n;
  }
  return bytes;
}

double RuleSet::newton_schulz_flops() const {
  double f = 0;
  for (const auto& c : impl_->ns_classes)
    f += celo2::newton_schulz_flops(impl_->cfg, c.rows, c.cols) * static_cast<double>(c.offsets.size());
  return f;
}

// ---- Element-wise helpers ----------------------------------------------------------------
void adamw_device(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu, float* nu,
                  cudaStream_t stream) {
  if (n <= 0) return;
  const float ic1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(a.b1), static_cast<double>(a.count))));
  const float ic2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(a.b2), static_cast<double>(a.count))));
  k_adamw<<<grid_stride_blocks(n), kThreads, 0, stream>>>(n, p, g, mu, nu, a.b1, a.b2, a.eps, a.lr,
                                                          a.wd, ic1, ic2);
  CELO2_CUDA_LAUNCH_CHECK("k_adamw");
}

void apply_step_device(float lr, float wd, int64_t n, float* p, const float* u, cudaStream_t stream) {
  if (n <= 0) return;
  k_apply_step<<<grid_stride_blocks(n), kThreads, 0, stream>>>(n, p, u, lr, wd);
  CELO2_CUDA_LAUNCH_CHECK("k_apply_step");
}

void bf16_to_float_device(const uint16_t* in, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  k_bf16_to_float<<<grid_stride_blocks(n), kThreads, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(in), out, n);
  CELO2_CUDA_LAUNCH_CHECK("k_bf16_to_float");
}

void float_to_bf16_device(const float* in, uint16_t* out, int64_t n, cudaStream_t stream) {
  store_lowp_device(true, out, in, n, stream);  // the one rounding (celo2/lowp.h)
}

void count_nonfinite_device(const float* x, int64_t n, unsigned long long* counter, cudaStream_t stream) {
  if (n <= 0) return;
  k_count_nonfinite<<<grid_stride_blocks(n), kThreads, 0, stream>>>(x, n, counter);
  CELO2_CUDA_LAUNCH_CHECK("k_count_nonfinite");
}

void count_nonfinite_bf16_device(const uint16_t* x, int64_t n, unsigned long long* counter,
                                 cudaStream_t stream) {
  if (n <= 0) return;
  k_count_nonfinite_bf16<<<grid_stride_blocks(n), kThreads, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(x), n, counter);
  CELO2_CUDA_LAUNCH_CHECK("k_count_nonfinite_bf16");
}

void store_lowp_device(bool bf16, uint16_t* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  k_store_lowp<<<grid_stride_blocks(n), kThreads, 0, stream>>>(bf16, dst, src, n);
  CELO2_CUDA_LAUNCH_CHECK("k_store_lowp");
}

void reseed_master_device(bool bf16, float* master, const uint16_t* lowp_in, int64_t n,
                          unsigned long long* counter, cudaStream_t stream) {
  if (n <= 0) return;
  k_reseed_master<<<grid_stride_blocks(n), kThreads, 0, stream>>>(bf16, master, lowp_in, n, counter);
  CELO2_CUDA_LAUNCH_CHECK("k_reseed_master");
}

void scale_zero_nonfinite_device(float* x, int64_t n, float scale, unsigned long long* counter,
                                 cudaStream_t stream) {
  if (n <= 0) return;
  k_scale_zero_nonfinite<<<grid_stride_blocks(n), kThreads, 0, stream>>>(x, n, scale, counter);
  CELO2_CUDA_LAUNCH_CHECK("k_scale_zero_nonfinite");
}

// The two launches of every sumsq variant: per-block partials, then their fixed-order sum.
template <int kMode>
void launch_sumsq(float* a, const float* b, int64_t n, float lr, float wd, double* partials,
                  double* out, cudaStream_t stream) {
  if (n <= 0) return;
  k_sumsq_partial<kMode><<<kSumsqBlocks, kThreads, 0, stream>>>(a, b, n, lr, wd, partials);
  CELO2_CUDA_LAUNCH_CHECK("k_sumsq_partial");
  k_sumsq_combine<<<1, 32, 0, stream>>>(partials, kSumsqBlocks, out);
  CELO2_CUDA_LAUNCH_CHECK("k_sumsq_combine");
}

void sumsq_device(const float* x, int64_t n, double* partials, double* out, cudaStream_t stream) {
  launch_sumsq<0>(const_cast<float*>(x), nullptr, n, 0.f, 0.f, partials, out, stream);  // read only
}

void sumsq_diff_device(const float* a, const float* b, int64_t n, double* partials, double* out,
                       cudaStream_t stream) {
  launch_sumsq<1>(const_cast<float*>(a), b, n, 0.f, 0.f, partials, out, stream);  // read only
}

void apply_step_sumsq_device(float lr, float wd, int64_t n, float* p, const float* u,
                             double* partials, double* out, cudaStream_t stream) {
  launch_sumsq<2>(p, u, n, lr, wd, partials, out, stream);
}

void scale_device(float* x, float s, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  k_scale<<<grid_stride_blocks(n), kThreads, 0, stream>>>(x, s, n);
  CELO2_CUDA_LAUNCH_CHECK("k_scale");
}

}  // namespace celo2::cuda

namespace celo2::cuda {
void fill_random_device(float* x, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n <= 0) return;
  k_fill_random<<<grid_stride_blocks(n), kThreads, 0, stream>>>(x, n, seed, scale);
  CELO2_CUDA_LAUNCH_CHECK("k_fill_random");
}
}  // namespace celo2::cuda
