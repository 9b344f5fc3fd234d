// Newton–Schulz (spec/celo2.md §3 step 9) on cuBLAS, batched over same-shaped matrices.
//
// The GEMMs of an iteration and their derivation (row-major data, column-major cuBLAS, no
// transposes): newton_schulz_plan.h (private, here), shared with the host test.
// The Frobenius norm is a fixed-partition double reduction (deterministic).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "celo2/cuda/check.h"
#include "newton_schulz_plan.h"
#include "celo2/cuda/rule_cuda.h"

namespace celo2::cuda {
namespace {

constexpr int kNormThreads = 256;
constexpr int64_t kNormSegment = 256 * 64;  // elements per block of the norm reduction

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float matrix_factor(const float* factors, const int32_t* index,
                                               int64_t b) {
  if (!factors) return 1.0f;
  return factors[index ? index[b] : 0];
}

// part[b * segs + s] = sum over segment s of matrix b of (factor * x)^2. One block per
// (matrix, segment), flat in x: gridDim.y is limited to 65535 and a conv weight alone has
// more matrices than that.
__global__ void k_norm_partial(const float* x, const int64_t* offsets, int64_t rc, int segs,
                               const float* factors, const int32_t* index, double* part) {
  const int64_t b = blockIdx.x / segs;
  const int s = static_cast<int>(blockIdx.x - b * segs);
  const float f = matrix_factor(factors, index, b);
  const float* m = x + offsets[b];
  const int64_t lo = s * kNormSegment, hi = min(rc, lo + kNormSegment);
  double acc = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const float v = factors ? m[i] * f : m[i];
    acc += static_cast<double>(v) * v;
  }
  __shared__ double warp_sums[kNormThreads / 32];
  for (int o = 16; o > 0; o /= 2) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kNormThreads / 32; ++w) t += warp_sums[w];
    part[b * segs + s] = t;
  }
}

__global__ void k_norm_final(const double* part, int segs, int64_t batch, float eps,
                             float* scale) {
  // Grid-stride: grid_for() caps the grid at 65536 blocks.
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double t = 0.0;
    for (int s = 0; s < segs; ++s) t += part[b * segs + s];
    scale[b] = static_cast<float>(1.0 / (sqrt(t) + static_cast<double>(eps)));
  }
}

template <class T>
__global__ void k_load(const float* x, const int64_t* offsets, int64_t rc, int64_t batch,
                       const float* factors, const int32_t* index, const float* scale, T* X) {
  const int64_t n = rc * batch;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / rc, e = i - b * rc;
    float v = x[offsets[b] + e];
    if (factors) v *= matrix_factor(factors, index, b);
    X[i] = from_float<T>(v * scale[b]);
  }
}

template <class T>
__global__ void k_store(const T* X, const int64_t* offsets, int64_t rc, int64_t batch, float* x) {
  const int64_t n = rc * batch;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / rc, e = i - b * rc;
    x[offsets[b] + e] = to_float(X[i]);
  }
}

__global__ void k_iota_offsets(int64_t* out, int64_t batch, int64_t rc) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[b] = b * rc;
}

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65536));
}

}  // namespace

NsPrecision parse_ns_precision(const std::string& s) {
  if (s == "float32" || s == "fp32") return NsPrecision::kFloat32;
  if (s == "tf32") return NsPrecision::kTf32;
  if (s == "bf16" || s == "bfloat16") return NsPrecision::kBf16;
  throw std::invalid_argument("unknown Newton-Schulz precision '" + s +
                              "' (expected float32, tf32 or bf16)");
}

const char* ns_precision_name(NsPrecision p) {
  switch (p) {
    case NsPrecision::kFloat32: return "float32";
    case NsPrecision::kTf32: return "tf32";
    case NsPrecision::kBf16: return "bf16";
  }
  return "?";
}

