// The project's default weights: meta-trained (not the constructed Adam-like start), the
// same numbers in the library (kernels/src/project_theta.cc) and in the shipped file
// (weights/celo2-project/theta.state, published layout), and what an optimizer given no
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

TEST(DefaultTheta, OtherConfigurationsGetTheConstructedTheta) {
  const RuleConfig base = RuleConfig::celo2_base();
  EXPECT_TRUE(same(Theta::project_default(base), Theta::adam_like(base)));
  RuleConfig wide;
  wide.ff_hidden_size = 16;
  EXPECT_TRUE(same(Theta::project_default(wide), Theta::adam_like(wide)));
}

TEST(DefaultTheta, ShippedFileHoldsTheSameNumbers) {
  const std::string path = std::string(CELO2_GOLDEN_DIR) + "/../../weights/celo2-project/theta.state";
  const Theta file = load_theta(path, RuleConfig{});
  EXPECT_TRUE(same(file, Theta::project_default(RuleConfig{})));
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

}  // namespace
}  // namespace celo2
