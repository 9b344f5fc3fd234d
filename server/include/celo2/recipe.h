// The Celo2 recipe (spec/celo2.md §4), once: what every engine, backend and client shares.
// The options, the step report, the NaN-policy decision, the AdamW branch's parameters, the
// one element-wise apply p ← p − lr·(u + wd·p) and the update RMS report (the checks of a
// registration and of the options are the engine's own: server/src/engine/recipe_internal.h).
// The sharded Engine (celo2/engine.h) is the only step that calls them; the single-process
// Optimizer (celo2/optimizer.h) is that engine at W = 1.
//
// Labels: celo2 tensors take p ← p − lr(t)·(u + wd·p) with u the Celo2 step; adamw tensors
// take Optax AdamW at mult_1d·lr(t) (mult_1d multiplies the weight decay's effect too,
// because the decay term is inside the lr product); frozen tensors are untouched.
// Non-finite gradients never reach the parameters: the NaN policy decides whether the whole
// step is skipped (default, counted), raised as an error, or the bad entries are treated as
// zero (counted).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "celo2/adamw.h"
#include "celo2/config.h"
#include "celo2/labels.h"
#include "celo2/rule.h"
#include "celo2/schedule.h"

namespace celo2 {

enum class NanPolicy { kSkipStep, kError, kZero };
NanPolicy parse_nan_policy(const std::string& s);  // skip | error | zero
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
  // Global gradient-norm clipping (Megatron's --clip-grad, torch.nn.utils.clip_grad_norm_):
  // > 0 scales the averaged gradients of every celo2 and adamw tensor by
  // min(1, max_grad_norm / (norm + 1e-6)), norm = the L2 norm over all of them; 0: off.
  double max_grad_norm = 0.0;
  // The plain reference kernels (celo2_reference, adamw_reference) instead of the fast CPU
  // backend: the labelled reference of tests and debugging. Needs whole tensors per rank
  // (celo2/engine.h Plan::kWholeTensors, which W = 1 always is).
  bool use_reference = false;
};

// One tensor's hyperparameters, as a torch param group holds them: its learning rate is the
// step's times lr_scale, and weight_decay, when set, replaces the recipe's for it (both
// branches: the celo2 apply's wd and the AdamW branch's decay). Trainers use it for no decay
// on biases and norms (nanoGPT's configure_optimizers, Megatron's no-wd parameters).
struct TensorGroup {
  double lr_scale = 1.0;
  std::optional<double> weight_decay;
  bool operator==(const TensorGroup&) const = default;
};
// Throws std::invalid_argument naming `what` unless lr_scale and weight_decay are finite
// and >= 0.
void check_group(const TensorGroup& g, const std::string& what);

struct StepReport {
  int64_t step = 0;          // updates applied so far, after this call
  double lr = 0.0;
  bool skipped = false;      // non-finite gradients and NanPolicy::kSkipStep
  int64_t nonfinite = 0;     // non-finite gradient entries seen this call
  int64_t nonfinite_update = 0;  // non-finite entries of the Celo2 rule's update (finite
                                 // gradients, weights that overflow): the NaN policy applies
  double update_rms[3] = {};  // per label (celo2, adamw, frozen): RMS of the applied update
  double grad_norm[3] = {};   // per label: L2 norm of the gradients (before clipping)
  double grad_norm_total = 0.0;  // L2 norm over the celo2 and adamw gradients, before clipping
  double clip_scale = 1.0;       // the factor clipping applied (1: none)
  int64_t no_grad_tensors = 0;   // tensors left unchanged: no gradient on any rank (has_grad)
  int64_t masters_reseeded = 0;  // bf16/fp16 elements the trainer wrote since the last step
                                 // (their float32 masters re-seeded from them; lowp.h)
};

class NonFiniteGradientError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Returns x, or throws std::invalid_argument("<what> must be finite") (setters of the recipe).
double require_finite(const char* what, double x);

// The learning rate of one step: finite and not negative (a negative rate moves the
// parameters uphill). Throws std::invalid_argument naming the value otherwise.
double check_step_lr(double lr);

// What a step does about the non-finite gradient entries it found (after the NaN policy).
enum class NanAction { kProceed, kSkip, kZeroEntries };
// The NaN-policy decision for a step that saw `nonfinite` entries (summed over ranks).
// kError throws NonFiniteGradientError naming `where` (the tensors) and the step.
NanAction decide_nan(NanPolicy policy, int64_t nonfinite, int64_t step, const std::string& where);

// The AdamW branch's parameters for one update: lr·mult_1d, the recipe's decay and betas,
// `count` the update count after increment.
AdamWParams adamw_params(const OptimizerOptions& o, double lr, int64_t count, const TensorGroup& g = {});
// The celo2 branch's learning rate and weight decay for a tensor of group g at step lr.
float group_lr(double lr, const TensorGroup& g);
float group_wd(const OptimizerOptions& o, const TensorGroup& g);

// The one element-wise apply of the celo2 branch on the CPU: p ← p − lr·(u + wd·p) on n
// elements; returns Σ (lr·(u + wd·p))², the applied update's squares, in double. (The CUDA
// counterpart with the same arithmetic is celo2::cuda::apply_step_sumsq_device.)
double apply_update(float lr, float wd, int64_t n, float* p, const float* u);

// The AdamW branch on the CPU (adamw_update, or adamw_reference when `reference`); returns
// Σ (p_old − p_new)² in double. `scratch` holds the old parameters (reused across calls).
double adamw_apply(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu, float* nu,
                   bool reference, std::vector<float>& scratch);

// The clipping factor of torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6));
// 1 when max_norm <= 0 (clipping off). A non-finite norm cannot reach it: gradients are
// summed over their finite entries after the NaN policy has decided.
double clip_factor(double max_norm, double norm);

// Fills rep.update_rms from the per-label sums of squares and element counts.
void set_update_rms(StepReport& rep, const double usq[3], const int64_t count[3]);

}  // namespace celo2
