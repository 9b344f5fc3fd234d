// The project's default weights, for Celo2 and for Celo2-base: meta-trained (not the
// constructed Adam-like start), the same numbers in the library (kernels/src/project_theta.cc,
// kernels/src/project_theta_base.cc) and in the shipped files (weights/celo2-project/ and
// weights/celo2-base-project/theta.state, published layout), and what an optimizer given no
// weights runs.
#include <gtest/gtest.h>

#include <cmath>

#include "celo2/optimizer.h"
#include "celo2/theta_io.h"

namespace celo2 {
namespace {

bool same(const Theta& a, const Theta& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    if (a.layers[l].w != b.layers[l].w || a.layers[l].b != b.layers[l].b) return false;
  }
  return true;
}

TEST(DefaultTheta, IsMetaTrainedAndFitsTheDefaultRule) {
  const RuleConfig cfg;
  const Theta t = Theta::project_default(cfg);
  EXPECT_NO_THROW(t.check_fits(cfg));  // also checks every value is finite
  EXPECT_FALSE(same(t, Theta::adam_like(cfg))) << "the default is still the constructed start";
}

TEST(DefaultTheta, Celo2BaseIsMetaTrainedToo) {
  const RuleConfig base = RuleConfig::celo2_base();
  const Theta t = Theta::project_default(base);
  EXPECT_NO_THROW(t.check_fits(base));
  EXPECT_FALSE(same(t, Theta::adam_like(base))) << "the Celo2-base default is still the constructed start";
  EXPECT_FALSE(same(t, Theta::project_default(RuleConfig{}))) << "Celo2-base got the Celo2 weights";
}

TEST(DefaultTheta, OtherConfigurationsGetTheConstructedTheta) {
  RuleConfig wide;
  wide.ff_hidden_size = 16;
  EXPECT_TRUE(same(Theta::project_default(wide), Theta::adam_like(wide)));
  RuleConfig base_wide = RuleConfig::celo2_base();
  base_wide.ff_hidden_size = 16;
  EXPECT_TRUE(same(Theta::project_default(base_wide), Theta::adam_like(base_wide)));
}

TEST(DefaultTheta, ShippedFileHoldsTheSameNumbers) {
  const std::string path = std::string(CELO2_GOLDEN_DIR) + "/../../weights/celo2-project/theta.state";
  const Theta file = load_theta(path, RuleConfig{});
  EXPECT_TRUE(same(file, Theta::project_default(RuleConfig{})));
}

TEST(DefaultTheta, ShippedCelo2BaseFileHoldsTheSameNumbers) {
  const RuleConfig base = RuleConfig::celo2_base();
  const std::string path = std::string(CELO2_GOLDEN_DIR) + "/../../weights/celo2-base-project/theta.state";
  const Theta file = load_theta(path, base);
  EXPECT_TRUE(same(file, Theta::project_default(base)));
}

TEST(DefaultTheta, OptimizerWithoutWeightsRunsTheDefault) {
  std::vector<float> p1(24), p2(24), g(24);
  for (int i = 0; i < 24; ++i) {
    p1[i] = p2[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    g[i] = std::sin(static_cast<float>(i));
  }
  OptimizerOptions a, b;
  a.rules = b.rules = LabelRules::parse("* => celo2");
  b.theta = Theta::project_default(b.rule);
  Optimizer oa(a), ob(b);
  oa.add_tensor("w", {4, 6}, p1.data(), g.data());
  ob.add_tensor("w", {4, 6}, p2.data(), g.data());
  for (int s = 0; s < 3; ++s) {
    oa.step_with_lr(1e-2);
    ob.step_with_lr(1e-2);
  }
  EXPECT_EQ(p1, p2);
}

TEST(DefaultTheta, Celo2BaseOptimizerWithoutWeightsRunsItsDefault) {
  std::vector<float> p1(24), p2(24), p3(24), g(24);
  for (int i = 0; i < 24; ++i) {
    p1[i] = p2[i] = p3[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    g[i] = std::sin(static_cast<float>(i));
  }
  OptimizerOptions a, b, c;
  a.rule = b.rule = c.rule = RuleConfig::celo2_base();
  a.rules = b.rules = c.rules = LabelRules::parse("* => celo2");
  b.theta = Theta::project_default(b.rule);
  c.theta = Theta::adam_like(c.rule);
  Optimizer oa(a), ob(b), oc(c);
  oa.add_tensor("w", {4, 6}, p1.data(), g.data());
  ob.add_tensor("w", {4, 6}, p2.data(), g.data());
  oc.add_tensor("w", {4, 6}, p3.data(), g.data());
  for (int s = 0; s < 3; ++s) {
    oa.step_with_lr(1e-2);
    ob.step_with_lr(1e-2);
    oc.step_with_lr(1e-2);
  }
  EXPECT_EQ(p1, p2);
  EXPECT_NE(p1, p3);  // not the constructed start's steps
}

}  // namespace
}  // namespace celo2
