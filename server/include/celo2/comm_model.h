// The communication model of one sharded step: bytes each rank sends per phase (averaged
// over ranks), by the same ring-algorithm accounting as the communicators (a reduce-scatter
// or all-gather of B bytes in all costs each rank B·(W−1)/W; an all-reduce twice that; an
// all-to-all what leaves the rank). Used for docs/DISTRIBUTED.md (GPT-3 XL on 8–512 ranks)
// and validated against the engine's own counters under mpirun (tests/mpi).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/labels.h"
#include "celo2/plan.h"

namespace celo2 {

struct ModelTensor {
  std::string name;
  std::vector<int64_t> shape;
  Label label = Label::kCelo2;
};

struct CommModel {
  int world = 1;
  int64_t elements = 0;
  std::map<std::string, double> bytes;  // per phase, per rank (mean over ranks)
  double celo2 = 0;                     // sum of the phases
  double zero1_adamw = 0;               // reduce-scatter grads + all-gather params
  double a2a_no_locality = 0;           // the all-to-all if owners ignored where data lives
  double layerwise = 0;                 // whole tensors to owners: reduce + broadcast
  double layerwise_state_imbalance = 1; // max/mean optimizer-state elements per rank
  double ns_imbalance = 1;              // Newton–Schulz modelled time max/mean (the engine's plan)
  double ns_imbalance_unsplit = 1;      // ... with one owner per matrix
  double ns_imbalance_bound = 1;        // no plan does better (celo2/plan.h ns_load_bound)
  int64_t ns_matrices = 0;
  int64_t ns_split = 0;                 // matrices split over groups of ranks
  int ns_group_max = 1;                 // the largest group
  double ns_max_seconds = 0;            // the busiest rank's modelled Newton–Schulz time
  double ns_group_bytes_max = 0;        // the groups' all-reduce bytes of the busiest rank
  double ns_group_bytes_mean = 0;       // ... averaged over ranks (in bytes["newton_schulz"])
  int ns_group_calls_max = 0;           // ... and its collective calls (all-reduce, all-gather)
  int64_t ns_split_poly = 0;            // split matrices whose group splits the polynomial
};

// `gather_params`: the engine all-gathers parameters (merged return path unless
// precondition_output). `ns_split`, `ns_model` and `ns_split_poly`: the Newton–Schulz
// planner's inputs (celo2/plan.h plan_ns; the engine's are EngineOptions::ns_split,
// NsCostModel::cpu() and EngineOptions::ns_split_poly).
CommModel model_step(const std::vector<ModelTensor>& tensors, const RuleConfig& cfg, int world,
                     bool gather_params = true, int ns_split = 0,
                     const NsCostModel& ns_model = NsCostModel::cpu(), int ns_split_poly = -1);

// A GPT-style tensor set (names as a Megatron-like trainer has them): token and position
// embeddings (adamw), per layer LayerNorms and biases (adamw), qkv/proj/fc1/fc2 (celo2).
std::vector<ModelTensor> gpt_tensors(int layers, int64_t d, int64_t ffn, int64_t vocab,
                                     int64_t context);

}  // namespace celo2
