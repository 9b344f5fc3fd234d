// The single-process Celo2 optimizer: registry, labels, the recipe of spec §4, NaN policy,
// state checkpoints.
#include "celo2/optimizer.h"

#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

#include "celo2/adamw.h"
#include "celo2/flax_msgpack.h"
#include "celo2/state_file.h"
#include "celo2/theta_io.h"

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

struct Optimizer::Entry {
  std::string name;
  Geometry geo;
  float* params = nullptr;
  const float* grads = nullptr;
  Label label = Label::kCelo2;
  RuleState rule;                 // celo2 label
  std::vector<float> mu, nu;      // adamw label
  int64_t adam_count = 0;
  std::vector<float> scratch;     // the Celo2 step u / a clean gradient copy

  void reset_branch_state() {
    rule = RuleState{};
    mu.clear();
    nu.clear();
    adam_count = 0;
    if (label == Label::kCelo2) rule = RuleState::zeros(geo);
    if (label == Label::kAdamW) {
      mu.assign(geo.numel, 0.0f);
      nu.assign(geo.numel, 0.0f);
    }
  }
};

void prepare_options(OptimizerOptions& o) {
  o.rule.validate();
  if (o.theta.layers.empty()) o.theta = Theta::project_default(o.rule);
  o.theta.check_fits(o.rule);
  o.schedule.validate();
  require_finite("weight_decay", o.weight_decay);
  require_finite("mult_1d", o.mult_1d);
}

Optimizer::Optimizer(OptimizerOptions options) : opts_(std::move(options)) { prepare_options(opts_); }

Optimizer::~Optimizer() = default;

size_t Optimizer::num_tensors() const { return entries_.size(); }
Label Optimizer::label_of(size_t i) const { return entries_.at(i)->label; }
const std::string& Optimizer::name_of(size_t i) const { return entries_.at(i)->name; }

double require_finite(const char* what, double x) {
  if (!std::isfinite(x)) throw std::invalid_argument(std::string(what) + " must be finite");
  return x;
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

void Optimizer::add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                           const float* grads) {
  auto e = std::make_unique<Entry>();
  e->geo = check_registration(step_ > 0 || skipped_ > 0, name, shape, params, grads,
                              [&](const std::string& n) { return name_taken(entries_, n); });
  e->name = name;
  e->params = params;
  e->grads = grads;
  entries_.push_back(std::move(e));
  relabel();
}

void Optimizer::relabel() {
  std::vector<TensorDesc> descs;
  for (const auto& e : entries_) descs.push_back({e->name, e->geo.shape});
  const std::vector<Label> labels = opts_.rules.assign(descs);
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    const bool fresh = e.rule.m.empty() && e.mu.empty();
    if (fresh || e.label != labels[i]) {
      e.label = labels[i];
      e.reset_branch_state();
    }
  }
}

StepReport Optimizer::step() { return step_with_lr(opts_.schedule.at(step_)); }