struct NewtonSchulzCuda::Impl {
  NsPrecision precision;
  cublasHandle_t handle = nullptr;
  void* work = nullptr;  // X, Y, A, B of the batch (float or bf16)
  size_t work_bytes = 0;
  double* part = nullptr;
  size_t part_count = 0;
  float* scale = nullptr;
  int64_t scale_count = 0;
  int64_t* iota = nullptr;
  int64_t iota_count = 0;

  ~Impl() {
    // Destructors must not throw: errors here are ignored on purpose.
    if (handle) cublasDestroy(handle);
    cudaFree(work);
    cudaFree(part);
    cudaFree(scale);
    cudaFree(iota);
  }

  template <class P>
  void ensure(P*& ptr, size_t& have, size_t want) {
    if (want <= have) return;
    CELO2_CUDA_CHECK(cudaFree(ptr));
    ptr = nullptr;
    CELO2_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), want * sizeof(P)));
    have = want;
  }

  template <class T>
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
            const T* A, int lda, long long sa, const T* B, int ldb, long long sb, float beta,
            T* C, int ldc, long long sc, int batch) {
    if constexpr (std::is_same_v<T, float>) {
      CELO2_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, ta, tb, m, n, k, &alpha, A, lda, sa,
                                                   B, ldb, sb, &beta, C, ldc, sc, batch));
    } else {
      CELO2_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          handle, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, sa, B, CUDA_R_16BF, ldb, sb,
          &beta, C, CUDA_R_16BF, ldc, sc, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  // Workspaces for `batch` rows×cols matrices (grown, never shrunk). cudaFree/cudaMalloc
  // synchronize the device, so RuleSet reserves at construction, not in the middle of a step.
  template <class T>
  void reserve_typed(int64_t rows, int64_t cols, int64_t batch) {
    const NsShape shape = NsShape::of(rows, cols);
    const int64_t r = shape.r, c = shape.c, rc = shape.rc, rr = shape.rr;
    if (r > INT32_MAX || c > INT32_MAX || batch > INT32_MAX)
      throw std::invalid_argument("Newton-Schulz matrix too large for cuBLAS");
    size_t have = work_bytes;
    unsigned char* w = static_cast<unsigned char*>(work);
    ensure(w, have, static_cast<size_t>(batch) * (2 * rc + 2 * rr) * sizeof(T));
    work = w;
    work_bytes = have;
    const int64_t segs64 = (rc + kNormSegment - 1) / kNormSegment;
    if (batch * segs64 > INT32_MAX)
      throw std::invalid_argument("Newton-Schulz batch too large for the norm reduction's grid");
    ensure(part, part_count, static_cast<size_t>(batch) * static_cast<size_t>(segs64));
    size_t sc_have = static_cast<size_t>(scale_count);
    ensure(scale, sc_have, static_cast<size_t>(batch));
    scale_count = static_cast<int64_t>(sc_have);
  }

  template <class T>
  void run_typed(const RuleConfig& cfg, int64_t rows, int64_t cols, int64_t batch, float* x,
                 const int64_t* offsets, const float* factors, const int32_t* index,
                 cudaStream_t stream) {
    reserve_typed<T>(rows, cols, batch);
    const NsShape shape = NsShape::of(rows, cols);
    const int64_t rc = shape.rc, rr = shape.rr;
    T* X = static_cast<T*>(work);
    T* Y = X + batch * rc;
    T* A = Y + batch * rc;
    T* B = A + batch * rr;
    const int64_t segs64 = (rc + kNormSegment - 1) / kNormSegment;
    const int segs = static_cast<int>(segs64);
    CELO2_CUBLAS_CHECK(cublasSetStream(handle, stream));

    k_norm_partial<<<static_cast<unsigned>(batch * segs64), kNormThreads, 0, stream>>>(
        x, offsets, rc, segs, factors, index, part);
    CELO2_CUDA_LAUNCH_CHECK("k_norm_partial");
    k_norm_final<<<grid_for(batch, 128), 128, 0, stream>>>(part, segs, batch, cfg.ns_eps, scale);
    CELO2_CUDA_LAUNCH_CHECK("k_norm_final");
    k_load<T><<<grid_for(rc * batch, 256), 256, 0, stream>>>(x, offsets, rc, batch, factors,
                                                              index, scale, X);
    CELO2_CUDA_LAUNCH_CHECK("k_load");

    const float a = cfg.ns_coeffs[0], bco = cfg.ns_coeffs[1], cco = cfg.ns_coeffs[2];
    const int Bn = static_cast<int>(batch);
    auto gemm_cb = [&](bool ta, bool tb, int m, int n, int k, float alpha, const T* A_, int lda,
                       long long sa, const T* B_, int ldb, long long sb, float beta, T* C_,
                       int ldc, long long sc_, int nbatch) {
      gemm<T>(ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, alpha, A_,
              lda, sa, B_, ldb, sb, beta, C_, ldc, sc_, nbatch);
    };
    auto copy_cb = [&](T* dst, const T* src, size_t count) {
      CELO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToDevice, stream));
    };
    for (int it = 0; it < cfg.ns_iters; ++it) {
      ns_iteration<T>(shape, Bn, a, bco, cco, X, Y, A, B, gemm_cb, copy_cb);
      std::swap(X, Y);
    }
    k_store<T><<<grid_for(rc * batch, 256), 256, 0, stream>>>(X, offsets, rc, batch, x);
    CELO2_CUDA_LAUNCH_CHECK("k_store");
  }
};

