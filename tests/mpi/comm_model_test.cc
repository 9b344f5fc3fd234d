// The communication model against the engine's own byte counters: a scaled-down GPT under
// mpirun; every phase's bytes (mean over ranks) must equal the model's.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "celo2/comm_model.h"
#include "celo2/engine.h"
#include "mpi_test_main.h"

namespace celo2 {
namespace {

std::shared_ptr<Communicator> g_comm;

void check(const RuleConfig& rule, bool gather, int ns_split = 0, int ns_split_poly = 0) {
  const std::vector<ModelTensor> spec = gpt_tensors(3, 48, 192, 301, 40);
  std::vector<std::vector<float>> p, g;
  EngineOptions eo;
  eo.opt.rule = rule;
  eo.opt.theta = Theta::random(rule, 3);
  eo.opt.rules = LabelRules::seed_default();
  eo.gather_params = gather;
  eo.ns_split = ns_split;
  eo.ns_split_poly = ns_split_poly;
  Engine eng(eo, g_comm);
  std::mt19937 rng(g_comm->rank());
  std::normal_distribution<float> nd;
  p.reserve(spec.size());
  g.reserve(spec.size());
  for (const auto& t : spec) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    p.emplace_back(n, 0.1f);
    g.emplace_back(n);
    for (auto& x : g.back()) x = nd(rng);
    eng.add_tensor(t.name, t.shape, p.back().data(), g.back().data());
  }
  for (size_t i = 0; i < spec.size(); ++i) ASSERT_EQ(eng.label_of(i), spec[i].label) << spec[i].name;
  eng.step();
  const CommModel model =
      model_step(spec, rule, g_comm->size(), gather, ns_split, NsCostModel::cpu(), ns_split_poly);
  if (ns_split_poly == 1 && std::min(ns_split, g_comm->size()) > 1) {
    EXPECT_EQ(model.ns_split_poly, model.ns_split);
  }
  const PhaseStats& st = eng.last_phase_stats();
  double total = 0;
  for (const auto& [phase, want] : model.bytes) {
    double got = st.bytes.count(phase) ? static_cast<double>(st.bytes.at(phase)) : 0.0;
    g_comm->all_reduce_sum(&got, 1);
    got /= g_comm->size();
    total += got;
    // Integer division in the ring accounting: within a few bytes per rank.
    EXPECT_NEAR(got, want, 8.0 + 1e-9 * want) << phase;
    if (g_comm->rank() == 0)
      std::printf("W=%d split=%d poly=%d %-14s measured %12.0f B  model %12.0f B\n", g_comm->size(), ns_split,
                  ns_split_poly, phase.c_str(), got, want);
  }
  if (g_comm->rank() == 0)
    std::printf("W=%d total %.0f B/rank = %.3fx ZeRO-1 AdamW (%.0f B); no-locality all-to-all would be %.0f B\n",
                g_comm->size(), total, model.zero1_adamw > 0 ? total / model.zero1_adamw : 0.0,
                model.zero1_adamw, model.a2a_no_locality);
}

TEST(CommModel, MatchesTheEngineCelo2) { check(RuleConfig{}, true); }
TEST(CommModel, MatchesTheEngineReturnTrip) {
  RuleConfig r;
  r.precondition_output = true;  // forces the reverse all-to-all
  check(r, true);
}
TEST(CommModel, MatchesTheEngineCelo2Base) { check(RuleConfig::celo2_base(), false); }
// Newton–Schulz split over groups (celo2/plan.h plan_ns): the blocks' all-to-all, the
// groups' all-reduces and the matrices' sums of squares, on both return paths.
TEST(CommModel, MatchesTheEngineSplitInPairs) { check(RuleConfig{}, true, 2); }
TEST(CommModel, MatchesTheEngineSplitInThrees) { check(RuleConfig{}, true, 3); }
TEST(CommModel, MatchesTheEngineSplitReturnTrip) {
  RuleConfig r;
  r.precondition_output = true;
  check(r, true, 2);
}
// The groups' polynomial split by rows: one all-gather of B per iteration on top.
TEST(CommModel, MatchesTheEngineSplitPolynomialInPairs) { check(RuleConfig{}, true, 2, 1); }
TEST(CommModel, MatchesTheEngineSplitPolynomialInThrees) { check(RuleConfig{}, true, 3, 1); }

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) { return celo2::testing::run_mpi_tests(argc, argv, celo2::g_comm); }