StepReport Optimizer::step_with_lr(double lr) {
  StepReport rep;
  rep.lr = lr;
  if (!std::isfinite(lr)) throw std::invalid_argument("step: learning rate is not finite");
  // Scan gradients once: non-finite entries and per-label gradient norms.
  double gsq[3] = {};
  std::vector<int64_t> bad(entries_.size(), 0);
  for (size_t t = 0; t < entries_.size(); ++t) {
    const Entry& e = *entries_[t];
    if (e.label == Label::kFrozen) continue;
    int64_t nb = 0;
    double s = 0.0;
#pragma omp parallel for reduction(+ : nb, s) schedule(static) if (e.geo.numel > 65536)
    for (int64_t i = 0; i < e.geo.numel; ++i) {
      const float g = e.grads[i];
      if (std::isfinite(g)) s += static_cast<double>(g) * g;
      else ++nb;
    }
    bad[t] = nb;
    rep.nonfinite += nb;
    gsq[static_cast<int>(e.label)] += s;
  }
  for (int l = 0; l < 3; ++l) rep.grad_norm[l] = std::sqrt(gsq[l]);
  if (rep.nonfinite > 0) {
    if (opts_.nan_policy == NanPolicy::kError) {
      for (size_t t = 0; t < entries_.size(); ++t)
        if (bad[t])
          throw NonFiniteGradientError("non-finite gradient: " + std::to_string(bad[t]) +
                                       " entries of '" + entries_[t]->name +
                                       "' are NaN or Inf (step " + std::to_string(step_) + ")");
    }
    if (opts_.nan_policy == NanPolicy::kSkipStep) {
      ++skipped_;
      rep.skipped = true;
      rep.step = step_;
      return rep;
    }
  }
  double usq[3] = {};
  int64_t ucount[3] = {};
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    const int64_t n = e.geo.numel;
    if (e.label == Label::kFrozen || n == 0) continue;
    const float* g = e.grads;
    std::vector<float> clean;
    if (bad[t]) {  // NanPolicy::kZero
      clean.assign(g, g + n);
      for (float& v : clean)
        if (!std::isfinite(v)) v = 0.0f;
      g = clean.data();
    }
    e.scratch.resize(n);
    float* p = e.params;
    double sq = 0.0;
    if (e.label == Label::kCelo2) {
      if (opts_.use_reference)
        celo2_reference(opts_.rule, opts_.theta, e.geo, e.rule, g, p, e.scratch.data());
      else
        celo2_update(opts_.rule, opts_.theta, e.geo, e.rule, g, p, e.scratch.data(), ws_);
      const float flr = static_cast<float>(lr), wd = static_cast<float>(opts_.weight_decay);
      const float* u = e.scratch.data();
#pragma omp parallel for simd reduction(+ : sq) schedule(static) if (n > 65536)
      for (int64_t i = 0; i < n; ++i) {
        const float d = flr * (u[i] + wd * p[i]);
        p[i] -= d;
        sq += static_cast<double>(d) * d;
      }
    } else {
      std::memcpy(e.scratch.data(), p, n * sizeof(float));
      AdamWParams a;
      a.b1 = opts_.adam_b1;
      a.b2 = opts_.adam_b2;
      a.eps = opts_.adam_eps;
      a.lr = static_cast<float>(lr * opts_.mult_1d);
      a.wd = static_cast<float>(opts_.weight_decay);
      a.count = ++e.adam_count;
      if (opts_.use_reference) adamw_reference(a, n, p, g, e.mu.data(), e.nu.data());
      else adamw_update(a, n, p, g, e.mu.data(), e.nu.data());
      const float* old = e.scratch.data();
      for (int64_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(old[i]) - p[i];
        sq += d * d;
      }
    }
    usq[static_cast<int>(e.label)] += sq;
    ucount[static_cast<int>(e.label)] += n;
  }
  for (int l = 0; l < 3; ++l)
    rep.update_rms[l] = ucount[l] ? std::sqrt(usq[l] / static_cast<double>(ucount[l])) : 0.0;
  ++step_;
  rep.step = step_;
  return rep;
}

void Optimizer::set_theta(Theta theta) {
  theta.check_fits(opts_.rule);
  opts_.theta = std::move(theta);
}

void Optimizer::set_schedule(const Schedule& s) {
  s.validate();
  opts_.schedule = s;
}

void Optimizer::set_rules(const LabelRules& rules) {
  opts_.rules = rules;
  relabel();
}

std::string Optimizer::routing_table() const {
  std::vector<TensorDesc> descs;
  std::vector<Label> labels;
  for (const auto& e : entries_) {
    descs.push_back({e->name, e->geo.shape});
    labels.push_back(e->label);
  }
  return format_routing_table(descs, labels);
}

// ---------------------------------------------------------------------------------------
// State checkpoints (state_file.h).
// ---------------------------------------------------------------------------------------

void Optimizer::save_state(const std::string& path) const {
  StateFile f;
  f.step = step_;
  f.skipped = skipped_;
  f.theta_sha256 = sha256_hex(theta_to_bytes(opts_.theta));
  for (const auto& ep : entries_) {
    const Entry& e = *ep;
    TensorStateRecord r;
    r.name = e.name;
    r.shape = e.geo.shape;
    r.label = e.label;
    r.iteration = e.rule.iteration;
    r.m = e.rule.m;
    r.rms = e.rule.rms;
    r.v_row = e.rule.v_row;
    r.v_col = e.rule.v_col;
    r.v_diag = e.rule.v_diag;
    r.count = e.adam_count;
    r.mu = e.mu;
    r.nu = e.nu;
    f.tensors.push_back(std::move(r));
  }
  write_state_file(path, f);
}

void Optimizer::load_state(const std::string& path) {
  StateFile f = read_state_file(path);
  if (f.tensors.size() != entries_.size())
    throw flax::FormatError("optimizer state " + path + ": holds " +
                            std::to_string(f.tensors.size()) + " tensors, the optimizer has " +
                            std::to_string(entries_.size()));
  // Validate everything before changing anything.
  std::vector<TensorStateRecord*> recs;
  for (const auto& e : entries_) {
    auto* r = const_cast<TensorStateRecord*>(find_record(f, e->name));
    if (!r) throw flax::FormatError("optimizer state " + path + ": no state for tensor '" + e->name + "'");
    check_state_record(path, *r, e->geo.shape, e->label);
    recs.push_back(r);
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    TensorStateRecord& r = *recs[i];
    e.rule.iteration = r.iteration;
    e.rule.m = std::move(r.m);
    e.rule.rms = std::move(r.rms);
    e.rule.v_row = std::move(r.v_row);
    e.rule.v_col = std::move(r.v_col);
    e.rule.v_diag = std::move(r.v_diag);
    e.adam_count = r.count;
    e.mu = std::move(r.mu);
    e.nu = std::move(r.nu);
  }
  step_ = f.step;
  skipped_ = f.skipped;
}

}  // namespace celo2
