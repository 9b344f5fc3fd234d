// The plan of the GPU engine's step (celo2/gpu_engine.h): which rank owns each tensor and in
// which buckets the tensors travel. Host code only, so it is built and tested everywhere.
//
// Why whole tensors, not the CPU engine's flat slices: every Celo2 statistic is a reduction
// over one tensor (row/column second moments, per-channel input norms, the tensor-wide
// magnitude, Newton–Schulz over its matrices). Slicing tensors across GPUs turns each of
// those into a collective between kernels; owning whole tensors keeps the rule on one device
// with no collective inside it and spreads Newton–Schulz, the dominant cost, over the ranks.
// The traffic is the same as ZeRO's reduce-scatter + all-gather (each gradient element is
// reduced to one owner, each parameter element broadcast from it), state memory is ≈ 1/W
// per rank when the model has many more tensors than ranks (the balance is reported).
//
// Owners: largest modelled cost first, each onto the least-loaded rank (ties: lowest rank).
// The cost depends on shapes only, so changing labels never moves state between ranks.
// Buckets: per owner, tensors in registration order grouped while they share
// (label, update counter) — one RuleSet / one fused AdamW launch needs one counter — up to
// `bucket_bytes` of float32 gradients. The global bucket order interleaves owners (the first
// bucket of every rank, then the second, ...) so every rank gets work early; all ranks derive
// the same order from the same inputs, which NCCL's in-order collectives require.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "celo2/labels.h"

namespace celo2 {

struct GpuPlanTensor {
  std::vector<int64_t> shape;
  Label label = Label::kCelo2;
  int64_t counter = 0;  // celo2: iteration; adamw: count (buckets never mix counters)
};

struct GpuBucket {
  int owner = 0;
  Label label = Label::kCelo2;
  int64_t counter = 0;
  std::vector<int> tensors;  // registration indices, in order
  int64_t elements = 0;
  int64_t flat_offset = 0;   // where the bucket starts in its owner's flat buffers
};

struct GpuPlan {
  int world = 1;
  std::vector<int> owner;              // per tensor
  std::vector<int64_t> flat_offset;    // per tensor: start in its owner's flat buffers (-1: frozen)
  std::vector<int> bucket_of;          // per tensor (-1: frozen / empty)
  std::vector<GpuBucket> buckets;      // global collective order
  std::vector<int64_t> owned_elements; // per rank: flat buffer size (non-frozen owned tensors)
  std::vector<double> load;            // per rank: modelled seconds
  double imbalance = 1.0;              // max / mean load

  static GpuPlan build(const std::vector<GpuPlanTensor>& tensors, int world,
                       int64_t bucket_bytes);
  std::string describe() const;  // one line per rank: tensors, elements, load, buckets
};

// Modelled seconds of one tensor's Celo2 step on one H200-class GPU: element-wise traffic at
// 4 TB/s plus Newton–Schulz FLOPs at 400 TFLOP/s (bf16 rate; the ratio is what matters).
double gpu_tensor_cost(const std::vector<int64_t>& shape);

}  // namespace celo2
