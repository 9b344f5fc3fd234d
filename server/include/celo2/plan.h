// The one planner of the sharded step (celo2/engine.h): where each rank's slice of the flat
// index space begins (the cuts) and which rank orthogonalizes each matrix (the owners), for
// both plans. The engine, the communication model (celo2/comm_model.h) and celo2-plan call
// it, so what is modelled is what runs.
//
//   kFlat: even cuts (N·r/W); each Newton–Schulz matrix goes to one owner, largest first, to
//     the rank that already holds most of it unless that rank is past 1.1x the balanced
//     load, else to the rank that frees first; or, where the largest matrices bound the
//     step, to a group of ranks that split it (plan_ns). Groups run first, in lockstep, and
//     the modelled load is each rank's finish time in the order the engine runs them.
//   kWholeTensors: cuts only at Celo2 tensor boundaries (AdamW and frozen tensors are cut
//     anywhere: they are element-wise), placed to minimize the worse of the largest rank's
//     modelled cost and engine memory, each over its mean (binary search on the budget,
//     greedy fill: exact for contiguous partitions). A tensor's Newton–Schulz runs on the
//     rank holding it.
#pragma once

#include <algorithm>
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
  std::vector<int> owner;    // per matrix (global order): its owner, or its group's first rank
  // per matrix: its group's nominal size g (1: one owner): ranks [owner, min(W, owner + g))
  std::vector<int> group;
  // per matrix with a group: its members split the polynomial B = bA + cA² by rows and
  // all-gather it (newton_schulz_split's split_poly) instead of each forming all of it
  std::vector<char> split_poly;
  // The groups in the order every rank runs them, before its own matrices: a rank runs
  // the groups it is a member of in this order (the same on every rank, so no two ranks
  // wait on each other in opposite orders).
  std::vector<int> split_order;
  // Modelled Newton–Schulz finish time per rank, seconds, in that order: a group starts
  // when its last member is free and holds all its members until the busiest is done
  // (each iteration's all-reduce waits for every member); then the rank's own matrices.
  std::vector<double> load;
  double imbalance = 1.0;    // max load / mean (1 = perfect; mean = unsplit work / W)
  double imbalance_unsplit = 1.0;  // the same with one owner per matrix
  double group_bytes_max = 0;      // the groups' collective bytes of the busiest rank
};

// ---- Newton–Schulz split over groups of ranks (celo2/split_ns.h) ----
//
// A matrix's group is an aligned block of ranks: with nominal size g, group q is ranks
// [q·g, min(W, (q+1)·g)) (the last one may be smaller), so every group of one size comes
// from one Communicator::split (colour rank / g). Member j of a group of s ranks holds the
// column block [C·j/s, C·(j+1)/s) of the matrix's wide orientation (r×c, r <= c): for a
// wide row-major matrix, a column block (one run per row); for a tall one (rows > cols),
// whose wide orientation is its transpose, a block of whole rows (one run).

// What the planner weighs: seconds of GEMM FLOPs and of the group all-reduces.
struct NsCostModel {
  double gemm_flops = 100e9;      // FLOP/s of one rank's Newton–Schulz GEMMs
  double bus_bytes = 5e9;         // all-reduce bus bandwidth within a node, B/s
  double bus_bytes_inter = 5e9;   // ... across nodes
  int ranks_per_node = 1 << 30;   // groups up to this size stay in a node
  double latency = 20e-6;         // seconds per all-reduce call
  // The most the groups' collectives may add to any rank's bytes per step, as a share of
  // ZeRO-1's (gradient reduce-scatter + parameter all-gather); 0: no limit, the modelled
  // time alone decides. The GPU model holds splits to 5 %: there they share the links with
  // ZeRO-1's own traffic, which the time model does not see.
  double group_bytes_share = 0;
  static NsCostModel cpu();   // the defaults: one CPU rank of a shared-memory MPI job
  static NsCostModel h200();  // H200-class GPUs, 8 per node (celo2-plan's model, DISTRIBUTED.md)
};

// The matrices of a step, in flat order: rows × cols of each (row-major) and its flat range.
struct NsMatrix {
  int64_t flat_lo = 0;
  int64_t rows = 0, cols = 0;
};

// Modelled seconds on each rank of a group of g ranks for one matrix (g = 1: newton_schulz;
// g > 1: the split iteration of the busiest member, ceil(c / g) columns, plus its collectives,
// with the polynomial formed redundantly or applied as two products with A, whichever is fewer
// FLOPs (split_ns_flops), or, split_poly, split by rows and all-gathered).
double ns_time(const RuleConfig& cfg, const NsCostModel& model, int64_t rows, int64_t cols, int g,
               bool split_poly = false);
