// The flat plan's Newton–Schulz planner (celo2/plan.h plan_ns) against simple references:
// its modelled load is the lockstep finish time of the order the engine runs (groups first,
// in split_order, then each rank's own matrices), recomputed here step by step; and no plan
// it makes is below ns_load_bound, which an exhaustive search confirms on small cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <vector>

#include "celo2/comm_model.h"
#include "celo2/plan.h"
#include "celo2/rule.h"

namespace celo2 {
namespace {

struct Case {
  std::vector<NsMatrix> mats;
  int64_t n = 0;  // elements of the flat index space
};

Case gpt(int layers, int64_t d, int64_t ffn, int64_t vocab, int64_t ctx) {
  Case c;
  for (const ModelTensor& t : gpt_tensors(layers, d, ffn, vocab, ctx)) {
    const Geometry g = Geometry::of(t.shape);
    if (t.label == Label::kCelo2 && g.factored)
      for (int64_t k = 0; k < g.norm_groups; ++k) c.mats.push_back({c.n + k * g.norm_size, g.mat_rows, g.mat_cols});
    c.n += g.numel;
  }
  return c;
}

std::vector<int64_t> even_cuts(int64_t n, int W) {
  std::vector<int64_t> cuts(W + 1);
  for (int k = 0; k <= W; ++k) cuts[k] = n * k / W;
  return cuts;
}

// The reference: walk the engine's order. Each group in split_order starts when its last
// member is free and frees all members together; then each rank runs its own matrices.
std::vector<double> lockstep_finish(const Case& c, const OwnerPlan& p, int W, const RuleConfig& cfg,
                                    const NsCostModel& model) {
  std::vector<double> fin(W, 0.0);
  for (int i : p.split_order) {
    const int a = p.owner[i], s = std::min(p.group[i], W - a);
    const double start = *std::max_element(fin.begin() + a, fin.begin() + a + s);
    const double t = ns_time(cfg, model, c.mats[i].rows, c.mats[i].cols, s, p.split_poly[i] != 0);
    std::fill(fin.begin() + a, fin.begin() + a + s, start + t);
  }
  for (size_t i = 0; i < c.mats.size(); ++i)
    if (std::min(p.group[i], W - p.owner[i]) <= 1) fin[p.owner[i]] += ns_time(cfg, model, c.mats[i].rows, c.mats[i].cols, 1);
  return fin;
}

double mean_load(const Case& c, int W, const RuleConfig& cfg, const NsCostModel& model) {
  double total = 0;
  for (const NsMatrix& m : c.mats) total += ns_time(cfg, model, m.rows, m.cols, 1);
  return total / W;
}

void check_plan(const Case& c, int W, const NsCostModel& model, int force, const char* what) {
  SCOPED_TRACE(std::string(what) + " W=" + std::to_string(W) + " force=" + std::to_string(force));
  const RuleConfig cfg;
  const OwnerPlan p = plan_ns(c.mats, even_cuts(c.n, W), cfg, model, force);
  ASSERT_EQ(p.load.size(), static_cast<size_t>(W));
  // split_order: every matrix whose block spans two or more ranks, once, and nothing else.
  std::vector<int> seen(c.mats.size(), 0);
  for (int i : p.split_order) ++seen[i];
  for (size_t i = 0; i < c.mats.size(); ++i) {
    const bool split = std::min(p.group[i], W - p.owner[i]) > 1;
    EXPECT_EQ(seen[i], split ? 1 : 0) << "matrix " << i;
  }
  const std::vector<double> fin = lockstep_finish(c, p, W, cfg, model);
  for (int k = 0; k < W; ++k) EXPECT_NEAR(p.load[k], fin[k], 1e-12 * (1 + fin[k])) << "rank " << k;
  const double mean = mean_load(c, W, cfg, model);
  EXPECT_NEAR(p.imbalance, *std::max_element(fin.begin(), fin.end()) / mean, 1e-9);
  // The bound is a bound: no plan below it, forced splits included.
  EXPECT_GE(p.imbalance, ns_load_bound(c.mats, W, cfg, model) * (1 - 1e-9));
}

TEST(PlanNs, LoadIsTheLockstepFinishTimeOfTheEnginesOrder) {
  const Case xl = gpt(24, 2048, 8192, 50257, 2048);  // GPT-3 XL: planned, not allocated
  for (int W : {8, 64, 256, 512, 1024}) {
    check_plan(xl, W, NsCostModel::cpu(), 0, "GPT-3 XL, cpu model");
    check_plan(xl, W, NsCostModel::h200(), 0, "GPT-3 XL, h200 model");
  }
  const Case small = gpt(3, 48, 192, 301, 40);  // comm_model_test's model
  for (int W : {2, 3, 4, 5, 6})
    for (int force : {0, 1, 2, 3, W}) check_plan(small, W, NsCostModel::cpu(), force, "small gpt");
}

// The mixed-size search is local; from the doublings' best alone it stayed at 1.29 for
// GPT-3 XL on 64 ranks of the H200 model (and 1.09 / 1.18 at 64 / 512 ranks of the CPU
// model). Started also from no splits and from the bound's sizes, it finds 1.19 there (8 qkv
// split in pairs beside 16 whole ones: each of 16 ranks holds a whole qkv and half of one),
// and 1.03 / 1.10 under the CPU model. The plans' loads are checked against the lockstep
// replay above; here, that the search reaches them.
TEST(PlanNs, TheMixedSearchFindsPairsBesideWholeMatrices) {
  const RuleConfig cfg;
  const Case xl = gpt(24, 2048, 8192, 50257, 2048);
  const OwnerPlan h = plan_ns(xl.mats, even_cuts(xl.n, 64), cfg, NsCostModel::h200());
  EXPECT_LT(h.imbalance, 1.20);
  EXPECT_NEAR(h.imbalance_unsplit, 4.0 / 3.0, 0.01);
  int pairs = 0;
  for (size_t i = 0; i < xl.mats.size(); ++i) pairs += h.group[i] == 2;
  EXPECT_EQ(pairs, 8);
  EXPECT_LT(plan_ns(xl.mats, even_cuts(xl.n, 64), cfg, NsCostModel::cpu()).imbalance, 1.05);
  EXPECT_LT(plan_ns(xl.mats, even_cuts(xl.n, 512), cfg, NsCostModel::cpu()).imbalance, 1.12);
}

// ns_load_bound against an exhaustive search on small cases: every assignment of a group
// size to each matrix and every placement (a single rank, or any run of g consecutive
// ranks), run in every order of the groups, in lockstep as the engine runs them. The best
// makespan found must not be below the bound.
TEST(PlanNs, TheBoundHoldsAgainstEveryPlanOfSmallCases) {
  const RuleConfig cfg;
  NsCostModel model;  // CPU defaults, with a latency that makes small groups worth it
  model.latency = 1e-7;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dim(2, 6);
  for (int trial = 0; trial < 18; ++trial) {
    const int W = 2 + trial % 3, n = 2 + trial % 3;
    Case c;
    for (int i = 0; i < n; ++i) {
      const int64_t r = 8 * dim(rng), cols = 16 * dim(rng);
      c.mats.push_back({c.n, r, cols});
      c.n += r * cols;
    }
    const double mean = mean_load(c, W, cfg, model);
    double best = std::numeric_limits<double>::infinity();
    // placement of matrix i: first rank a and size g (a + g <= W)
    std::vector<std::pair<int, int>> place(n);
    std::function<void(int)> rec = [&](int i) {
      if (i == n) {
        std::vector<int> groups, order;
        std::vector<double> own(W, 0.0);
        for (int j = 0; j < n; ++j)
          if (place[j].second == 1)
            own[place[j].first] += ns_time(cfg, model, c.mats[j].rows, c.mats[j].cols, 1);
          else
            groups.push_back(j);
        std::sort(groups.begin(), groups.end());
        do {  // every order of the groups
          std::vector<double> fin(W, 0.0);
          for (int j : groups) {
            const auto [a, g] = place[j];
            const double t = std::min(ns_time(cfg, model, c.mats[j].rows, c.mats[j].cols, g, false),
                                      ns_time(cfg, model, c.mats[j].rows, c.mats[j].cols, g, true));
            const double start = *std::max_element(fin.begin() + a, fin.begin() + a + g);
            std::fill(fin.begin() + a, fin.begin() + a + g, start + t);
          }
          for (int k = 0; k < W; ++k) fin[k] += own[k];
          best = std::min(best, *std::max_element(fin.begin(), fin.end()));
        } while (std::next_permutation(groups.begin(), groups.end()));
        return;
      }
      for (int g = 1; g <= W; ++g)
        for (int a = 0; a + g <= W; ++a) {
          place[i] = {a, g};
          rec(i + 1);
        }
    };
    rec(0);
    const double bound = ns_load_bound(c.mats, W, cfg, model);
    EXPECT_LE(bound, best / mean * (1 + 1e-9)) << "trial " << trial << " W=" << W;
    EXPECT_GE(bound, 1.0);
  }
}

// The bound's packing term: three equal matrices on two ranks, where a group never pays (its
// call latency is a second), must share a rank two to one; the area alone would allow 1.5
// matrices per rank. The bound is then exactly the best plan, 2 / 1.5, and the planner finds it.
TEST(PlanNs, TheBoundSeesMatricesThatCannotShareARank) {
  const RuleConfig cfg;
  NsCostModel model;
  model.latency = 1.0;
  Case c;
  for (int i = 0; i < 3; ++i) {
    c.mats.push_back({c.n, 64, 64});
    c.n += 64 * 64;
  }
  EXPECT_NEAR(ns_load_bound(c.mats, 2, cfg, model), 4.0 / 3.0, 1e-9);
  const OwnerPlan p = plan_ns(c.mats, {0, c.n / 2, c.n}, cfg, model);
  EXPECT_NEAR(p.imbalance, 4.0 / 3.0, 1e-9);
  // With a fourth matrix the area and the packing agree: two per rank.
  c.mats.push_back({c.n, 64, 64});
  c.n += 64 * 64;
  EXPECT_NEAR(ns_load_bound(c.mats, 2, cfg, model), 1.0, 1e-9);
}

}  // namespace
}  // namespace celo2
