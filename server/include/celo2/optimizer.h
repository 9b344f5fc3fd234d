// The single-process Celo2 optimizer (the recipe of spec/celo2.md §4): a C++ trainer
// registers named tensors (shape, parameter pointer, gradient pointer) in a fixed order and
// calls step(). Each tensor is labelled by LabelRules: celo2 tensors take
// p ← p − lr(t)·(u + wd·p) with u the Celo2 step; adamw tensors take Optax AdamW at
// mult_1d·lr(t); frozen tensors are untouched.
//
// Non-finite gradients never reach the parameters: the NaN policy decides whether the
// whole step is skipped (default, counted), raised as an error, or the bad entries are
// treated as zero (counted).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/labels.h"
#include "celo2/rule.h"
#include "celo2/schedule.h"

namespace celo2 {

enum class NanPolicy { kSkipStep, kError, kZero };
NanPolicy parse_nan_policy(const std::string& s);
const char* nan_policy_name(NanPolicy p);

struct OptimizerOptions {
  RuleConfig rule;
  Theta theta;  // empty = Theta::project_default(rule)
  Schedule schedule;
  LabelRules rules = LabelRules::seed_default();
  double weight_decay = 0.0;
  double mult_1d = 20.0;
  float adam_b1 = 0.9f, adam_b2 = 0.95f, adam_eps = 1e-8f;
  NanPolicy nan_policy = NanPolicy::kSkipStep;
  bool use_reference = false;  // run the plain reference kernels (tests, debugging)
};

struct StepReport {
  int64_t step = 0;          // updates applied so far, after this call
  double lr = 0.0;
  bool skipped = false;      // non-finite gradients and NanPolicy::kSkipStep
  int64_t nonfinite = 0;     // non-finite gradient entries seen this call
  double update_rms[3] = {};  // per label (celo2, adamw, frozen): RMS of the applied update
  double grad_norm[3] = {};   // per label: L2 norm of the gradients
};

// The checks of a tensor registration, shared by Optimizer and Engine: registration still
// open, a non-empty unique name (`taken(name)` says whether it is already registered), a
// valid shape, non-null pointers for a non-empty tensor. Returns the tensor's geometry;
// throws std::logic_error / std::invalid_argument naming the tensor otherwise.
Geometry check_registration(bool closed, const std::string& name,
                            const std::vector<int64_t>& shape, const float* params,
                            const float* grads, const std::function<bool(const std::string&)>& taken);

// Returns x, or throws std::invalid_argument("<what> must be finite") (setters of the recipe).
double require_finite(const char* what, double x);

// The checks every engine makes of its options at construction (rule, theta, schedule, finite
// recipe numbers), filling in the default theta (Theta::project_default) when none is given.
void prepare_options(OptimizerOptions& o);

// Whether `name` is already registered among `entries` (anything with a `name` member): the
// `taken` predicate of check_registration.
template <class Entries>
bool name_taken(const Entries& entries, const std::string& name) {
  for (const auto& e : entries)
    if (e->name == name) return true;
  return false;
}

class NonFiniteGradientError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Optimizer {
 public:
  explicit Optimizer(OptimizerOptions options);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Register a tensor. Names must be unique; shapes fixed. `params` is updated in place,
  // `grads` is read at each step(). Registration closes at the first step.
  void add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                  const float* grads);

  StepReport step();                  // lr = schedule.at(step_count())
  StepReport step_with_lr(double lr);  // explicit base lr (golden files, tests)

  // World-size-independent state by tensor name (checkpoints). Atomic write with checksum;
  // load validates everything before changing anything and throws naming the problem.
  void save_state(const std::string& path) const;
  void load_state(const std::string& path);

  // Control: swap weights (keeps accumulators), schedule, rules (re-labels; a tensor whose
  // label changes starts that branch's state from zero).
  void set_theta(Theta theta);
  void set_schedule(const Schedule& s);
  void set_rules(const LabelRules& rules);
  void set_weight_decay(double wd) { opts_.weight_decay = require_finite("weight_decay", wd); }
  void set_mult_1d(double m) { opts_.mult_1d = require_finite("mult_1d", m); }

  std::string routing_table() const;  // name, shape, label, elements; totals per label
  int64_t step_count() const { return step_; }
  int64_t skipped_steps() const { return skipped_; }
  const OptimizerOptions& options() const { return opts_; }
  size_t num_tensors() const;
  Label label_of(size_t i) const;
  const std::string& name_of(size_t i) const;

 private:
  struct Entry;
  void relabel();
  OptimizerOptions opts_;
  std::vector<std::unique_ptr<Entry>> entries_;
  int64_t step_ = 0;
  int64_t skipped_ = 0;
  Workspace ws_;
};

}  // namespace celo2