// How a group of g splits one matrix's polynomial: force_poly 0 never, 1 always (g > 1),
// -1 where that lowers ns_time.
bool ns_split_poly(const RuleConfig& cfg, const NsCostModel& model, int64_t rows, int64_t cols, int g,
                   int force_poly = -1);
// CELO2_NS_SPLIT_POLY's words as force_poly: auto -1, on 1, off 0.
int parse_split_poly(const std::string& s);
// CELO2_NS_SPLIT_APPLY's words as newton_schulz_split's product: auto -1, product 1,
// polynomial 0.
int parse_split_apply(const std::string& s);

// The flat plan's Newton–Schulz owners and groups. force: 0 = choose by cost (groups only
// where the largest matrices bound the step: more ranks than matrices or max/mean above 1.1,
// and only where a larger group lowers the matrix's own modelled time); 1 = one owner per
// matrix; g >= 2 = every matrix on groups of nominal size g (tests, CELO2_NS_SPLIT). By cost,
// splits are kept only if they cut the busiest rank's modelled time by 10 % or more, and
// only while the groups' collectives stay within the model's group_bytes_share.
// force_poly: how groups form the polynomial (ns_split_poly; -1 by cost).
OwnerPlan plan_ns(const std::vector<NsMatrix>& mats, const std::vector<int64_t>& cuts, const RuleConfig& cfg,
                  const NsCostModel& model, int force = 0, int force_poly = -1);

// A lower bound on plan_ns's imbalance (max load / mean) for any plan of this algorithm, in
// which a matrix is orthogonalized by one rank or by a group whose members exchange the Gram
// matrix every iteration (newton_schulz_split) and wait for each other (lockstep): the least
// makespan T such that every matrix has a group size g <= W with ns_time(g) <= T (either way
// of forming the polynomial) and the rank-time the groups hold, Σ g·ns_time(g), fits in W·T.
// ns_time is the busiest member of an even column split; any other split has a member at
// least as wide, so the bound holds for uneven splits too. Packing enters in one way: a
// matrix that, run alone, leaves its rank less time than any other matrix needs keeps that
// rank to itself, or else pays its least split rank-time. It is not always reachable.
double ns_load_bound(const std::vector<NsMatrix>& mats, int W, const RuleConfig& cfg, const NsCostModel& model);

// Member j's block of a matrix split over `size` ranks, and its runs in the flat index space.
struct NsBlock {
  int64_t flat_lo = 0, rows = 0, cols = 0;  // the matrix (row-major rows × cols)
  int size = 1, j = 0;                      // group size, member index
  bool tall() const { return rows > cols; }
  int64_t wide_rows() const { return tall() ? cols : rows; }
  int64_t wide_cols() const { return tall() ? rows : cols; }
  int64_t c0() const { return wide_cols() * j / size; }
  int64_t c1() const { return wide_cols() * (j + 1) / size; }
  int64_t local_cols() const { return c1() - c0(); }
  int64_t numel() const { return wide_rows() * local_cols(); }
  // fn(flat index, count, index in the block) for each run of the block inside [lo, hi),
  // in flat order. The block is stored row-major: wide, r × local_cols(); tall, its rows
  // [c0, c1) of the matrix (local_cols() × cols, the transpose of the wide block).
  template <class F>
  void runs(int64_t lo, int64_t hi, F&& fn) const {
    const int64_t a = std::max(lo, flat_lo), b = std::min(hi, flat_lo + rows * cols);
    if (a >= b) return;
    if (size == 1 || tall()) {
      const int64_t b0 = flat_lo + (size == 1 ? 0 : c0() * cols), b1 = flat_lo + (size == 1 ? rows * cols : c1() * cols);
      const int64_t s = std::max(a, b0), e = std::min(b, b1);
      if (s < e) fn(s, e - s, s - b0);
      return;
    }
    const int64_t k0 = c0(), k1 = c1(), w = k1 - k0;
    if (w == 0) return;
    for (int64_t i = (a - flat_lo) / cols; i < rows && flat_lo + i * cols + k0 < b; ++i) {
      const int64_t r0 = flat_lo + i * cols;
      const int64_t s = std::max(a, r0 + k0), e = std::min(b, r0 + k1);
      if (s < e) fn(s, e - s, i * w + (s - r0 - k0));
    }
  }
  int64_t count_in(int64_t lo, int64_t hi) const {
    int64_t n = 0;
    runs(lo, hi, [&](int64_t, int64_t k, int64_t) { n += k; });
    return n;
  }
};

}  // namespace celo2
