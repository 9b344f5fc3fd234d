// The Celo2 rule on many small tensors at once (spec/celo2.md §2–§3): each tensor with its own
// geometry, state and theta, one call for all of them. For workloads of many tiny,
// independent optimizers (meta-training's inner particles: 64×32 matrices, 32-element
// biases) where celo2_update()'s per-call costs (OpenMP regions, lane bookkeeping, scratch
// sizing) and one Newton–Schulz call per tensor per optimizer dominate the arithmetic.
//
// It runs the phase kernels of celo2/rule.h in celo2_update()'s order, every tensor as one
// lane and without OpenMP, and the Newton–Schulz of all matrices of one shape in one call of
// newton_schulz_batch (or, NsBatch::kPerMatrix, newton_schulz() per matrix in one loop). With
// kPerMatrix, a tensor on which celo2_update() uses one lane (every tensor under 16,384
// elements) gets the same floats, bit for bit (tests/unit/rule_batch_test.cc); larger tensors
// are computed in one lane here, a different (fixed) summation order from celo2_update's
// lanes, so they agree to float rounding only, as kBatched does everywhere.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "celo2/config.h"
#include "celo2/rule.h"

namespace celo2 {

struct RuleBatchItem {
  const Geometry* geo = nullptr;
  const Theta* theta = nullptr;  // this tensor's weights of the rule
  RuleState* state = nullptr;    // updated; its iteration is incremented
  const float* g = nullptr;      // gradient (numel)
  const float* p = nullptr;      // parameters (numel), read only
  float* u = nullptr;            // the raw step (output, numel)
};

// Scratch reused across calls (no allocation once it has seen the largest tensor).
struct RuleBatchWorkspace {
  std::vector<double> stats, sumsq, out_sumsq;
  FacTables tables;
  std::vector<float> ns_buf;
  std::vector<float*> ns_ptrs;  // matrices of one shape for newton_schulz_batch
};

// How celo2_update_batch orthogonalizes.
enum class NsBatch {
  kBatched,    // newton_schulz_batch per shape: small-matrix kernels; agrees with
               // celo2_update to float rounding (within 1e-5 of the update's RMS per element)
  kPerMatrix,  // newton_schulz() per matrix (BLAS): the floats of celo2_update, bit for bit
};

// The rule on every item, as celo2_update(cfg, *it.theta, *it.geo, *it.state, it.g, it.p,
// it.u, ·) would compute it. Items must not share state or u.
void celo2_update_batch(const RuleConfig& cfg, std::span<const RuleBatchItem> items,
                        RuleBatchWorkspace& ws, NsBatch ns = NsBatch::kBatched);

// Newton–Schulz (celo2/newton_schulz.h's standard iteration, the same scaling and polynomial)
// of several rows×cols row-major matrices, in place, one after the other in one scratch, with
// register-blocked products of its own instead of BLAS calls (kernels/src/ns_batch.cc).
// Agrees with newton_schulz() to float rounding, not bit for bit (another summation order).
// Where the process has chosen the Gram iteration (set_ns_method_default) it calls
// newton_schulz() per matrix.
void newton_schulz_batch(const RuleConfig& cfg, int64_t rows, int64_t cols,
                         std::span<float* const> xs, std::vector<float>& scratch);

}  // namespace celo2
