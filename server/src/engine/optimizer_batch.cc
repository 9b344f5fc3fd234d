// OptimizerBatch (celo2/optimizer_batch.h): the recipe of celo2/recipe.h over many small
// single-process optimizers at once, in the order Engine::step_with_lr runs it at W = 1.
#include "celo2/optimizer_batch.h"

#include <cmath>
#include <stdexcept>

#include "celo2/lane_sum.h"
#include "recipe_internal.h"

namespace celo2 {
namespace {

// The sum of squares of the finite entries (double, celo2/lane_sum.h's partition, as the
// engine's backends) and the count of the others: of the gradients, and (the count only) of
// the Celo2 updates for the update gate, as the engine's Backend::grad_stats.
struct GradStats {
  double sumsq = 0;
  int64_t nonfinite = 0;
};
GradStats grad_stats(const float* g, int64_t n) {
  GradStats s;
  double bad = 0;
  finite_sumsq(g, n, &bad, &s.sumsq);
  s.nonfinite = static_cast<int64_t>(bad);
  return s;
}

}  // namespace

OptimizerBatch::OptimizerBatch(OptimizerOptions o) : opts_(std::move(o)) {
  prepare_options(opts_);
  if (opts_.nan_policy == NanPolicy::kZero)
    throw std::invalid_argument("OptimizerBatch: NaN policy 'zero' is not supported (skip or error)");
  if (opts_.max_grad_norm > 0)
    throw std::invalid_argument("OptimizerBatch: gradient clipping is not supported");
  if (opts_.use_reference)
    throw std::invalid_argument("OptimizerBatch: the reference kernels are not supported");
}

void OptimizerBatch::add_tensor(const std::string& name, std::vector<int64_t> shape) {
  static const float kDummy = 0.0f;  // the checks want pointers; members bring their own
  Tensor t;
  t.geo = check_registration(labelled_, name, shape, &kDummy, &kDummy, [&](const std::string& n) {
    for (const Tensor& x : tensors_)
      if (x.name == n) return true;
    return false;
  });
  t.name = name;
  tensors_.push_back(std::move(t));
}

void OptimizerBatch::bind(Member& mb, const std::vector<float*>& params,
                          const std::vector<const float*>& grads) {
  if (params.size() != tensors_.size() || grads.size() != tensors_.size())
    throw std::invalid_argument("OptimizerBatch: a member needs " + std::to_string(tensors_.size()) +
                                " parameter and gradient pointers");
  for (size_t t = 0; t < tensors_.size(); ++t)
    if (tensors_[t].geo.numel > 0 && (params[t] == nullptr || grads[t] == nullptr))
      throw std::invalid_argument("OptimizerBatch: null pointer for '" + tensors_[t].name + "'");
  mb.params = params;
  mb.grads = grads;
  mb.state.resize(tensors_.size());
  for (size_t t = 0; t < tensors_.size(); ++t) {
    const Tensor& tn = tensors_[t];
    TensorState& s = mb.state[t];
    s = TensorState{};
    if (tn.label == Label::kCelo2) {
      s.rule = RuleState::zeros(tn.geo);
      s.u.assign(static_cast<size_t>(tn.geo.numel), 0.0f);
    } else if (tn.label == Label::kAdamW) {
      s.mu.assign(static_cast<size_t>(tn.geo.numel), 0.0f);
      s.nu.assign(static_cast<size_t>(tn.geo.numel), 0.0f);
    }
  }
  mb.step = mb.skipped = 0;
  mb.report = StepReport{};
}

int OptimizerBatch::add_member(const std::vector<float*>& params, const std::vector<const float*>& grads) {
  if (!labelled_) {
    std::vector<TensorDesc> desc;
    for (const Tensor& t : tensors_) desc.push_back({t.name, t.geo.shape});
    const std::vector<Label> labels = opts_.rules.assign(desc);
    for (size_t t = 0; t < tensors_.size(); ++t) tensors_[t].label = labels[t];
    labelled_ = true;
  }
  Member mb;
  mb.theta = opts_.theta;
  bind(mb, params, grads);
  members_.push_back(std::move(mb));
  return static_cast<int>(members_.size()) - 1;
}

void OptimizerBatch::reset_member(int m, const std::vector<float*>& params,
                                  const std::vector<const float*>& grads) {
  bind(members_.at(m), params, grads);
}

void OptimizerBatch::set_theta(int m, const Theta& theta) {
  theta.check_fits(opts_.rule);
  members_.at(m).theta = theta;
}

void OptimizerBatch::step() {
  const OptimizerOptions& o = opts_;
  const size_t T = tensors_.size();
  items_.clear();
  item_member_.clear();
  // 1. Per member: the gradients' non-finite entries and norms, the NaN decision.
  for (size_t k = 0; k < members_.size(); ++k) {
    Member& mb = members_[k];
    StepReport& rep = mb.report;
    rep = StepReport{};
    rep.lr = check_step_lr(o.schedule.at(mb.step));
    double sq[3] = {0, 0, 0};
    int64_t bad = 0;
    for (size_t t = 0; t < T; ++t) {
      const Tensor& tn = tensors_[t];
      if (tn.label == Label::kFrozen) continue;
      const GradStats gs = grad_stats(mb.grads[t], tn.geo.numel);
      sq[static_cast<int>(tn.label)] += gs.sumsq;
      bad += gs.nonfinite;
    }
    rep.nonfinite = bad;
    for (int l = 0; l < 3; ++l) rep.grad_norm[l] = std::sqrt(sq[l]);
    static const std::string kNoName;
    mb.proceed = decide_nan(o.nan_policy, rep.nonfinite, mb.step,
                            rep.nonfinite > 0 ? "member " + std::to_string(k) : kNoName) ==
                 NanAction::kProceed;
    if (!mb.proceed) {
      ++mb.skipped;
      rep.skipped = true;
      rep.step = mb.step;
      continue;
    }
    rep.grad_norm_total = std::sqrt(sq[static_cast<int>(Label::kCelo2)] + sq[static_cast<int>(Label::kAdamW)]);
    for (size_t t = 0; t < T; ++t) {
      const Tensor& tn = tensors_[t];
      if (tn.label != Label::kCelo2 || tn.geo.numel == 0) continue;
      TensorState& s = mb.state[t];
      items_.push_back({&tn.geo, &mb.theta, &s.rule, mb.grads[t], mb.params[t], s.u.data()});
      item_member_.push_back(static_cast<uint32_t>(k));
    }
  }
  // 2. The rule of every proceeding member's celo2 tensors, in one call.
  celo2_update_batch(o.rule, items_, ws_, ns_);
  // 3. Per member: the updates' NaN decision, the celo2 apply, the AdamW branch.
  for (size_t k = 0; k < members_.size(); ++k) {
    Member& mb = members_[k];
    if (!mb.proceed) continue;
    StepReport& rep = mb.report;
    int64_t bad = 0;
    for (size_t t = 0; t < T; ++t)
      if (tensors_[t].label == Label::kCelo2) bad += grad_stats(mb.state[t].u.data(), tensors_[t].geo.numel).nonfinite;
    rep.nonfinite_update = bad;
    if (decide_nan(o.nan_policy, rep.nonfinite_update, mb.step,
                   "in the Celo2 update, from finite gradients: the MLP weights give non-finite output") !=
        NanAction::kProceed) {
      ++mb.skipped;  // the rule's state has taken this step's gradients, as Engine's
      rep.skipped = true;
      rep.step = mb.step;
      continue;
    }
    double usq[3] = {0, 0, 0};
    int64_t cnt[3] = {0, 0, 0};
    const float lr = group_lr(rep.lr, TensorGroup{}), wd = group_wd(o, TensorGroup{});
    for (size_t t = 0; t < T; ++t) {
      const Tensor& tn = tensors_[t];
      cnt[static_cast<int>(tn.label)] += tn.geo.numel;
      if (tn.label != Label::kCelo2 || tn.geo.numel == 0) continue;
      usq[0] += apply_update(lr, wd, tn.geo.numel, mb.params[t], mb.state[t].u.data());
    }
    for (size_t t = 0; t < T; ++t) {
      const Tensor& tn = tensors_[t];
      if (tn.label != Label::kAdamW || tn.geo.numel == 0) continue;
      TensorState& s = mb.state[t];
      s.count += 1;
      usq[1] += adamw_apply(adamw_params(o, rep.lr, s.count), tn.geo.numel, mb.params[t], mb.grads[t],
                            s.mu.data(), s.nu.data(), false, scratch_);
    }
    set_update_rms(rep, usq, cnt);
    ++mb.step;
    rep.step = mb.step;
  }
}

}  // namespace celo2
