#include "celo2/metatrain/pes.h"

#include <cmath>
#include <stdexcept>
#include <tuple>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "celo2/labels.h"
#include "celo2/schedule.h"

namespace celo2::meta {

double normalize_meta_loss(double loss) {
  if (!std::isfinite(loss)) return meta_loss_max();
  return std::min(std::max(loss, 0.0), meta_loss_max());
}

namespace {
// splitmix64: independent seeds for the pairs from one run seed.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace

OptimizerOptions inner_options(const InnerConfig& cfg, const Theta& theta) {
  OptimizerOptions o;
  o.rule = cfg.rule;
  o.theta = theta;
  o.schedule = Schedule::constant(cfg.lr);
  o.rules = cfg.rule.orthogonalize ? LabelRules::metatrain_default() : LabelRules::all_celo2();
  o.mult_1d = cfg.mult_1d;
  o.nan_policy = NanPolicy::kSkipStep;
  return o;
}

std::unique_ptr<OptimizerBatch> make_inner_batch(const InnerConfig& cfg, const Theta& theta) {
  auto b = std::make_unique<OptimizerBatch>(inner_options(cfg, theta));
  const data::MlpTask shape(cfg.layers, 0);
  for (int i = 0; i < shape.num_tensors(); ++i) b->add_tensor(shape.name(i), shape.shape(i));
  return b;
}

InnerPair::InnerPair(const InnerConfig& cfg, const TaskFamily& family, uint64_t seed,
                     OptimizerBatch* batch)
    : cfg_(cfg), family_(&family), batch_(batch), seed_(seed), rng_(seed) {
  if (cfg_.truncation <= 0) throw std::invalid_argument("truncation must be positive");
  if (cfg_.unroll_min <= 0 || cfg_.unroll_max < cfg_.unroll_min) {
    throw std::invalid_argument("unroll lengths: need 0 < min <= max");
  }
  if (!(cfg_.reparam_lo > 0) || cfg_.reparam_hi < cfg_.reparam_lo) {
    throw std::invalid_argument("reparameterization range: need 0 < lo <= hi");
  }
  plus_ = std::make_unique<Particle>(cfg_.layers);
  minus_ = std::make_unique<Particle>(cfg_.layers);
  x_.resize(static_cast<size_t>(cfg_.batch) * cfg_.layers.front());
  y_.resize(static_cast<size_t>(cfg_.batch));
}

void InnerPair::make_particle(Particle& p, const Theta& theta_shape, uint64_t init_seed) {
  p.model.init(init_seed);
  const int n = p.model.num_tensors();
  p.w.resize(n);
  p.gw.resize(n);
  const float inv = static_cast<float>(1.0 / scale_);
  for (int i = 0; i < n; ++i) {
    const float* init = p.model.params(i);
    p.w[i].resize(static_cast<size_t>(p.model.numel(i)));
    for (size_t k = 0; k < p.w[i].size(); ++k) p.w[i][k] = init[k] * inv;
    p.gw[i].assign(p.w[i].size(), 0.0f);
  }
  if (batch_) {
    std::vector<float*> params(n);
    std::vector<const float*> grads(n);
    for (int i = 0; i < n; ++i) params[i] = p.w[i].data(), grads[i] = p.gw[i].data();
    if (p.member < 0) p.member = batch_->add_member(params, grads);
    else batch_->reset_member(p.member, params, grads);
    batch_->set_theta(p.member, theta_shape);
    return;
  }
  p.opt = std::make_unique<Optimizer>(inner_options(cfg_, theta_shape));
  for (int i = 0; i < n; ++i)
    p.opt->add_tensor(p.model.name(i), p.model.shape(i), p.w[i].data(), p.gw[i].data());
}

void InnerPair::reset(const Theta& theta_shape) {
  ++generation_;
  const TaskFamily::Source& src = family_->sources[family_->pick(rng_)];
  task_name_ = src.name;
  data_ = src.data ? src.data
                   : std::make_shared<const data::Dataset>(make_teacher_dataset(rng_.bits()));
  if (data_->dim != cfg_.layers.front() || data_->num_classes != cfg_.layers.back()) {
    throw std::invalid_argument("task '" + src.name + "' has " + std::to_string(data_->dim) +
                                " features and " + std::to_string(data_->num_classes) +
                                " classes; the inner MLP does not fit it");
  }
  sampler_ = std::make_unique<data::BatchSampler>(data_->n, cfg_.batch, rng_.bits());
  // Both draws are always taken, so the rest of the run (length, initial weights, batches)
  // does not depend on whether the augmentation applies.
  const double u_apply = rng_.uniform(), u_scale = rng_.uniform();
  scale_ = 1.0;
  if (u_apply < cfg_.reparam_prob) {
    const double lo = std::log(cfg_.reparam_lo), hi = std::log(cfg_.reparam_hi);
    scale_ = std::exp(lo + u_scale * (hi - lo));
  }
  const double lo = std::log(static_cast<double>(cfg_.unroll_min));
  const double hi = std::log(static_cast<double>(cfg_.unroll_max));
  const auto len = static_cast<int64_t>(std::llround(std::exp(lo + rng_.uniform() * (hi - lo))));
  unroll_ = (len + cfg_.truncation - 1) / cfg_.truncation * cfg_.truncation;
  const uint64_t init_seed = rng_.bits();
  make_particle(*plus_, theta_shape, init_seed);
  make_particle(*minus_, theta_shape, init_seed);
  step_ = 0;
}

double InnerPair::particle_grad(Particle& p, const float* x, const int* y) {
  const float s = static_cast<float>(scale_);
  const int n = p.model.num_tensors();
  for (int i = 0; i < n; ++i) {
    float* dst = p.model.params(i);
    const std::vector<float>& w = p.w[i];
    for (size_t k = 0; k < w.size(); ++k) dst[k] = w[k] * s;
  }
  const double loss = p.model.loss_and_grad(x, y, cfg_.batch);
  for (int i = 0; i < n; ++i) {
    const float* g = p.model.grads(i);
    std::vector<float>& gw = p.gw[i];
    for (size_t k = 0; k < gw.size(); ++k) gw[k] = g[k] * s;
  }
  return loss;
}

void InnerPair::set_thetas(const Theta& plus, const Theta& minus) {
  if (batch_) {
    batch_->set_theta(plus_->member, plus);
    batch_->set_theta(minus_->member, minus);
  } else {
    plus_->opt->set_theta(plus);
    minus_->opt->set_theta(minus);
  }
}

std::pair<double, double> InnerPair::step_grads() {
  sampler_->next(*data_, x_.data(), y_.data());  // both particles see the same batch
  const double lp = particle_grad(*plus_, x_.data(), y_.data());
  const double lm = particle_grad(*minus_, x_.data(), y_.data());
  return {lp, lm};
}

std::pair<double, double> InnerPair::run(const Theta& plus, const Theta& minus, int steps) {
  if (batch_) throw std::logic_error("InnerPair::run: a batched pair is stepped by its batch");
  set_thetas(plus, minus);
  double lp = 0.0, lm = 0.0;
  for (int t = 0; t < steps; ++t) {
    const auto [a, b] = step_grads();
    plus_->opt->step();
    minus_->opt->step();
    lp += normalize_meta_loss(a);
    lm += normalize_meta_loss(b);
    advance();
  }
  return {lp / steps, lm / steps};
}

PesEstimator::PesEstimator(const PesConfig& cfg, const TaskFamily& family,
                           const Theta& theta_shape, int rank, int world)
    : cfg_(cfg), shape_(theta_shape), plus_(theta_shape), minus_(theta_shape) {
  if (cfg_.tasks <= 0) throw std::invalid_argument("PES: tasks must be positive");
  if (!(cfg_.sigma > 0)) throw std::invalid_argument("PES: sigma must be positive");
  if (world <= 0 || rank < 0 || rank >= world) throw std::invalid_argument("PES: bad rank/world");
  const int64_t n = theta_shape.size();
  if (cfg_.batched) {
    batch_ = make_inner_batch(cfg_.inner, theta_shape);
    batch_->set_ns_batch(cfg_.ns_batch);
  }
  for (int i = rank; i < cfg_.tasks; i += world) {
    auto pair = std::make_unique<InnerPair>(cfg_.inner, family,
                                            mix(cfg_.seed * 1000003ULL + static_cast<uint64_t>(i)),
                                            batch_.get());
    pair->reset(theta_shape);
    pairs_.push_back(std::move(pair));
    xi_.emplace_back(static_cast<size_t>(n), 0.0f);
  }
}

namespace {

// Subnormal floats flushed to zero (FTZ: results; DAZ: operands) on this thread while in
// scope; the previous mode is restored. A no-op where the control word is not SSE's.
class FlushDenormals {
 public:
  explicit FlushDenormals(bool on) {
#if defined(__SSE__)
    if (!on) return;
    saved_ = _mm_getcsr();
    active_ = true;
    _mm_setcsr(saved_ | kFtz | kDaz);
#else
    (void)on;
#endif
  }
  ~FlushDenormals() {
#if defined(__SSE__)
    if (active_) _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_ = 0;
  bool active_ = false;
};

}  // namespace

PesStats PesEstimator::estimate(const std::vector<float>& theta, std::vector<double>& grad) {
  const FlushDenormals ftz(cfg_.flush_denormals);
  const size_t n = theta.size();
  if (grad.size() != n || static_cast<int64_t>(n) != shape_.size()) {
    throw std::invalid_argument("PES: theta/gradient sizes do not match the rule");
  }
  PesStats st;
  eps_.resize(n);
  tp_.resize(n);
  tm_.resize(n);
  const double sigma = cfg_.sigma;
  const double denom = 2.0 * sigma * sigma * cfg_.tasks;
  const int steps = cfg_.inner.truncation;
  const size_t P = pairs_.size();
  lp_.assign(P, 0.0);
  lm_.assign(P, 0.0);
  // Each pair draws ε from its own generator and accumulates ξ; the pair's particles take
  // θ ± ε for this truncation.
  auto perturb = [&](size_t j) {
    InnerPair& pair = *pairs_[j];
    std::vector<float>& xi = xi_[j];
    for (size_t k = 0; k < n; ++k) {
      eps_[k] = static_cast<float>(sigma * pair.rng().next());
      xi[k] += eps_[k];
      tp_[k] = theta[k] + eps_[k];
      tm_[k] = theta[k] - eps_[k];
    }
    plus_.set_values(tp_.data(), tp_.size());
    minus_.set_values(tm_.data(), tm_.size());
  };
  if (batch_) {
    // All pairs in lockstep: every particle's gradient, then one step of the whole batch.
    for (size_t j = 0; j < P; ++j) {
      perturb(j);
      pairs_[j]->set_thetas(plus_, minus_);
    }
    for (int t = 0; t < steps; ++t) {
      for (size_t j = 0; j < P; ++j) {
        const auto [a, b] = pairs_[j]->step_grads();
        lp_[j] += normalize_meta_loss(a);
        lm_[j] += normalize_meta_loss(b);
      }
      batch_->step();
      for (size_t j = 0; j < P; ++j) pairs_[j]->advance();
    }
    for (size_t j = 0; j < P; ++j) lp_[j] /= steps, lm_[j] /= steps;
  } else {
    for (size_t j = 0; j < P; ++j) {
      perturb(j);
      std::tie(lp_[j], lm_[j]) = pairs_[j]->run(plus_, minus_, steps);
    }
  }
  for (size_t j = 0; j < P; ++j) {
    InnerPair& pair = *pairs_[j];
    std::vector<float>& xi = xi_[j];
    const double lp = lp_[j], lm = lm_[j];
    const double coef = (lp - lm) / denom;
    for (size_t k = 0; k < n; ++k) grad[k] += coef * xi[k];
    st.loss_sum += 0.5 * (lp + lm);
    st.pairs += 1;
    st.inner_steps += 2.0 * steps;
    if (pair.finished()) {
      pair.reset(shape_);
      std::fill(xi.begin(), xi.end(), 0.0f);
      st.resets += 1;
    }
  }
  return st;
}

void OuterAdamW::step(std::vector<float>& theta, const std::vector<double>& grad) {
  const size_t n = theta.size();
  if (grad.size() != n) throw std::invalid_argument("OuterAdamW: gradient size mismatch");
  if (m.empty()) {
    m.assign(n, 0.0);
    v.assign(n, 0.0);
  }
  if (m.size() != n || v.size() != n) throw std::invalid_argument("OuterAdamW: state size mismatch");
  ++t;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t));
  for (size_t k = 0; k < n; ++k) {
    const double g = grad[k];
    if (!std::isfinite(g)) throw std::runtime_error("OuterAdamW: non-finite meta-gradient");
    m[k] = b1 * m[k] + (1 - b1) * g;
    v[k] = b2 * v[k] + (1 - b2) * g * g;
    const double upd = (m[k] / bc1) / (std::sqrt(v[k] / bc2) + eps) + weight_decay * theta[k];
    theta[k] = static_cast<float>(theta[k] - lr * upd);
  }
}

}  // namespace celo2::meta
