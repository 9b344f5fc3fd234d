// The Celo2 rule on one CUDA device (spec/celo2.md §3), for a fixed set of tensors whose
// state lives in device memory. One step is a handful of multi-tensor launches (in the
// style of apex's multi_tensor_apply: a table of tensor descriptors and a table of chunks,
// one thread block per chunk), not one launch per tensor:
//   accumulate (m, rms, v_diag) · row/col statistics of factored tensors · fold them into
//   v_row/v_col and build the feature tables · per-channel sums of squares · MLP (weights
//   in shared memory) · Newton–Schulz (cuBLAS, batched over same-shaped matrices) · output
//   sums of squares · finish.
// Determinism: every reduction has a fixed partition (per chunk, per segment, per lane of a
// fixed-size block) and partial sums are combined in a fixed order in double; there are no
// floating-point atomics, so two runs give the same bits.
// The CPU fast path (celo2_update) is the reference; tests/gpu/ bound the difference.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "celo2/adamw.h"
#include "celo2/config.h"
#include "celo2/rule.h"

namespace celo2::cuda {

// Precision of the Newton–Schulz GEMMs. float32 is the default and the one tested against
// the spec; tf32 (tensor cores, fp32 storage) and bf16 (bf16 storage, fp32 accumulation)
// are opt-in speed modes.
enum class NsPrecision { kFloat32, kTf32, kBf16 };
NsPrecision parse_ns_precision(const std::string& s);  // float32 | tf32 | bf16
const char* ns_precision_name(NsPrecision p);

// Seconds of the last timed step, split as the benchmark reports it.
struct RuleTiming {
  double elementwise_ms = 0;     // everything except Newton–Schulz
  double newton_schulz_ms = 0;
};

class NewtonSchulzCuda;

class RuleSet {
 public:
  // Allocates state (zeros) and workspaces on the current device.
  RuleSet(const RuleConfig& cfg, const Theta& theta,
          const std::vector<std::vector<int64_t>>& shapes, NsPrecision ns = NsPrecision::kFloat32);
  // The same, with a Newton–Schulz runner (cuBLAS handle and workspaces) shared with other
  // sets whose steps run one after another on one stream (the GPU engine's buckets).
  RuleSet(const RuleConfig& cfg, const Theta& theta,
          const std::vector<std::vector<int64_t>>& shapes, std::shared_ptr<NewtonSchulzCuda> ns);
  ~RuleSet();
  RuleSet(const RuleSet&) = delete;
  RuleSet& operator=(const RuleSet&) = delete;

  size_t size() const;
  int64_t total() const;           // elements of all tensors
  int64_t offset(size_t i) const;  // where tensor i starts in the flat g / p / u buffers
  const Geometry& geometry(size_t i) const;

  // One update. g, p, u: device pointers to `total()` floats (tensors back to back). Writes
  // the raw Celo2 step into u. Asynchronous on `stream`.
  void step(const float* g, const float* p, float* u, cudaStream_t stream = nullptr);
  // The same, timing the element-wise phases and Newton–Schulz with events (synchronizes).
  RuleTiming step_timed(const float* g, const float* p, float* u, cudaStream_t stream = nullptr);

  // The state of tensor i, copied to the host (synchronizes).
  RuleState download_state(size_t i) const;
  // Replace the state of tensor i (a checkpoint, a re-grouping by the engine). The arrays
  // must have the sizes of RuleState::zeros(geometry(i)) (std::invalid_argument otherwise);
  // s.iteration is ignored: the set has one iteration counter (set_iteration). Synchronizes.
  void upload_state(size_t i, const RuleState& s);
  int64_t iteration() const;
  void set_iteration(int64_t it);  // updates applied so far (>= 0)

