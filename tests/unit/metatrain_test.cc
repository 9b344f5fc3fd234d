// Meta-training pieces: theta flattening, the meta-loss normalizer, the outer AdamW, the
// inner pairs (common random numbers, reparameterization, unroll lengths) and the PES
// estimator (zero at equal particles, independent of how pairs are spread over ranks).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include "celo2/metatrain/pes.h"
#include "celo2/metatrain/tasks.h"

namespace celo2::meta {
namespace {

TEST(Metatrain, FlattenRoundTrip) {
  const RuleConfig cfg;
  const Theta t = Theta::random(cfg, 3);
  EXPECT_EQ(t.size(), 30 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3);  // 347
  std::vector<float> flat = t.values();
  ASSERT_EQ(static_cast<int64_t>(flat.size()), t.size());
  EXPECT_EQ(flat[0], t.layers[0].w[0]);
  EXPECT_EQ(flat[240], t.layers[0].b[0]);  // weights first, then biases
  Theta u = Theta::adam_like(cfg);
  u.set_values(flat.data(), flat.size());
  for (size_t l = 0; l < t.layers.size(); ++l) {
    EXPECT_EQ(u.layers[l].w, t.layers[l].w);
    EXPECT_EQ(u.layers[l].b, t.layers[l].b);
  }
  flat.pop_back();
  EXPECT_THROW(u.set_values(flat.data(), flat.size()), std::invalid_argument);
}

TEST(Metatrain, MetaLossNormalizer) {
  const double mx = 1.5 * std::log(10.0);
  EXPECT_DOUBLE_EQ(meta_loss_max(), mx);
  EXPECT_DOUBLE_EQ(normalize_meta_loss(1.0), 1.0);
  EXPECT_DOUBLE_EQ(normalize_meta_loss(-0.5), 0.0);
  EXPECT_DOUBLE_EQ(normalize_meta_loss(100.0), mx);
  EXPECT_DOUBLE_EQ(normalize_meta_loss(std::nan("")), mx);
  EXPECT_DOUBLE_EQ(normalize_meta_loss(std::numeric_limits<double>::infinity()), mx);
}

TEST(Metatrain, OuterAdamWFirstStepsMatchHandComputation) {
  OuterAdamW opt;
  opt.lr = 0.1;
  opt.weight_decay = 0.5;
  std::vector<float> th = {1.0f, -2.0f, 0.0f};
  opt.step(th, {4.0, -1.0, 0.0});
  // t = 1: m̂ = g, v̂ = g², update = g/(|g| + eps) + wd·θ.
  EXPECT_NEAR(th[0], 1.0 - 0.1 * (1.0 + 0.5), 1e-6);
  EXPECT_NEAR(th[1], -2.0 - 0.1 * (-1.0 - 1.0), 1e-6);
  EXPECT_NEAR(th[2], 0.0, 1e-12);
  opt.step(th, {2.0, -1.0, 0.0});  // t = 2
  const double m = 0.9 * 0.4 + 0.1 * 2.0, v = 0.999 * 0.016 + 0.001 * 4.0;
  const double upd = (m / (1 - 0.81)) / (std::sqrt(v / (1 - 0.999 * 0.999)) + 1e-8);
  EXPECT_NEAR(th[0], 0.85 - 0.1 * (upd + 0.5 * 0.85), 1e-6);
  EXPECT_THROW(opt.step(th, {std::nan(""), 0, 0}), std::runtime_error);
}

TaskFamily synthetic_family() { return TaskFamily::parse("synthetic"); }

TEST(Metatrain, TeacherDataIsDeterministicAndUsesManyClasses) {
  const data::Dataset a = make_teacher_dataset(5, 2048), b = make_teacher_dataset(5, 2048);
  const data::Dataset c = make_teacher_dataset(6, 2048);
  EXPECT_EQ(a.x, b.x);
  EXPECT_EQ(a.y, b.y);
  EXPECT_NE(a.y, c.y);
  std::set<int> classes(a.y.begin(), a.y.end());
  EXPECT_GE(classes.size(), 5u);
}

TEST(Metatrain, EqualParticlesGiveEqualLossesAndZeroEstimate) {
  const TaskFamily fam = synthetic_family();
  InnerConfig ic;
  ic.reparam_prob = 0.0;
  InnerPair pair(ic, fam, 11);
  const Theta th = Theta::adam_like(ic.rule);
  pair.reset(th);
  const auto [lp, lm] = pair.run(th, th, 20);
  EXPECT_EQ(lp, lm);  // same init, same batches, same theta: bit for bit
  EXPECT_GT(lp, 0.0);
  // Different thetas: different losses.
  Theta other = Theta::random(ic.rule, 1, 0.3f);
  const auto [lp2, lm2] = pair.run(th, other, 20);
  EXPECT_NE(lp2, lm2);
}

TEST(Metatrain, ReparameterizationKeepsTheInitialLoss) {
  // The scale changes the stored parameters (w = p0 / s) but not the function: the loss of
  // the first batch is the same with and without the augmentation, up to float rounding.
  const TaskFamily fam = synthetic_family();
  const Theta th = Theta::adam_like(RuleConfig{});
  InnerConfig plain, scaled;
  plain.reparam_prob = 0.0;
  scaled.reparam_prob = 1.0;
  InnerPair a(plain, fam, 21), b(scaled, fam, 21);
  a.reset(th);
  b.reset(th);
  EXPECT_EQ(a.scale(), 1.0);
  EXPECT_NE(b.scale(), 1.0);
  EXPECT_GE(b.scale(), 1e-3);
  EXPECT_LE(b.scale(), 1e3);
  EXPECT_EQ(a.unroll(), b.unroll());
  const double la = a.run(th, th, 1).first, lb = b.run(th, th, 1).first;
  EXPECT_NEAR(la, lb, 1e-5 * la);
}

TEST(Metatrain, UnrollLengthsAreLogUniformWholeTruncations) {
  const TaskFamily fam = synthetic_family();
  InnerConfig ic;
  InnerPair pair(ic, fam, 3);
  const Theta th = Theta::adam_like(ic.rule);
  int64_t lo = 1 << 30, hi = 0;
  int below_300 = 0;
  for (int k = 0; k < 200; ++k) {
    pair.reset(th);
    const int64_t u = pair.unroll();
    EXPECT_EQ(u % ic.truncation, 0);
    EXPECT_GE(u, ic.unroll_min);
    EXPECT_LE(u, ic.unroll_max);
    lo = std::min(lo, u), hi = std::max(hi, u);
    below_300 += u <= 300;
  }
  EXPECT_LE(lo, 150);
  EXPECT_GE(hi, 1500);
  // log-uniform: P(u <= 300) = ln 3 / ln 20 ≈ 0.37 (a uniform draw would give ≈ 0.1).
  EXPECT_GT(below_300, 40);
  EXPECT_LT(below_300, 110);
}

TEST(Metatrain, InnerRunEndsAndRestarts) {
  const TaskFamily fam = synthetic_family();
  PesConfig pc;
  pc.tasks = 1;
  pc.inner.unroll_min = pc.inner.unroll_max = 100;  // two truncations
  const Theta th = Theta::adam_like(pc.inner.rule);
  PesEstimator pes(pc, fam, th, 0, 1);
  std::vector<float> flat = th.values();
  std::vector<double> g(flat.size());
  EXPECT_EQ(pes.estimate(flat, g).resets, 0.0);
  EXPECT_EQ(pes.pair(0).step(), 50);
  const int64_t gen = pes.pair(0).generation();
  EXPECT_EQ(pes.estimate(flat, g).resets, 1.0);  // reached 100: a new inner run
  EXPECT_EQ(pes.pair(0).step(), 0);
  EXPECT_GT(pes.pair(0).generation(), gen);
}

TEST(Metatrain, EstimateDoesNotDependOnHowPairsAreSpread) {
  const TaskFamily fam = synthetic_family();
  PesConfig pc;
  pc.tasks = 4;
  pc.seed = 9;
  pc.inner.unroll_min = pc.inner.unroll_max = 100;
  const Theta th = Theta::adam_like(pc.inner.rule);
  const std::vector<float> flat = th.values();
  std::vector<double> one(flat.size(), 0.0), two(flat.size(), 0.0);
  PesEstimator all(pc, fam, th, 0, 1);
  PesEstimator r0(pc, fam, th, 0, 2), r1(pc, fam, th, 1, 2);
  EXPECT_EQ(r0.local_pairs() + r1.local_pairs(), 4);
  for (int step = 0; step < 2; ++step) {
    std::fill(one.begin(), one.end(), 0.0);
    std::fill(two.begin(), two.end(), 0.0);
    const PesStats a = all.estimate(flat, one);
    std::vector<double> part(flat.size(), 0.0);
    const PesStats b0 = r0.estimate(flat, two);
    const PesStats b1 = r1.estimate(flat, part);
    for (size_t k = 0; k < flat.size(); ++k) two[k] += part[k];
    EXPECT_NEAR(a.loss_sum, b0.loss_sum + b1.loss_sum, 1e-9);
    double norm = 0;
    for (double v : one) norm += v * v;
    norm = std::sqrt(norm);
    EXPECT_GT(norm, 0.0);
    for (size_t k = 0; k < flat.size(); ++k) EXPECT_NEAR(one[k], two[k], 1e-9 * norm) << k;
  }
}

// The batched inner step (one OptimizerBatch for all of a rank's particles) against one
// Optimizer per particle, on the same pairs, over outer steps with resets and the
// reparameterization: with Newton–Schulz per matrix (NsBatch::kPerMatrix) the estimate is the
// same doubles; with the small-matrix Newton–Schulz kernels (the default) it agrees to a
// relative 5e-3 in the 2-norm (measured 5.3e-4 for Celo2; Celo2-base has no Newton–Schulz and
// is exact either way) and the mean meta-loss to a relative 1e-6.
void batched_equals_unbatched(const RuleConfig& rule) {
  const TaskFamily fam = TaskFamily::parse("synthetic");
  PesConfig pc;
  pc.tasks = 3;
  pc.seed = 4;
  pc.inner.rule = rule;
  pc.inner.truncation = 10;
  pc.inner.unroll_min = 20;
  pc.inner.unroll_max = 40;
  pc.inner.reparam_prob = 0.5;
  Theta th = Theta::adam_like(rule);
  std::vector<float> flat = th.values();
  PesConfig pu = pc, pe = pc, pf = pc;
  pu.batched = false;
  pe.ns_batch = NsBatch::kPerMatrix;
  pf.ns_batch = NsBatch::kBatched;
  PesEstimator un(pu, fam, th, 0, 1), exact(pe, fam, th, 0, 1), fast(pf, fam, th, 0, 1);
  OuterAdamW outer;
  outer.lr = 1e-3;  // move theta visibly between steps
  double resets = 0, worst = 0;
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE("outer step " + std::to_string(step));
    std::vector<double> gu(flat.size(), 0.0), ge(flat.size(), 0.0), gf(flat.size(), 0.0);
    const PesStats su = un.estimate(flat, gu), se = exact.estimate(flat, ge), sf = fast.estimate(flat, gf);
    EXPECT_EQ(se.loss_sum, su.loss_sum);
    EXPECT_EQ(se.resets, su.resets);
    EXPECT_EQ(se.inner_steps, su.inner_steps);
    EXPECT_EQ(sf.resets, su.resets);
    EXPECT_NEAR(sf.loss_sum, su.loss_sum, 1e-6 * su.loss_sum);
    double norm = 0, diff = 0;
    for (size_t k = 0; k < flat.size(); ++k) {
      EXPECT_EQ(ge[k], gu[k]) << k;
      norm += gu[k] * gu[k];
      diff += (gf[k] - gu[k]) * (gf[k] - gu[k]);
    }
    ASSERT_GT(norm, 0.0);
    worst = std::max(worst, std::sqrt(diff / norm));
    EXPECT_LE(std::sqrt(diff / norm), 5e-3);
    resets += su.resets;
    outer.step(flat, gu);
  }
  EXPECT_GT(resets, 0.0);  // inner runs ended and restarted within the test
  std::printf("batched (small-matrix Newton–Schulz) vs unbatched: worst relative difference of the estimate %.3g\n",
              worst);
}

TEST(Metatrain, BatchedEqualsUnbatched) { batched_equals_unbatched(RuleConfig{}); }
TEST(Metatrain, BatchedEqualsUnbatchedCelo2Base) { batched_equals_unbatched(RuleConfig::celo2_base()); }

// The estimator flushes subnormals to zero only inside estimate(): the caller's floating-point
// control word is the same afterwards, and flushing changes the estimate only where state
// values fell below FLT_MIN (here: not measurably).
TEST(Metatrain, FlushingSubnormalsIsScopedToTheEstimate) {
  const TaskFamily fam = TaskFamily::parse("synthetic");
  PesConfig pc;
  pc.tasks = 2;
  pc.seed = 9;
  pc.inner.rule = RuleConfig::celo2_base();
  pc.inner.truncation = 25;
  pc.inner.unroll_min = pc.inner.unroll_max = 100;
  pc.inner.reparam_prob = 0.5;  // scales down to 1e-3: small gradients and momenta
  const Theta th = Theta::adam_like(pc.inner.rule);
  const std::vector<float> flat = th.values();
  PesConfig keep = pc;
  keep.flush_denormals = false;
  PesEstimator flushed(pc, fam, th, 0, 1), kept(keep, fam, th, 0, 1);
  // A subnormal result survives outside the estimate, before and after it.
  volatile float tiny = 1e-30f;
  const float sub_before = tiny * 1e-10f;
  for (int step = 0; step < 4; ++step) {
    std::vector<double> gf(flat.size(), 0.0), gk(flat.size(), 0.0);
    const PesStats sf = flushed.estimate(flat, gf), sk = kept.estimate(flat, gk);
    EXPECT_NEAR(sf.loss_sum, sk.loss_sum, 1e-6 * sk.loss_sum);
    double norm = 0, diff = 0;
    for (size_t k = 0; k < flat.size(); ++k) {
      norm += gk[k] * gk[k];
      diff += (gf[k] - gk[k]) * (gf[k] - gk[k]);
    }
    ASSERT_GT(norm, 0.0);
    EXPECT_LE(std::sqrt(diff / norm), 1e-3) << "outer step " << step;
  }
  const float sub_after = tiny * 1e-10f;
  EXPECT_GT(sub_before, 0.0f);
  EXPECT_EQ(sub_after, sub_before) << "estimate() left subnormals flushed on the caller's thread";
}

TEST(Metatrain, PesDirectionAgreesWithFiniteDifferences) {
  // On one truncation from fresh inner runs PES is plain antithetic ES: E[ĝ] is the gradient
  // of the Gaussian-smoothed truncation loss. Check the estimate's projection on a fixed
  // direction d against a central difference of the same loss along d, on the same task and
  // batches (tasks = 64 draws of ε, one truncation each; the sign and the order of magnitude
  // must agree).
  const TaskFamily fam = synthetic_family();
  PesConfig pc;
  pc.tasks = 64;
  pc.seed = 2;
  pc.sigma = 0.01;
  pc.inner.truncation = 20;
  pc.inner.reparam_prob = 0.0;
  pc.inner.unroll_min = pc.inner.unroll_max = 20;
  const RuleConfig rule;
  const Theta th = Theta::adam_like(rule);
  const std::vector<float> flat = th.values();
  std::vector<double> g(flat.size(), 0.0);
  PesEstimator pes(pc, fam, th, 0, 1);
  pes.estimate(flat, g);
  // Finite difference of the mean truncation loss over the same 64 tasks along d = ĝ/|ĝ|.
  double norm = 0;
  for (double v : g) norm += v * v;
  norm = std::sqrt(norm);
  ASSERT_GT(norm, 0);
  const double h = 0.01;
  std::vector<float> up(flat), dn(flat);
  for (size_t k = 0; k < flat.size(); ++k) {
    up[k] = static_cast<float>(flat[k] + h * g[k] / norm);
    dn[k] = static_cast<float>(flat[k] - h * g[k] / norm);
  }
  Theta tu = th, td = th;
  tu.set_values(up.data(), up.size());
  td.set_values(dn.data(), dn.size());
  double fd = 0;
  for (int i = 0; i < pc.tasks; ++i) {
    // Pair i again, freshly started: "rank i of tasks" holds exactly pair i, with its seed.
    PesConfig solo = pc;
    solo.batched = false;  // InnerPair::run steps the pair's own optimizers
    PesEstimator one(solo, fam, th, i, pc.tasks);
    ASSERT_EQ(one.local_pairs(), 1);
    const auto [lu, ld] = one.pair(0).run(tu, td, pc.inner.truncation);
    fd += (lu - ld) / (2 * h) / pc.tasks;
  }
  // With N draws in d = 347 dimensions, ĝ = ∇L + noise with |ĝ|² ≈ |∇L|²(1 + d/N), so the
  // derivative along ĝ/|ĝ| is ≈ |∇L|²/|ĝ| ≈ |ĝ|/6.4 and positive with high probability. A
  // sign error gives fd < 0; a scale error (σ² or the 1/2N) moves it out of [|ĝ|/30, |ĝ|].
  std::printf("directional derivative %.4g, |estimate| %.4g, ratio %.3f\n", fd, norm, fd / norm);
  EXPECT_GT(fd, norm / 30) << "|g| = " << norm;
  EXPECT_LT(fd, norm) << "|g| = " << norm;
}

TEST(Metatrain, DigitsLoaderValidates) {
  if (!std::filesystem::exists(digits_csv_path())) {
    GTEST_SKIP() << digits_csv_path() << " absent (Debian python3-sklearn not installed)";
  }
  const data::Dataset tr = load_digits(data::Split::kTrain), te = load_digits(data::Split::kTest);
  EXPECT_EQ(tr.n, 1500);
  EXPECT_EQ(te.n, 297);
  EXPECT_EQ(tr.dim, 64);
  for (float v : tr.x) ASSERT_TRUE(v >= 0.0f && v <= 1.0f);
  std::set<int> classes(tr.y.begin(), tr.y.end());
  EXPECT_EQ(classes.size(), 10u);
  // A corrupt copy is refused with the row named.
  const std::string bad = ::testing::TempDir() + "/digits_bad.csv";
  {
    std::ofstream f(bad);
    f << "0,1,2\n";
  }
  try {
    load_digits_all(bad);
    FAIL() << "a 3-column file loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("row 1 has 3 columns"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_digits_all(::testing::TempDir() + "/no_such_digits.csv"), std::runtime_error);
}

TEST(Metatrain, BreastCancerLoaderSplitsAndStandardizes) {
  const std::string path =
      (std::filesystem::path(digits_csv_path()).parent_path() / "breast_cancer.csv").string();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " absent (Debian python3-sklearn not installed)";
  const data::Dataset tr = load_breast_cancer(data::Split::kTrain), te = load_breast_cancer(data::Split::kTest);
  EXPECT_EQ(tr.n, 400);
  EXPECT_EQ(te.n, 169);
  EXPECT_EQ(tr.dim, 30);
  EXPECT_EQ(tr.num_classes, 2);
  for (int c = 0; c < 30; ++c) {  // standardized on the training split
    double m = 0, v = 0;
    for (int64_t r = 0; r < tr.n; ++r) m += tr.x[r * 30 + c] / 400.0;
    for (int64_t r = 0; r < tr.n; ++r) v += (tr.x[r * 30 + c] - m) * (tr.x[r * 30 + c] - m) / 400.0;
    EXPECT_NEAR(m, 0.0, 1e-4) << c;
    EXPECT_NEAR(v, 1.0, 1e-3) << c;
  }
  int ones = 0;
  for (int y : tr.y) ones += y;
  EXPECT_GT(ones, 100);  // 357 of 569 rows are benign (1): both classes in the training split
  EXPECT_LT(ones, 350);
  const data::Dataset again = load_breast_cancer(data::Split::kTest);
  EXPECT_EQ(again.x, te.x);  // the shuffle is fixed
  const std::string bad = ::testing::TempDir() + "/cancer_bad.csv";
  {
    std::ofstream f(bad);
    f << "569,30,malignant,benign\n1,2,3\n";
  }
  try {
    load_breast_cancer(data::Split::kTrain, bad);
    FAIL() << "a 3-column file loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("row 1 has 3 columns"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace celo2::meta