NewtonSchulzCuda::NewtonSchulzCuda(NsPrecision precision) : impl_(std::make_unique<Impl>()) {
  impl_->precision = precision;
  CELO2_CUBLAS_CHECK(cublasCreate(&impl_->handle));
  CELO2_CUBLAS_CHECK(cublasSetMathMode(
      impl_->handle, precision == NsPrecision::kTf32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                      : CUBLAS_DEFAULT_MATH));
}

NewtonSchulzCuda::~NewtonSchulzCuda() = default;

NsPrecision NewtonSchulzCuda::precision() const { return impl_->precision; }

void NewtonSchulzCuda::reserve(int64_t rows, int64_t cols, int64_t batch) {
  if (rows == 0 || cols == 0 || batch == 0) return;
  if (impl_->precision == NsPrecision::kBf16)
    impl_->reserve_typed<__nv_bfloat16>(rows, cols, batch);
  else
    impl_->reserve_typed<float>(rows, cols, batch);
}

void NewtonSchulzCuda::run_gathered(const RuleConfig& cfg, int64_t rows, int64_t cols,
                                    int64_t batch, float* x, const int64_t* offsets_dev,
                                    const float* factors_dev, const int32_t* factor_index_dev,
                                    cudaStream_t stream) {
  if (rows == 0 || cols == 0 || batch == 0) return;
  if (impl_->precision == NsPrecision::kBf16)
    impl_->run_typed<__nv_bfloat16>(cfg, rows, cols, batch, x, offsets_dev, factors_dev,
                                    factor_index_dev, stream);
  else
    impl_->run_typed<float>(cfg, rows, cols, batch, x, offsets_dev, factors_dev,
                            factor_index_dev, stream);
}

void NewtonSchulzCuda::run(const RuleConfig& cfg, int64_t rows, int64_t cols, int64_t batch,
                           float* x, cudaStream_t stream) {
  if (rows == 0 || cols == 0 || batch == 0) return;
  if (batch > impl_->iota_count) {
    CELO2_CUDA_CHECK(cudaFree(impl_->iota));
    impl_->iota = nullptr;
    CELO2_CUDA_CHECK(cudaMalloc(&impl_->iota, batch * sizeof(int64_t)));
    impl_->iota_count = batch;
  }
  k_iota_offsets<<<grid_for(batch, 128), 128, 0, stream>>>(impl_->iota, batch, rows * cols);
  CELO2_CUDA_LAUNCH_CHECK("k_iota_offsets");
  run_gathered(cfg, rows, cols, batch, x, impl_->iota, nullptr, nullptr, stream);
}

}  // namespace celo2::cuda
