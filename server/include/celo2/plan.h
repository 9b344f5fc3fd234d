// The one planner of the sharded step (celo2/engine.h): where each rank's slice of the flat
// index space begins (the cuts) and which rank orthogonalizes each matrix (the owners), for
// both plans. The engine, the communication model (celo2/comm_model.h) and celo2-plan call
// it, so what is modelled is what runs.
//
//   kFlat: even cuts (N·r/W); each Newton–Schulz matrix goes to one owner, largest first, to
//     the rank that already holds most of it unless that rank is past 1.1x the balanced
//     load, else to the least-loaded rank (plan_owners).
//   kWholeTensors: cuts only at Celo2 tensor boundaries (AdamW and frozen tensors are cut
//     anywhere: they are element-wise), placed to minimize the worse of the largest rank's
//     modelled cost and engine memory, each over its mean (binary search on the budget,
//     greedy fill: exact for contiguous partitions). A tensor's Newton–Schulz runs on the
//     rank holding it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "celo2/config.h"
#include "celo2/labels.h"

namespace celo2 {

enum class Plan {
  kFlat,          // even slices of the flat index space; the rule in phases on slices
  kWholeTensors,  // cuts at Celo2 tensor boundaries; the rule on whole tensors
};
Plan parse_plan(const std::string& s);  // flat | whole
const char* plan_name(Plan p);

struct PlanTensor {
  int64_t numel = 0;
  Label label = Label::kCelo2;
  double cost = 0;  // modelled seconds of its step (tensor_step_cost)
};

// Modelled seconds of one tensor's optimizer step on one H200-class GPU: the Celo2
// element-wise phases (about 110 B/element of DRAM traffic) at 4 TB/s plus its Newton–Schulz
// FLOPs at 400 TFLOP/s; AdamW 28 B/element; frozen nothing. Ratios are what matter.
double tensor_step_cost(const std::vector<int64_t>& shape, Label label, const RuleConfig& cfg);

// The engine's bytes per element of a rank's slice: its gradient and step slices (8 B) plus
// the optimizer state (celo2: m 3 + rms 1 floats; adamw: mu, nu). The whole-tensor plan
// balances these as well as the modelled cost.
double slice_bytes_per_element(Label label);

// The W + 1 cuts (cuts[0] = 0, cuts[W] = total elements) of the flat index space.
std::vector<int64_t> plan_cuts(const std::vector<PlanTensor>& tensors, int W, Plan plan);

struct OwnerPlan {
  std::vector<int> owner;    // per matrix (global order)
  std::vector<double> load;  // Newton–Schulz FLOPs per rank
  double imbalance = 1.0;    // max / mean load (1 = perfect)
};

// Owners of the flat plan's Newton–Schulz matrices. `flat` are the matrices' [lo, hi)
// ranges in the flat index space, `cuts` the slices (plan_cuts).
OwnerPlan plan_owners(const std::vector<std::pair<int64_t, int64_t>>& flat,
                      const std::vector<double>& cost, const std::vector<int64_t>& cuts);

}  // namespace celo2
