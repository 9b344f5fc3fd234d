// The recipe pieces of celo2/recipe.h and of the engine's recipe_internal.h.
#include "celo2/recipe.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "celo2/lane_sum.h"
#include "recipe_internal.h"

namespace celo2 {

NanPolicy parse_nan_policy(const std::string& s) {
  if (s == "skip") return NanPolicy::kSkipStep;
  if (s == "error") return NanPolicy::kError;
  if (s == "zero") return NanPolicy::kZero;
  throw std::invalid_argument("unknown NaN policy '" + s + "' (expected skip, error or zero)");
}

const char* nan_policy_name(NanPolicy p) {
  switch (p) {
    case NanPolicy::kSkipStep: return "skip";
    case NanPolicy::kError: return "error";
    case NanPolicy::kZero: return "zero";
  }
  return "?";
}

double require_finite(const char* what, double x) {
  if (!std::isfinite(x)) throw std::invalid_argument(std::string(what) + " must be finite");
  return x;
}

double check_step_lr(double lr) {
  if (!std::isfinite(lr)) throw std::invalid_argument("step: learning rate is not finite");
  if (lr < 0.0)
    throw std::invalid_argument("step: learning rate " + std::to_string(lr) +
                                " is negative (it would move the parameters uphill)");
  return lr;
}

void prepare_options(OptimizerOptions& o) {
  o.rule.validate();
  if (o.theta.layers.empty()) o.theta = Theta::project_default(o.rule);
  o.theta.check_fits(o.rule);
  o.schedule.validate();
  require_finite("weight_decay", o.weight_decay);
  require_finite("mult_1d", o.mult_1d);
  if (!std::isfinite(o.max_grad_norm) || o.max_grad_norm < 0)
    throw std::invalid_argument("max_grad_norm must be a finite number >= 0 (0: no clipping)");
}

Geometry check_registration(bool closed, const std::string& name,
                            const std::vector<int64_t>& shape, const float* params,
                            const float* grads, const std::function<bool(const std::string&)>& taken) {
  if (closed)
    throw std::logic_error("add_tensor('" + name + "'): registration closed at the first step");
  if (name.empty()) throw std::invalid_argument("add_tensor: empty tensor name");
  if (taken(name)) throw std::invalid_argument("add_tensor: duplicate tensor name '" + name + "'");
  Geometry geo;
  try {
    geo = Geometry::of(shape);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("add_tensor('" + name + "'): " + e.what());
  }
  if (geo.numel > 0 && (params == nullptr || grads == nullptr))
    throw std::invalid_argument("add_tensor('" + name + "'): null params or grads pointer");
  return geo;
}

NanAction decide_nan(NanPolicy policy, int64_t nonfinite, int64_t step, const std::string& where) {
  if (nonfinite == 0) return NanAction::kProceed;
  switch (policy) {
    case NanPolicy::kError:
      throw NonFiniteGradientError("non-finite gradient: " + std::to_string(nonfinite) +
                                   " entries are NaN or Inf (" + where + "; step " +
                                   std::to_string(step) + ")");
    case NanPolicy::kSkipStep: return NanAction::kSkip;
    case NanPolicy::kZero: return NanAction::kZeroEntries;
  }
  return NanAction::kSkip;
}

void check_group(const TensorGroup& g, const std::string& what) {
  if (!std::isfinite(g.lr_scale) || g.lr_scale < 0)
    throw std::invalid_argument(what + ": lr_scale must be a finite number >= 0, got " + std::to_string(g.lr_scale));
  if (g.weight_decay && (!std::isfinite(*g.weight_decay) || *g.weight_decay < 0))
    throw std::invalid_argument(what + ": weight_decay must be a finite number >= 0, got " +
                                std::to_string(*g.weight_decay));
}

float group_lr(double lr, const TensorGroup& g) { return static_cast<float>(lr * g.lr_scale); }

float group_wd(const OptimizerOptions& o, const TensorGroup& g) {
  return static_cast<float>(g.weight_decay.value_or(o.weight_decay));
}

AdamWParams adamw_params(const OptimizerOptions& o, double lr, int64_t count, const TensorGroup& g) {
  AdamWParams a;
  a.b1 = o.adam_b1;
  a.b2 = o.adam_b2;
  a.eps = o.adam_eps;
  a.lr = static_cast<float>(lr * g.lr_scale * o.mult_1d);
  a.wd = group_wd(o, g);
  a.count = count;
  return a;
}

double apply_update(float lr, float wd, int64_t n, float* p, const float* u) {
  return lane_sum(n, [=](int64_t i) {
    const float d = ew::applied_step(lr, wd, p[i], u[i]);
    p[i] -= d;
    return static_cast<double>(d) * d;
  });
}

double adamw_apply(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu, float* nu,
                   bool reference, std::vector<float>& scratch) {
  if (!reference) return adamw_update_sumsq(a, n, p, g, mu, nu);
  // The reference: the plain update, then the squares of the parameters' change, one by one.
  scratch.assign(p, p + n);
  adamw_reference(a, n, p, g, mu, nu);
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(scratch[i]) - p[i];
    sq += d * d;
  }
  return sq;
}

double clip_factor(double max_norm, double norm) {
  if (!(max_norm > 0.0)) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

void set_update_rms(StepReport& rep, const double usq[3], const int64_t count[3]) {
  for (int l = 0; l < 3; ++l)
    rep.update_rms[l] = count[l] ? std::sqrt(usq[l] / static_cast<double>(count[l])) : 0.0;
}

}  // namespace celo2
