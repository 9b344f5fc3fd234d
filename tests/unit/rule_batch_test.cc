// The batched rule (celo2/rule_batch.h) and the batch of optimizers (celo2/optimizer_batch.h)
// against the one-tensor rule and the single-process Optimizer: bit for bit where the
// Newton–Schulz is BLAS per matrix (NsBatch::kPerMatrix), to float rounding with the
// small-matrix Newton–Schulz kernels (NsBatch::kBatched, newton_schulz_batch).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "celo2/newton_schulz.h"
#include "celo2/optimizer.h"
#include "celo2/optimizer_batch.h"
#include "celo2/rule_batch.h"

namespace celo2 {
namespace {

std::vector<float> normal(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// The Adam-like start with a perturbation: a different, well-behaved theta per seed.
Theta perturbed(const RuleConfig& cfg, uint64_t seed) {
  Theta t = Theta::adam_like(cfg);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.05f);
  for (DenseLayer& l : t.layers) {
    for (float& w : l.w) w += d(rng);
    for (float& b : l.b) b += d(rng);
  }
  return t;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

const std::vector<std::vector<int64_t>> kShapes = {{64, 32}, {32}, {32, 10}, {10}, {4, 6, 8}, {100}, {}, {7, 40}};

// Several tensors of several "particles", each with its own theta, stepped a few times by
// celo2_update one at a time and by celo2_update_batch all at once.
void compare_rule(const RuleConfig& cfg, NsBatch ns, double tol) {
  struct T {
    Geometry geo;
    Theta theta;
    RuleState ref, bat;
    std::vector<float> p, u_ref, u_bat;
  };
  std::vector<T> ts;
  uint64_t seed = 1;
  for (int particle = 0; particle < 3; ++particle)
    for (const auto& shape : kShapes) {
      T t;
      t.geo = Geometry::of(shape);
      t.theta = perturbed(cfg, 100 + particle);
      t.ref = t.bat = RuleState::zeros(t.geo);
      t.p = normal(t.geo.numel, seed++, 0.1f);
      t.u_ref.assign(t.geo.numel, 0.0f);
      t.u_bat.assign(t.geo.numel, 0.0f);
      ts.push_back(std::move(t));
    }
  Workspace w;
  RuleBatchWorkspace bw;
  for (int step = 0; step < 4; ++step) {
    std::vector<std::vector<float>> grads;
    std::vector<RuleBatchItem> items;
    for (T& t : ts) grads.push_back(normal(t.geo.numel, 1000 * step + seed++, 0.01f));
    for (size_t k = 0; k < ts.size(); ++k) {
      T& t = ts[k];
      celo2_update(cfg, t.theta, t.geo, t.ref, grads[k].data(), t.p.data(), t.u_ref.data(), w);
      items.push_back({&t.geo, &t.theta, &t.bat, grads[k].data(), t.p.data(), t.u_bat.data()});
    }
    celo2_update_batch(cfg, items, bw, ns);
    for (size_t k = 0; k < ts.size(); ++k) {
      const T& t = ts[k];
      SCOPED_TRACE("step " + std::to_string(step) + ", tensor " + std::to_string(k) + " " + t.geo.shape_str());
      EXPECT_EQ(t.bat.iteration, t.ref.iteration);
      if (tol == 0) {
        EXPECT_TRUE(same_bits(t.u_bat, t.u_ref));
        EXPECT_TRUE(same_bits(t.bat.m, t.ref.m));
        EXPECT_TRUE(same_bits(t.bat.rms, t.ref.rms));
        EXPECT_TRUE(same_bits(t.bat.v_row, t.ref.v_row));
        EXPECT_TRUE(same_bits(t.bat.v_col, t.ref.v_col));
        EXPECT_TRUE(same_bits(t.bat.v_diag, t.ref.v_diag));
      } else {
        // The state does not depend on the step u; the step agrees to float rounding (the
        // output normalization makes its entries O(1)).
        EXPECT_TRUE(same_bits(t.bat.m, t.ref.m));
        EXPECT_LE(max_abs_diff(t.u_bat, t.u_ref), tol);
      }
      // Keep the parameters moving the same way in both.
      for (size_t i = 0; i < t.p.size(); ++i) ts[k].p[i] -= 1e-3f * t.u_ref[i];
    }
  }
}

TEST(RuleBatch, PerMatrixNewtonSchulzIsBitForBitCelo2Update) {
  compare_rule(RuleConfig{}, NsBatch::kPerMatrix, 0.0);
}

TEST(RuleBatch, Celo2BaseIsBitForBitEitherWay) {
  // No Newton–Schulz: the two modes are the same code.
  compare_rule(RuleConfig::celo2_base(), NsBatch::kPerMatrix, 0.0);
  compare_rule(RuleConfig::celo2_base(), NsBatch::kBatched, 0.0);
}

TEST(RuleBatch, BatchedNewtonSchulzAgreesToFloatRounding) {
  compare_rule(RuleConfig{}, NsBatch::kBatched, 1e-5);
}

TEST(RuleBatch, NewtonSchulzBatchAgreesWithNewtonSchulz) {
  const RuleConfig cfg;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{64, 32}, {32, 64}, {32, 10}, {10, 32}, {1, 5},
                                                           {5, 1},   {17, 17}, {48, 130}, {3, 3}};
  for (const auto& [r, c] : shapes) {
    std::vector<std::vector<float>> ref, bat;
    for (int k = 0; k < 3; ++k) ref.push_back(normal(r * c, 7 * k + r + 100 * c, 1.0f + k));
    bat = ref;
    std::vector<float> scratch;
    std::vector<float*> ptrs;
    for (auto& m : ref) newton_schulz(cfg, r, c, m.data(), scratch);
    for (auto& m : bat) ptrs.push_back(m.data());
    newton_schulz_batch(cfg, r, c, ptrs, scratch);
    for (int k = 0; k < 3; ++k) {
      double rms = 0;
      for (float v : ref[k]) rms += double(v) * v;
      rms = std::sqrt(rms / ref[k].size());
      ASSERT_GT(rms, 0.01) << r << "x" << c;
      EXPECT_LE(max_abs_diff(bat[k], ref[k]), 1e-5) << r << "x" << c << " matrix " << k << " rms " << rms;
    }
  }
}

// The meta-training layout: fc1/w 64×32, fc1/b, fc2/w 32×10, fc2/b; biases AdamW at 20·lr.
struct Model {
  std::vector<std::vector<float>> p, g;
};
const std::vector<std::pair<std::string, std::vector<int64_t>>> kLayout = {
    {"fc1/w", {64, 32}}, {"fc1/b", {32}}, {"fc2/w", {32, 10}}, {"fc2/b", {10}}};

OptimizerOptions inner_options(const RuleConfig& rule) {
  OptimizerOptions o;
  o.rule = rule;
  o.theta = Theta::adam_like(rule);
  o.schedule = Schedule::constant(1e-3);
  o.rules = rule.orthogonalize ? LabelRules::metatrain_default() : LabelRules::all_celo2();
  o.mult_1d = 20.0;
  o.weight_decay = 1e-2;
  return o;
}

// Members with their own thetas, stepped by OptimizerBatch and by one Optimizer each, on the
// same gradients; member 1 sees a NaN gradient at step 2 (skipped by both).
void compare_optimizers(const RuleConfig& rule, NsBatch ns, double tol) {
  const int M = 4;
  std::vector<Model> a(M), b(M);
  std::vector<std::unique_ptr<Optimizer>> singles;
  OptimizerBatch batch(inner_options(rule));
  batch.set_ns_batch(ns);
  for (const auto& [name, shape] : kLayout) batch.add_tensor(name, shape);
  uint64_t seed = 5;
  for (int m = 0; m < M; ++m) {
    singles.push_back(std::make_unique<Optimizer>(inner_options(rule)));
    std::vector<float*> ps;
    std::vector<const float*> gs;
    for (const auto& [name, shape] : kLayout) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      a[m].p.push_back(normal(n, seed++, 0.2f));
      a[m].g.emplace_back(n, 0.0f);
      b[m].p.push_back(a[m].p.back());
      b[m].g.emplace_back(n, 0.0f);
    }
    for (size_t t = 0; t < kLayout.size(); ++t) {
      singles[m]->add_tensor(kLayout[t].first, kLayout[t].second, a[m].p[t].data(), a[m].g[t].data());
      ps.push_back(b[m].p[t].data());
      gs.push_back(b[m].g[t].data());
    }
    EXPECT_EQ(batch.add_member(ps, gs), m);
    const Theta th = perturbed(rule, 50 + m);
    singles[m]->set_theta(th);
    batch.set_theta(m, th);
  }
  EXPECT_EQ(batch.label(0), Label::kCelo2);
  EXPECT_EQ(batch.label(1), rule.orthogonalize ? Label::kAdamW : Label::kCelo2);
  for (int step = 0; step < 6; ++step) {
    for (int m = 0; m < M; ++m)
      for (size_t t = 0; t < kLayout.size(); ++t) {
        // Written in place: the optimizers hold pointers to these buffers.
        const std::vector<float> g = normal(a[m].g[t].size(), 10000 + 100 * step + 10 * m + t, 0.05f);
        std::copy(g.begin(), g.end(), a[m].g[t].begin());
        if (m == 1 && step == 2 && t == 2) a[m].g[t][3] = std::numeric_limits<float>::quiet_NaN();
        std::copy(a[m].g[t].begin(), a[m].g[t].end(), b[m].g[t].begin());
      }
    std::vector<StepReport> reps;
    for (int m = 0; m < M; ++m) reps.push_back(singles[m]->step());
    batch.step();
    for (int m = 0; m < M; ++m) {
      SCOPED_TRACE("step " + std::to_string(step) + " member " + std::to_string(m));
      const StepReport& r = batch.report(m);
      EXPECT_EQ(r.skipped, reps[m].skipped);
      EXPECT_EQ(r.step, reps[m].step);
      EXPECT_EQ(r.nonfinite, reps[m].nonfinite);
      EXPECT_EQ(r.nonfinite_update, reps[m].nonfinite_update);
      EXPECT_EQ(batch.step_count(m), reps[m].step);
      for (int l = 0; l < 2; ++l) EXPECT_NEAR(r.grad_norm[l], reps[m].grad_norm[l], 1e-9 * (1 + reps[m].grad_norm[l]));
      for (int l = 0; l < 2; ++l)
        EXPECT_NEAR(r.update_rms[l], reps[m].update_rms[l], 1e-6 * (1 + reps[m].update_rms[l]));
      for (size_t t = 0; t < kLayout.size(); ++t) {
        if (tol == 0) EXPECT_TRUE(same_bits(b[m].p[t], a[m].p[t])) << kLayout[t].first;
        else EXPECT_LE(max_abs_diff(b[m].p[t], a[m].p[t]), tol) << kLayout[t].first;
      }
    }
  }
  EXPECT_EQ(batch.skipped_steps(1), 1);
  EXPECT_EQ(batch.skipped_steps(0), 0);
}

TEST(OptimizerBatch, PerMatrixIsBitForBitTheOptimizer) {
  compare_optimizers(RuleConfig{}, NsBatch::kPerMatrix, 0.0);
}

TEST(OptimizerBatch, Celo2BaseIsBitForBitTheOptimizer) {
  compare_optimizers(RuleConfig::celo2_base(), NsBatch::kBatched, 0.0);
}

TEST(OptimizerBatch, BatchedNewtonSchulzFollowsTheOptimizer) {
  // lr 1e-3 times update differences of ~1e-6: the parameters agree to ~1e-8 after 6 steps.
  compare_optimizers(RuleConfig{}, NsBatch::kBatched, 1e-7);
}

TEST(OptimizerBatch, ResetMemberStartsAFreshOptimizer) {
  const RuleConfig rule;
  OptimizerBatch batch(inner_options(rule));
  for (const auto& [name, shape] : kLayout) batch.add_tensor(name, shape);
  Model m;
  std::vector<float*> ps;
  std::vector<const float*> gs;
  for (const auto& [name, shape] : kLayout) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    m.p.push_back(normal(n, 3, 0.2f));
    m.g.push_back(normal(n, 4, 0.05f));
  }
  for (size_t t = 0; t < kLayout.size(); ++t) ps.push_back(m.p[t].data()), gs.push_back(m.g[t].data());
  const Model start = m;
  batch.add_member(ps, gs);
  batch.step();
  const Model once = m;
  batch.step();
  EXPECT_EQ(batch.step_count(0), 2);
  for (size_t t = 0; t < kLayout.size(); ++t) std::copy(start.p[t].begin(), start.p[t].end(), m.p[t].begin());
  batch.reset_member(0, ps, gs);
  EXPECT_EQ(batch.step_count(0), 0);
  batch.step();
  for (size_t t = 0; t < kLayout.size(); ++t) EXPECT_TRUE(same_bits(m.p[t], once.p[t])) << t;
}

TEST(OptimizerBatch, RefusesWhatItDoesNotImplement) {
  OptimizerOptions o = inner_options(RuleConfig{});
  o.nan_policy = NanPolicy::kZero;
  EXPECT_THROW(OptimizerBatch{o}, std::invalid_argument);
  o = inner_options(RuleConfig{});
  o.max_grad_norm = 1.0;
  EXPECT_THROW(OptimizerBatch{o}, std::invalid_argument);
  OptimizerBatch b(inner_options(RuleConfig{}));
  b.add_tensor("w", {4, 4});
  EXPECT_THROW(b.add_tensor("w", {4}), std::invalid_argument);
  std::vector<float> p(16), g(16);
  EXPECT_THROW(b.add_member({p.data(), p.data()}, {g.data(), g.data()}), std::invalid_argument);
  b.add_member({p.data()}, {g.data()});
  EXPECT_THROW(b.add_tensor("v", {4}), std::logic_error);
}

}  // namespace
}  // namespace celo2