  // Model of one step's DRAM traffic of the element-wise phases (bytes) and Newton–Schulz
  // FLOPs, for the roofline of celo2-bench-gpu.
  double elementwise_bytes() const;
  double newton_schulz_flops() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ----- Element-wise helpers over flat device buffers (also used by the optimizer) -----

// Fused AdamW (celo2/adamw.h semantics, adamw_update's arithmetic) on n elements.
void adamw_device(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                  float* nu, cudaStream_t stream = nullptr);
// p ← p − lr·(u + wd·p) (the celo2 branch of the recipe) on n elements.
void apply_step_device(float lr, float wd, int64_t n, float* p, const float* u,
                       cudaStream_t stream = nullptr);
// bfloat16 <-> float32 (round to nearest even), n elements; bf16 as raw uint16 bits.
void bf16_to_float_device(const uint16_t* in, float* out, int64_t n, cudaStream_t stream = nullptr);
void float_to_bf16_device(const float* in, uint16_t* out, int64_t n, cudaStream_t stream = nullptr);
// Low-precision parameters (celo2/lowp.h's arithmetic), raw 16-bit values, bf16 or fp16:
// dst = round(src); and master[i] = lowp[i] where lowp[i] != round(master[i]), counting
// those into *counter.
void store_lowp_device(bool bf16, uint16_t* dst, const float* src, int64_t n, cudaStream_t stream = nullptr);
void reseed_master_device(bool bf16, float* master, const uint16_t* lowp, int64_t n,
                          unsigned long long* counter, cudaStream_t stream = nullptr);
// Non-finite gradient handling and statistics (the engine's NaN policy and StepReport).
// *counter += number of non-finite entries of x (integer atomics: deterministic).
void count_nonfinite_device(const float* x, int64_t n, unsigned long long* counter,
                            cudaStream_t stream = nullptr);
void count_nonfinite_bf16_device(const uint16_t* x, int64_t n, unsigned long long* counter,
                                 cudaStream_t stream = nullptr);
// x[i] = finite(x[i]) ? x[i]·scale : 0, counting the zeroed entries into *counter.
void scale_zero_nonfinite_device(float* x, int64_t n, float scale, unsigned long long* counter,
                                 cudaStream_t stream = nullptr);
// *out += Σ x[i]² (or Σ (a[i] − b[i])² for sumsq_diff) in double, with a fixed partition
// (kSumsqBlocks blocks, a fixed tree in each, partials added in block order): the same bits
// on every run. `partials` is device scratch of kSumsqBlocks doubles.
inline constexpr int kSumsqBlocks = 256;
void sumsq_device(const float* x, int64_t n, double* partials, double* out,
                  cudaStream_t stream = nullptr);
void sumsq_diff_device(const float* a, const float* b, int64_t n, double* partials, double* out,
                       cudaStream_t stream = nullptr);
// p ← p − lr·(u + wd·p) and *out += Σ (lr·(u + wd·p))² (the applied step's squares, as the
// CPU optimizer reports them), with sumsq_device's partition.
void apply_step_sumsq_device(float lr, float wd, int64_t n, float* p, const float* u,
                             double* partials, double* out, cudaStream_t stream = nullptr);
// x *= s (device).
void scale_device(float* x, float s, int64_t n, cudaStream_t stream = nullptr);
// Deterministic pseudo-random normal-ish values (sum of uniforms from a counter hash) times
// `scale`: benchmark inputs without a host round trip.
void fill_random_device(float* x, int64_t n, uint64_t seed, float scale,
                        cudaStream_t stream = nullptr);

// Newton–Schulz on `batch` row-major rows×cols matrices at x + b*rows*cols (device), in
// place, on cuBLAS (strided-batched GEMMs). `factor` (device, one float, may be null)
// multiplies the input first, as the rule's magnitude factor does.
class NewtonSchulzCuda {
 public:
  explicit NewtonSchulzCuda(NsPrecision precision = NsPrecision::kFloat32);
  ~NewtonSchulzCuda();
  NewtonSchulzCuda(const NewtonSchulzCuda&) = delete;
  NewtonSchulzCuda& operator=(const NewtonSchulzCuda&) = delete;
  // Matrices given by their start offsets into x (device array of `batch` int64); matrix b
  // is first multiplied by factors_dev[factor_index_dev[b]] when factors_dev is not null.
  void run_gathered(const RuleConfig& cfg, int64_t rows, int64_t cols, int64_t batch,
                    float* x, const int64_t* offsets_dev, const float* factors_dev,
                    const int32_t* factor_index_dev, cudaStream_t stream);
  // Contiguous batch (x + b*rows*cols).
  void run(const RuleConfig& cfg, int64_t rows, int64_t cols, int64_t batch, float* x,
           cudaStream_t stream);
  NsPrecision precision() const;
  // Allocate the workspaces for `batch` rows×cols matrices now (they only grow), so that no
  // allocation — which synchronizes the device — happens inside a step.
  void reserve(int64_t rows, int64_t cols, int64_t batch);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace celo2::cuda
