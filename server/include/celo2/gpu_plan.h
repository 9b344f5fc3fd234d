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
// AdamW tensors are element-wise, so large ones are split into near-equal pieces (at most
// a quarter of the balanced share each) that may have different owners: the embedding of
// GPT-3 XL (100 M elements) would otherwise put 5x the mean load on one rank at 64 ranks.
// Celo2 tensors stay whole.
// Owners: largest modelled cost first, each piece onto the least-loaded rank (ties: lowest
// rank). The result depends on shapes and labels, not on update counters; when a relabel
// moves a piece, the engine moves its state (GpuEngine::regroup).
// Buckets: per owner, pieces in registration order grouped while they share
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

// Elements [lo, lo + n) of one tensor, owned by one rank.
struct GpuPiece {
  int tensor = 0;
  int64_t lo = 0, n = 0;
  int owner = 0;
  int bucket = -1;
  int64_t flat_offset = 0;  // where it starts in its owner's flat buffers
  bool operator==(const GpuPiece& o) const {
    return tensor == o.tensor && lo == o.lo && n == o.n && owner == o.owner;
  }
};

struct GpuBucket {
  int owner = 0;
  Label label = Label::kCelo2;
  int64_t counter = 0;
  std::vector<int> pieces;   // indices into GpuPlan::pieces, in order
  int64_t elements = 0;
  int64_t flat_offset = 0;   // where the bucket starts in its owner's flat buffers
};

struct GpuPlan {
  int world = 1;
  std::vector<GpuPiece> pieces;             // tensor by tensor, lo ascending
  std::vector<std::vector<int>> pieces_of;  // per tensor (empty: frozen or no elements)
  std::vector<GpuBucket> buckets;           // global collective order
  std::vector<int64_t> owned_elements;      // per rank: flat buffer size
  std::vector<double> load;                 // per rank: modelled seconds
  double imbalance = 1.0;                   // max / mean load

  static GpuPlan build(const std::vector<GpuPlanTensor>& tensors, int world,
                       int64_t bucket_bytes);
  // The owner of a tensor's first piece (-1: none); whole tensors have one piece.
  int owner_of(size_t tensor) const;
  bool same_placement(const GpuPlan& other, size_t tensor) const;
  std::string describe() const;  // one line per rank: pieces, elements, load, buckets
};

// Modelled seconds of one tensor's step on one H200-class GPU: Celo2 element-wise traffic
// (≈ 110 B/element) at 4 TB/s plus Newton–Schulz FLOPs at 400 TFLOP/s (bf16 rate; the ratios
// are what matter); AdamW 28 B/element.
double gpu_tensor_cost(const std::vector<int64_t>& shape);
double gpu_adamw_cost(int64_t elements);

}  // namespace celo2
