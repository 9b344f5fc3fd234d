// Many single-process Celo2 optimizers stepped together: "members" with the same tensor
// layout and the same options except theta, each with its own parameters, gradients, state,
// step count and theta. For populations of tiny models (meta-training's inner particles,
// celo2/metatrain/pes.h), where one celo2::Optimizer per model spends most of a step on
// per-call costs. One step() runs the recipe of celo2/recipe.h for every member: the NaN
// policy's decisions, the rule of all members' celo2 tensors in one celo2_update_batch()
// call (celo2/rule_batch.h: phase kernels without OpenMP, every matrix's Newton–Schulz in one
// loop), the celo2 apply (apply_update) and the AdamW branch (adamw_params, adamw_apply).
//
// Each member's parameters and report equal a celo2::Optimizer's with the same options and
// theta on the same tensors: bit for bit with NsBatch::kPerMatrix for tensors under 16,384
// elements, to float rounding with the default NsBatch::kBatched (celo2/rule_batch.h;
// tests/unit/rule_batch_test.cc). Not supported (std::invalid_argument at construction):
// NanPolicy::kZero, gradient clipping (max_grad_norm > 0), the reference kernels, tensor
// groups, low-precision parameters, has_grad.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "celo2/recipe.h"
#include "celo2/rule_batch.h"

namespace celo2 {

class OptimizerBatch {
 public:
  // o.theta (or Theta::project_default when empty) is every new member's theta.
  explicit OptimizerBatch(OptimizerOptions o);

  // The layout, tensor by tensor, before the first member (labels from o.rules, as an
  // Optimizer assigns them at its first step).
  void add_tensor(const std::string& name, std::vector<int64_t> shape);
  // A new member (state zero, step 0): one parameter and one gradient pointer per tensor,
  // in add_tensor order. Returns its index.
  int add_member(const std::vector<float*>& params, const std::vector<const float*>& grads);
  // Makes member m a fresh optimizer again (state, counters, report) on these buffers.
  void reset_member(int m, const std::vector<float*>& params, const std::vector<const float*>& grads);
  void set_theta(int m, const Theta& theta);
  // Newton–Schulz of the members' matrices: NsBatch::kBatched (default; small-matrix kernels,
  // equal to an Optimizer's to float rounding) or kPerMatrix (BLAS per matrix, bit for bit).
  void set_ns_batch(NsBatch ns) { ns_ = ns; }

  // One step of every member.
  void step();

  int members() const { return static_cast<int>(members_.size()); }
  int num_tensors() const { return static_cast<int>(tensors_.size()); }
  Label label(int t) const { return tensors_.at(t).label; }
  const StepReport& report(int m) const { return members_.at(m).report; }
  int64_t step_count(int m) const { return members_.at(m).step; }
  int64_t skipped_steps(int m) const { return members_.at(m).skipped; }
  const OptimizerOptions& options() const { return opts_; }

 private:
  struct Tensor {
    std::string name;
    Geometry geo;
    Label label = Label::kCelo2;
  };
  struct TensorState {
    RuleState rule;              // celo2
    std::vector<float> mu, nu;   // adamw
    std::vector<float> u;        // celo2: the raw step of this update
    int64_t count = 0;           // adamw updates
  };
  struct Member {
    std::vector<float*> params;
    std::vector<const float*> grads;
    std::vector<TensorState> state;
    Theta theta;
    int64_t step = 0, skipped = 0;
    StepReport report;
    bool proceed = false;  // this step: gradients finite (or no decision needed)
  };
  void bind(Member& mb, const std::vector<float*>& params, const std::vector<const float*>& grads);

  OptimizerOptions opts_;
  std::vector<Tensor> tensors_;
  bool labelled_ = false;
  std::vector<Member> members_;
  std::vector<RuleBatchItem> items_;
  std::vector<uint32_t> item_member_;  // the member of each item
  RuleBatchWorkspace ws_;
  NsBatch ns_ = NsBatch::kBatched;
  std::vector<float> scratch_;
};

}  // namespace celo2
