// The sharded engine under mpirun -np W (W = 1..5): the same answer as the single-process
// Optimizer, checkpoints across world sizes, global NaN decisions. Run by CTest through
// mpirun; every rank runs every test and a failure on any rank fails the run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <chrono>
#include <numeric>
#include <random>
#include <thread>

#include "celo2/engine.h"
#include "celo2/optimizer.h"
#include "celo2/state_file.h"
#include "engine_test_model.h"
#include "mpi_test_main.h"
#include "celo2/flax_msgpack.h"
#include "celo2/lowp.h"

namespace celo2 {
namespace {

std::shared_ptr<Communicator> g_comm;

using testing::Model;
using testing::options;
using testing::rule_variant;

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double m = 0, s = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(got[i]) - want[i]));
    s += static_cast<double>(want[i]) * want[i];
  }
  return m / std::max(std::sqrt(s / std::max<size_t>(1, want.size())), 1e-30);
}

void expect_same(const Model& a, const Model& b, double tol, const std::string& what) {
  int identical = 0;
  for (size_t i = 0; i < a.p.size(); ++i) {
    // Compare the updates (params moved from the common start), the stricter measure.
    EXPECT_LE(rel_err(a.p[i], b.p[i]), tol) << what << " tensor " << a.names[i];
    identical += a.p[i] == b.p[i];
  }
  if (g_comm->rank() == 0)
    std::printf("[W=%d] %s: %d of %zu tensors bitwise identical\n", g_comm->size(), what.c_str(),
                identical, a.p.size());
}

OptimizerOptions with_rule(OptimizerOptions o, const RuleConfig& rule) {
  o.rule = rule;
  o.theta = Theta::random(rule, 11);
  return o;
}

// One step of the single-process Optimizer and of the engine on the same gradients.
void step_both(Model& ref, Optimizer& opt, Model& dist, Engine& eng, int s) {
  ref.fill_grads(s);
  dist.fill_grads(s);
  opt.step();
  eng.step();
}

class EngineVsOptimizer : public ::testing::TestWithParam<int> {};

TEST_P(EngineVsOptimizer, SameParametersEveryStep) {
  const RuleConfig rule = rule_variant(GetParam());
  const OptimizerOptions o = with_rule(options(), rule);
  Model ref(1), dist(1);
  Optimizer opt(o);
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = o;
  eo.grad_mode = GradMode::kReduced;
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  for (int s = 0; s < 4; ++s) {
    step_both(ref, opt, dist, eng, s);
    // The spec's bound for a sharded step: max|err|/RMS <= 1e-6 per tensor.
    expect_same(dist, ref, 1e-6, "variant " + std::to_string(GetParam()) + " step " + std::to_string(s));
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, EngineVsOptimizer, ::testing::Values(0, 1, 2, 3));

TEST(Engine, DataParallelGradientsAreAveraged) {
  // Each rank passes its own gradients; the engine's average equals the Optimizer fed the
  // mean of all ranks' gradients (summation order differs: a float-rounding bound).
  const int W = g_comm->size();
  Model ref(2), dist(2);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  for (int s = 0; s < 3; ++s) {
    dist.fill_grads(s, g_comm->rank());
    std::vector<std::vector<float>> mean = testing::mean_grads(2, s, W);
    ref.g = mean;
    opt.step();
    eng.step();
    expect_same(dist, ref, 1e-4, "data-parallel step " + std::to_string(s));
  }
}

TEST(Engine, TrainerGathersParametersItself) {
  // gather_params = false (Megatron's distributed optimizer): each rank updates its slice;
  // the trainer all-gathers the flat parameters and gets the single-process result.
  Model ref(6), dist(6);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  eo.grad_mode = GradMode::kReduced;
  eo.gather_params = false;
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  const int W = g_comm->size();
  for (int s = 0; s < 3; ++s) {
    ref.fill_grads(s);
    dist.fill_grads(s);
    opt.step();
    eng.step();
    std::vector<float> flat;
    for (auto& v : dist.p) flat.insert(flat.end(), v.begin(), v.end());
    const int64_t N = static_cast<int64_t>(flat.size());
    std::vector<int64_t> counts(W);
    for (int k = 0; k < W; ++k) counts[k] = N * (k + 1) / W - N * k / W;
    const auto [lo, hi] = eng.local_range();
    ASSERT_EQ(hi - lo, counts[g_comm->rank()]);
    std::vector<float> mine(flat.begin() + lo, flat.begin() + hi), all(N);
    g_comm->all_gather(mine.data(), all.data(), counts);
    for (size_t i = 0; i < dist.p.size(); ++i)
      std::copy(all.begin() + eng.offset_of(i), all.begin() + eng.offset_of(i) + dist.p[i].size(),
                dist.p[i].begin());
    expect_same(dist, ref, 1e-6, "trainer-gathered step " + std::to_string(s));
  }
}

TEST(Engine, NanOnOneRankSkipsEverywhere) {
  Model m(3);
  EngineOptions eo;
  eo.opt = options();
  Engine eng(eo, g_comm);
  m.register_with(eng);
  m.fill_grads(0, g_comm->rank());
  eng.step();
  auto before = m.p;
  m.fill_grads(1, g_comm->rank());
  if (g_comm->rank() == g_comm->size() - 1) m.g[4][7] = std::nanf("");
  const StepReport r = eng.step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.nonfinite, 1);
  EXPECT_EQ(m.p, before);
  EXPECT_EQ(eng.skipped_steps(), 1);
}

TEST(Engine, OwnersAreBalancedAndReported) {
  Model m(4);
  EngineOptions eo;
  eo.opt = options();
  Engine eng(eo, g_comm);
  m.register_with(eng);
  const OwnerPlan& plan = eng.owner_plan();
  EXPECT_EQ(plan.load.size(), static_cast<size_t>(g_comm->size()));
  EXPECT_GE(plan.imbalance, 1.0);
  m.fill_grads(0);
  eng.step();
  const std::string rep = eng.plan_report();
  EXPECT_NE(rep.find("imbalance"), std::string::npos);
  if (g_comm->size() > 1) {
    EXPECT_GT(eng.last_phase_stats().bytes.at("gather"), 0);
  }
}

// Checkpoint across world sizes: CELO2_CKPT_PHASE=save writes after 3 steps;
// CELO2_CKPT_PHASE=load (another W) resumes and must match an uninterrupted run.
TEST(Engine, CheckpointAcrossWorldSizes) {
  const char* phase = std::getenv("CELO2_CKPT_PHASE");
  const char* path = std::getenv("CELO2_CKPT_PATH");
  if (!phase || !path) GTEST_SKIP() << "CELO2_CKPT_PHASE/PATH not set (run by the CTest fixture)";
  EngineOptions eo;
  eo.opt = options();
  eo.grad_mode = GradMode::kReduced;
  Model dist(5);
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  if (std::string(phase) == "save") {
    for (int s = 0; s < 3; ++s) {
      dist.fill_grads(s);
      eng.step();
    }
    eng.save_state(path);
    // Parameters are the trainer's to checkpoint; this test stores them beside the state.
    if (g_comm->rank() == 0) {
      FILE* f = std::fopen((std::string(path) + ".params").c_str(), "wb");
      ASSERT_NE(f, nullptr);
      for (auto& v : dist.p) std::fwrite(v.data(), sizeof(float), v.size(), f);
      std::fclose(f);
    }
    return;
  }
  FILE* f = std::fopen((std::string(path) + ".params").c_str(), "rb");
  ASSERT_NE(f, nullptr);
  for (auto& v : dist.p) ASSERT_EQ(std::fread(v.data(), sizeof(float), v.size(), f), v.size());
  std::fclose(f);
  eng.load_state(path);
  EXPECT_EQ(eng.step_count(), 3);
  Model ref(5);
  Optimizer opt(options());
  ref.register_with(opt);
  for (int s = 0; s < 6; ++s) {
    ref.fill_grads(s);
    opt.step();
    if (s >= 3) {
      dist.fill_grads(s);
      eng.step();
    }
  }
  expect_same(dist, ref, 1e-6, "resumed on a different world size");
  // A corrupt checkpoint is refused on every rank and nothing changes.
  const std::string bad = std::string(path) + ".bad";
  if (g_comm->rank() == 0) {
    std::vector<uint8_t> b = flax::read_file(path);
    b[b.size() / 2] ^= 1;
    flax::write_file_atomic(bad, b);
  }
  g_comm->barrier();
  auto before = dist.p;
  EXPECT_THROW(eng.load_state(bad), flax::FormatError);
  EXPECT_EQ(eng.step_count(), 6);
  EXPECT_EQ(dist.p, before);
}


// Host backends keep a slice's state planes skewed apart from 4,096 elements (celo2/rule.h
// state_plane) and packed below; checkpoints are packed. Tensors of 15,360 and 8,192
// elements: one rank (the Optimizer) and 2-3 ranks keep them skewed, 4-5 ranks keep some
// slices packed. The engine follows the Optimizer, both save the same planes, and a resume
// from the Optimizer's file onto this W's layout continues as the Optimizer does.
TEST(Engine, SkewedStatePlanesSaveAndResumeAcrossLayouts) {
  const int W = g_comm->size();
  ASSERT_GT(state_plane(15360), 15360);  // the Optimizer's (one rank's) planes are skewed
  ASSERT_EQ(state_plane(15360 / 4), 15360 / 4);  // four ranks' slices of it are packed
  auto big = [](uint64_t seed) {
    return Model(seed, {"layer0/mlp/w", "layer0/mlp/b", "layer1/attn/w", "tiny/w"}, {{96, 160}, {160}, {128, 64}, {3, 5}});
  };
  Model ref = big(9), dist = big(9);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  eo.grad_mode = GradMode::kReduced;
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  for (int s = 0; s < 3; ++s) step_both(ref, opt, dist, eng, s);
  expect_same(dist, ref, 1e-6, "skewed planes, 3 steps");
  const std::string a = "/tmp/celo2_skew_opt_np" + std::to_string(W) + ".state";
  const std::string b = "/tmp/celo2_skew_eng_np" + std::to_string(W) + ".state";
  if (g_comm->rank() == 0) opt.save_state(a);
  eng.save_state(b);
  g_comm->barrier();
  if (g_comm->rank() == 0) {
    const StateFile fa = read_state_file(a), fb = read_state_file(b);
    ASSERT_EQ(fa.tensors.size(), fb.tensors.size());
    for (size_t t = 0; t < fa.tensors.size(); ++t) {
      const TensorStateRecord &ra = fa.tensors[t], &rb = fb.tensors[t];
      ASSERT_EQ(ra.m.size(), rb.m.size()) << ra.name;
      const int64_t numel = Geometry::of(ra.shape).numel;
      EXPECT_EQ(ra.m.size(), ra.label == Label::kCelo2 ? static_cast<size_t>(kMom * numel) : 0u) << ra.name;  // packed
      EXPECT_LE(rel_err(rb.m, ra.m), 1e-6) << ra.name;
      EXPECT_LE(rel_err(rb.rms, ra.rms), 1e-6) << ra.name;
    }
  }
  // Resume the Optimizer's checkpoint on this W's layout.
  Model again = big(9);
  again.p = ref.p;
  Engine eng2(eo, g_comm);
  again.register_with(eng2);
  eng2.load_state(a);
  for (int s = 3; s < 5; ++s) step_both(ref, opt, again, eng2, s);
  expect_same(again, ref, 1e-6, "resumed from one rank's skewed planes");
  g_comm->barrier();
  if (g_comm->rank() == 0) {
    std::remove(a.c_str());
    std::remove(b.c_str());
  }
}

// ---- The one engine's plans and buckets (added with the whole-tensor plan) ----

// The whole-tensor plan runs each Celo2 tensor's rule whole on one rank: the same kernel as
// the single-process Optimizer, so the result is the same bits, for every variant, with
// data-parallel gradients reduce-scattered through tiny buckets and parameters gathered back.
class WholePlanVsOptimizer : public ::testing::TestWithParam<int> {};

TEST_P(WholePlanVsOptimizer, SameBitsEveryStep) {
  const RuleConfig rule = rule_variant(GetParam());
  const OptimizerOptions o = with_rule(options(), rule);
  Model ref(1), dist(1);
  Optimizer opt(o);
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = o;
  eo.plan = Plan::kWholeTensors;
  eo.grad_mode = GradMode::kReduced;
  eo.bucket_elements = 7;  // many buckets, crossing tensors and slices
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  for (int s = 0; s < 4; ++s) {
    ref.fill_grads(s);
    dist.fill_grads(s);
    const StepReport a = opt.step(), b = eng.step();
    EXPECT_EQ(dist.p, ref.p) << "variant " << GetParam() << " step " << s;
    for (int l = 0; l < 3; ++l) EXPECT_NEAR(a.update_rms[l], b.update_rms[l], 1e-12 + 1e-9 * a.update_rms[l]);
  }
  // Every Celo2 tensor lies on one rank.
  const auto& cuts = eng.cuts();
  for (size_t i = 0; i < eng.num_tensors(); ++i) {
    if (eng.label_of(i) != Label::kCelo2) continue;
    const int64_t a = eng.offset_of(i), b = a + static_cast<int64_t>(dist.p[i].size());
    for (int k = 1; k < g_comm->size(); ++k) EXPECT_FALSE(cuts[k] > a && cuts[k] < b) << dist.names[i];
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, WholePlanVsOptimizer, ::testing::Values(0, 1, 2, 3));

TEST(Engine, SmallBucketsChangeNothing) {
  // Data-parallel gradients through buckets of 5 floats and parameters gathered in windows:
  // the same bits as one bucket holding everything.
  Model a(4), b(4);
  EngineOptions eo;
  eo.opt = options();
  Engine big(eo, g_comm);
  eo.bucket_elements = 5;
  Engine small(eo, g_comm);
  a.register_with(big);
  b.register_with(small);
  for (int s = 0; s < 3; ++s) {
    a.fill_grads(s, g_comm->rank());
    b.fill_grads(s, g_comm->rank());
    big.step();
    small.step();
    EXPECT_EQ(a.p, b.p) << "step " << s;
  }
}

// Overlap of the gradient reduce-scatter with backward (overlap_grad_reduce): tensors marked
// ready in a different order and at different times on every rank, some never marked, the
// plan built before the first step or not: the same bits, the same bytes, as reducing every
// bucket at step(); buckets really ran on the worker before step() was called.
TEST(Engine, OverlappedBucketsEqualTheStepsReduction) {
  const int W = g_comm->size(), me = g_comm->rank();
  for (const bool plan_first : {false, true}) {
    Model a(5), b(5);
    EngineOptions eo;
    eo.opt = options();
    eo.bucket_elements = 7;  // many buckets, crossing tensors and slices
    eo.overlap_grad_reduce = true;
    PhaseStats sa[5], sb[5];
    std::vector<size_t> marked_ahead(5, 0);
    {
      Engine eng(eo, g_comm);
      a.register_with(eng);
      EXPECT_EQ(eng.overlapping(), W > 1);
      if (plan_first) eng.owner_plan();
      std::mt19937 rng(100 + me);
      for (int s = 0; s < 5; ++s) {
        a.fill_grads(s, me);
        // Backward order (last tensor first), shuffled a little per rank, with pauses; on
        // odd steps rank 0 leaves tensor 2 for step() to reduce.
        std::vector<size_t> order(a.p.size());
        std::iota(order.rbegin(), order.rend(), size_t{0});
        for (size_t k = 0; k + 1 < order.size(); k += 2)
          if (rng() % 2) std::swap(order[k], order[k + 1]);
        for (size_t t : order) {
          if (s % 2 && me == 0 && t == 2) continue;
          eng.grad_ready(t);
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        eng.step();
        sa[s] = eng.last_phase_stats();
      }
    }
    {
      eo.overlap_grad_reduce = false;
      Engine eng(eo, g_comm);
      b.register_with(eng);
      EXPECT_FALSE(eng.overlapping());
      for (int s = 0; s < 5; ++s) {
        b.fill_grads(s, me);
        eng.grad_ready(0);  // does nothing without the option
        eng.step();
        sb[s] = eng.last_phase_stats();
      }
    }
    EXPECT_EQ(a.p, b.p) << "plan_first " << plan_first;
    for (int s = 0; s < 5; ++s) {
      EXPECT_EQ(sa[s].bytes["grads"], sb[s].bytes["grads"]) << "step " << s;
      // From the first step with a plan, the worker reduced buckets during "backward".
      const bool overlapped = W > 1 && (plan_first || s > 0);
      EXPECT_EQ(sa[s].seconds.count("grads_background"), overlapped ? 1u : 0u) << "step " << s;
    }
  }
}

TEST(Engine, OverlapMisuseIsRefusedAndTheStepStillCompletes) {
  if (g_comm->size() == 1) GTEST_SKIP() << "one rank: nothing to overlap";
  const int me = g_comm->rank();
  Model a(6), b(6);
  EngineOptions eo;
  eo.opt = options();
  eo.bucket_elements = 7;
  eo.overlap_grad_reduce = true;
  {
    Engine eng(eo, g_comm);
    a.register_with(eng);
    eng.owner_plan();
    a.fill_grads(0, me);
    const size_t last = a.p.size() - 1;
    eng.grad_ready(last);
    EXPECT_THROW(eng.grad_ready(last), std::logic_error);  // twice in one step
    EXPECT_THROW(eng.grad_ready(a.p.size()), std::out_of_range);
    EXPECT_THROW(eng.gather_params(), std::logic_error);   // a collective while buckets fly
    EXPECT_THROW(eng.save_state("/nonexistent/x"), std::logic_error);
    eng.step();                                            // finishes them, as every rank does
    a.fill_grads(1, me);
    eng.grad_ready(last);  // a new step: marking again is fine
    eng.step();
    // Gradients reduced ahead (finish_grads, as the Client does before its control plane)
    // for a step that is then refused are not reused: the next step reads the trainer's
    // buffers again (here holding the next gradients).
    a.fill_grads(5, me);
    eng.grad_ready(last);
    eng.finish_grads();
    EXPECT_THROW(eng.step_with_lr(std::nan("")), std::invalid_argument);
    a.fill_grads(2, me);
    eng.step();
  }
  {
    eo.overlap_grad_reduce = false;
    Engine eng(eo, g_comm);
    b.register_with(eng);
    for (int s = 0; s < 3; ++s) {
      b.fill_grads(s, me);
      eng.step();
    }
  }
  EXPECT_EQ(a.p, b.p);
}

TEST(Engine, ReferenceBackendOnRanks) {
  // The plain reference kernels under the engine at W ranks (whole tensors) equal the
  // single-process reference.
  OptimizerOptions o = options();
  o.use_reference = true;
  Model ref(7), dist(7);
  Optimizer opt(o);
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = o;
  Engine eng(eo, g_comm);
  EXPECT_EQ(eng.options().plan, Plan::kWholeTensors);
  dist.register_with(eng);
  for (int s = 0; s < 3; ++s) {
    ref.fill_grads(s, g_comm->rank());
    dist.fill_grads(s, g_comm->rank());
    // kLocal: the engine averages; at W = 1 the same gradients as the reference.
    if (g_comm->size() == 1) {
      opt.step();
      eng.step();
      EXPECT_EQ(dist.p, ref.p);
    } else {
      eng.step();
    }
  }
}

TEST(Engine, WholePlanRelabelMovesState) {
  // A relabel that moves the whole plan's cuts moves the state with them: the result equals
  // the Optimizer given the same relabel.
  Model ref(8), dist(8);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  eo.plan = Plan::kWholeTensors;
  eo.grad_mode = GradMode::kReduced;
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  const LabelRules moved = LabelRules::parse("re:^tiny => celo2; ndim<=1 => adamw; * => celo2");
  for (int s = 0; s < 5; ++s) {
    if (s == 2) {
      opt.set_rules(moved);
      eng.set_rules(moved);
    }
    ref.fill_grads(s);
    dist.fill_grads(s);
    opt.step();
    eng.step();
    EXPECT_EQ(dist.p, ref.p) << "step " << s;
  }
  // And its checkpoint loads into the single-process optimizer with the same state.
  const std::string path = ::testing::TempDir() + "/celo2_whole_" + std::to_string(g_comm->size()) + ".state";
  eng.save_state(path);
  Model again(8);
  again.p = dist.p;
  Optimizer back(options());
  back.set_rules(moved);
  again.register_with(back);
  back.load_state(path);
  again.fill_grads(9);
  ref.fill_grads(9);
  back.step();
  opt.step();
  EXPECT_EQ(again.p, ref.p);
}


TEST(Engine, GlobalGradientClippingAsTorch) {
  // max_grad_norm clips the averaged gradients as torch.nn.utils.clip_grad_norm_ does: the
  // same as the Optimizer (no clipping) fed the mean gradients scaled by
  // min(1, max_norm / (norm + 1e-6)), norm over every celo2 and adamw tensor.
  const int W = g_comm->size();
  Model ref(12), dist(12);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  eo.opt.max_grad_norm = 2.0;
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  for (int s = 0; s < 4; ++s) {
    dist.fill_grads(s, g_comm->rank());
    std::vector<std::vector<float>> mean = testing::mean_grads(12, s, W);
    double sq = 0;
    for (const auto& v : mean)
      for (float x : v) sq += static_cast<double>(x) * x;
    const double norm = std::sqrt(sq), coef = std::min(1.0, 2.0 / (norm + 1e-6));
    for (auto& v : mean)
      for (float& x : v) x *= static_cast<float>(coef);
    ref.g = mean;
    opt.step();
    const StepReport r = eng.step();
    EXPECT_NEAR(r.grad_norm_total, norm, 1e-5 * norm) << "step " << s;
    EXPECT_NEAR(r.clip_scale, coef, 1e-5) << "step " << s;
    if (s % 2 == 0) EXPECT_LT(r.clip_scale, 1.0);  // unit gradients: clipped
    else EXPECT_EQ(r.clip_scale, 1.0);             // 1e-2 gradients: below the threshold
    expect_same(dist, ref, 1e-4, "clipped step " + std::to_string(s));
  }
  EXPECT_THROW(eng.set_max_grad_norm(-1.0), std::invalid_argument);
  EXPECT_THROW(eng.set_max_grad_norm(std::nan("")), std::invalid_argument);
}


TEST(Engine, TensorsWithoutGradientsStayUnchanged) {
  // torch.optim's rule: a parameter whose .grad is None is left as it is. Tensor 4 has no
  // gradient on any rank: parameters, state and counters unchanged. Tensor 1 has none on
  // rank 0 only: it is updated with rank 0 counting as zeros. Everything else as the
  // Optimizer fed the mean gradients.
  const int W = g_comm->size();
  Model ref(13), dist(13);
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  Engine eng(eo, g_comm);
  dist.register_with(eng);
  std::vector<uint8_t> has(dist.names.size(), 1);
  has[4] = 0;
  if (g_comm->rank() == 0) has[1] = 0;
  for (int s = 0; s < 3; ++s) {
    dist.fill_grads(s, g_comm->rank());
    for (float& x : dist.g[4]) x = 0.0f;
    if (g_comm->rank() == 0)
      for (float& x : dist.g[1]) x = 0.0f;
    std::vector<std::vector<float>> mean =
        testing::mean_grads(13, s, W, [](size_t i, int r) { return i == 4 || (i == 1 && r == 0); });
    ref.g = mean;
    const std::vector<float> before4 = dist.p[4], before1 = dist.p[1];
    opt.step();
    const StepReport r = eng.step(&has);
    // On one rank, rank 0's missing gradient of tensor 1 is every rank's.
    EXPECT_EQ(r.no_grad_tensors, W == 1 ? 2 : 1);
    EXPECT_EQ(dist.p[4], before4) << "a tensor without gradients moved, step " << s;
    if (W == 1) {
      EXPECT_EQ(dist.p[1], before1);
    }
    for (size_t i = 0; i < dist.p.size(); ++i) {
      if (i == 4 || (i == 1 && W == 1)) continue;
      EXPECT_LE(rel_err(dist.p[i], ref.p[i]), 1e-4) << dist.names[i] << " step " << s;
    }
  }
  const std::string path = ::testing::TempDir() + "/celo2_nograd_" + std::to_string(W) + ".state";
  eng.save_state(path);
  StateFile f = read_state_file(path);
  EXPECT_EQ(find_record(f, dist.names[4])->iteration, 0);  // its counter never advanced
  EXPECT_EQ(find_record(f, dist.names[0])->count, 3);
  std::vector<uint8_t> wrong(2, 1);
  EXPECT_THROW(eng.step(&wrong), std::invalid_argument);
}


TEST(Engine, ParamGroupsAsSeparateRuns) {
  // torch param groups: a celo2 tensor at half the lr with its own decay, an AdamW tensor at
  // twice the lr without decay, the rest as the recipe says. Each tensor's update is the one
  // a single-process optimizer gives with that lr and decay for every tensor.
  struct Case {
    size_t tensor;
    TensorGroup group;
  };
  const std::vector<Case> cases = {{1, {0.5, 0.1}}, {2, {2.0, 0.0}}, {5, {1.0, std::nullopt}}};
  for (Plan plan : {Plan::kFlat, Plan::kWholeTensors}) {
    Model dist(21);
    EngineOptions eo;
    eo.opt = options();
    eo.grad_mode = GradMode::kReduced;
    eo.plan = plan;
    Engine eng(eo, g_comm);
    dist.register_with(eng);
    for (const Case& c : cases) eng.set_group(c.tensor, c.group);
    std::vector<Model> refs(cases.size(), Model(21));
    std::vector<std::unique_ptr<Optimizer>> opts;
    for (size_t k = 0; k < cases.size(); ++k) {
      OptimizerOptions o = options();
      o.weight_decay = cases[k].group.weight_decay.value_or(o.weight_decay);
      opts.push_back(std::make_unique<Optimizer>(o));
      refs[k].register_with(*opts.back());
    }
    for (int s = 0; s < 4; ++s) {
      dist.fill_grads(s);
      eng.step();
      const double lr = options().schedule.at(s);
      for (size_t k = 0; k < cases.size(); ++k) {
        refs[k].fill_grads(s);
        opts[k]->step_with_lr(lr * cases[k].group.lr_scale);
        EXPECT_LE(rel_err(dist.p[cases[k].tensor], refs[k].p[cases[k].tensor]), 1e-6)
            << "plan " << static_cast<int>(plan) << " tensor " << dist.names[cases[k].tensor] << " step " << s;
      }
    }
    EXPECT_NE(dist.p[1], refs[2].p[1]) << "the group made no difference: the test would not see a bug";
  }
  Model m(1);
  EngineOptions eo;
  eo.opt = options();
  Engine eng(eo, g_comm);
  m.register_with(eng);
  EXPECT_THROW(eng.set_group(0, {-1.0, std::nullopt}), std::invalid_argument);
  EXPECT_THROW(eng.set_group(0, {1.0, std::nan("")}), std::invalid_argument);
  EXPECT_THROW(eng.set_group(99, {}), std::invalid_argument);
}

using testing::HalfModel;

class HalfMasters : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(HalfMasters, FollowTheFloat32RunAndTheTrainersWrites) {
  // The engine's float32 masters evolve as a float32 run from the rounded start; the
  // parameters hold round(master); elements the trainer writes re-seed their masters; the
  // checkpoint holds the masters and a resume continues bit for bit.
  const DType dtype = std::get<0>(GetParam()) ? DType::kFloat16 : DType::kBFloat16;
  const Plan plan = std::get<1>(GetParam()) ? Plan::kWholeTensors : Plan::kFlat;
  const bool bf = dtype == DType::kBFloat16;
  const int W = g_comm->size();
  Model ref(5), dist(5);
  HalfModel half(dist, dtype);
  half.to_float(ref);  // the float32 run starts from the rounded parameters
  Optimizer opt(options());
  ref.register_with(opt);
  EngineOptions eo;
  eo.opt = options();
  eo.grad_mode = GradMode::kReduced;
  eo.plan = plan;
  Engine eng(eo, g_comm);
  half.register_with(eng, dist);
  EXPECT_EQ(eng.dtype_of(1), dtype);
  const std::string tag = std::string(dtype_name(dtype)) + " plan " + std::to_string(static_cast<int>(plan));
  auto check = [&](int s) {
    for (size_t t = 0; t < ref.p.size(); ++t) {
      int64_t off = 0;
      double worst = 0;
      for (size_t i = 0; i < ref.p[t].size(); ++i) {
        off += half.h[t][i] != lowp::to_half(bf, ref.p[t][i]);
        worst = std::max<double>(worst, std::fabs(half.at(t, i) - ref.p[t][i]) / std::max(std::fabs(ref.p[t][i]), 1e-6f));
      }
      // round(master) vs round(float32 run): equal but where the two (equal to 1e-6) straddle
      // a rounding boundary.
      EXPECT_LE(off, 1 + static_cast<int64_t>(ref.p[t].size() / 100)) << tag << " " << ref.names[t] << " step " << s;
      EXPECT_LE(worst, bf ? 1.0 / 128 : 1.0 / 1024) << tag << " " << ref.names[t] << " step " << s;
    }
  };
  for (int s = 0; s < 5; ++s) {
    if (s == 3) {
      // The trainer loads new weights into ten elements of two tensors (every rank: the
      // parameters are replicated).
      for (size_t t : {size_t{1}, size_t{2}})
        for (size_t i = 0; i < 10; ++i) {
          half.h[t][i] = lowp::to_half(bf, 3.0f + 0.25f * i);
          ref.p[t][i] = 3.0f + 0.25f * i;
        }
    }
    ref.fill_grads(s);
    dist.fill_grads(s);
    opt.step();
    const StepReport r = eng.step();
    EXPECT_EQ(r.masters_reseeded, s == 3 ? 20 : 0) << tag << " step " << s;
    check(s);
  }
  // The checkpoint's masters are the float32 run's parameters.
  const std::string path = ::testing::TempDir() + "/celo2_half_" + std::to_string(W) + "_" + tag.substr(0, 4) +
                           std::to_string(static_cast<int>(plan)) + ".state";
  eng.save_state(path);
  g_comm->barrier();
  StateFile f = read_state_file(path);
  for (size_t t = 0; t < ref.p.size(); ++t) {
    const TensorStateRecord* rec = find_record(f, ref.names[t]);
    ASSERT_TRUE(rec);
    ASSERT_EQ(rec->master.size(), ref.p[t].size()) << ref.names[t];
    EXPECT_LE(rel_err(rec->master, ref.p[t]), 1e-6) << tag << " " << ref.names[t];
  }
  // Resume: a fresh engine on the loaded parameters and the checkpoint continues as the
  // running one does, bit for bit (its masters restored exactly, not re-seeded).
  HalfModel resumed = half;
  Model dist2(5);
  EngineOptions eo2 = eo;
  Engine eng2(eo2, g_comm);
  resumed.register_with(eng2, dist2);
  eng2.load_state(path);
  for (int s = 5; s < 7; ++s) {
    dist.fill_grads(s);
    dist2.fill_grads(s);
    eng.step();
    EXPECT_EQ(eng2.step().masters_reseeded, 0);
    for (size_t t = 0; t < half.h.size(); ++t) EXPECT_EQ(resumed.h[t], half.h[t]) << tag << " resume step " << s;
  }
  // A checkpoint without masters (written before masters existed) re-seeds them from the
  // parameters: the saved masters are then exactly the parameters' values.
  if (g_comm->rank() == 0) {
    for (auto& rec : f.tensors) rec.master.clear();
    write_state_file(path + ".old", f);
  }
  g_comm->barrier();
  eng2.load_state(path + ".old");
  eng2.save_state(path + ".resaved");
  g_comm->barrier();
  StateFile back = read_state_file(path + ".resaved");
  for (size_t t = 0; t < resumed.h.size(); ++t) {
    const TensorStateRecord* rec = find_record(back, ref.names[t]);
    for (size_t i = 0; i < resumed.h[t].size(); ++i)
      ASSERT_EQ(rec->master[i], resumed.at(t, i)) << ref.names[t] << " element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(DTypesAndPlans, HalfMasters,
                         ::testing::Combine(::testing::Values(0, 1), ::testing::Values(0, 1)));


// Weights that pass the canary (features in [-3, 3]) but overflow the magnitude, exp(mag ·
// exp_mult), on an outlier gradient: the project's Adam-like weights plus a magnitude that
// grows with the normalized gradient (channel 0).
Theta overflowing_theta(const RuleConfig& cfg) {
  Theta t = Theta::adam_like(cfg);
  const int L = static_cast<int>(t.layers.size()) - 1;
  t.layers[0].w[0 * t.layers[0].out + 2] = 1.0f;  // unit 2 = relu(g)
  for (int l = 1; l < L; ++l) t.layers[l].w[2 * t.layers[l].out + 2] = 1.0f;
  t.layers[L].w[2 * t.layers[L].out + 1] = 19.0f / cfg.exp_mult;  // canary: 3 · 19 = 57 < 60
  return t;
}

TEST(Engine, NonFiniteUpdatesFallUnderTheNanPolicy) {
  // Finite gradients, finite accepted weights, a non-finite Celo2 update: it never reaches
  // the parameters. skip: nothing moves and the step counts as skipped; zero: the bad entries
  // are dropped; error: NonFiniteGradientError names the update.
  for (Plan plan : {Plan::kFlat, Plan::kWholeTensors})
    for (NanPolicy policy : {NanPolicy::kSkipStep, NanPolicy::kZero, NanPolicy::kError}) {
      Model m(3);
      EngineOptions eo;
      eo.opt = options();
      eo.opt.rule.exp_mult = 0.3f;  // per-element magnitude exp(mag · 0.3)
      eo.opt.theta = overflowing_theta(eo.opt.rule);
      eo.opt.nan_policy = policy;
      eo.grad_mode = GradMode::kReduced;
      eo.plan = plan;
      Engine eng(eo, g_comm);
      m.register_with(eng);
      for (auto& v : m.g)
        for (auto& x : v) x = 1e-3f;
      m.g[4][100] = 1000.0f;  // an outlier in layer0/mlp/w (a Celo2 matrix)
      const Model before = m;
      const std::string tag = "plan " + std::to_string(static_cast<int>(plan)) + " policy " + nan_policy_name(policy);
      if (policy == NanPolicy::kError) {
        try {
          eng.step();
          ADD_FAILURE() << tag << ": no error";
        } catch (const NonFiniteGradientError& e) {
          EXPECT_NE(std::string(e.what()).find("Celo2 update"), std::string::npos) << e.what();
        }
        EXPECT_EQ(m.p, before.p) << tag;
        continue;
      }
      const StepReport r = eng.step();
      EXPECT_GT(r.nonfinite_update, 0) << tag << ": the weights did not overflow; the test tests nothing";
      EXPECT_EQ(r.nonfinite, 0) << tag;
      for (size_t t = 0; t < m.p.size(); ++t)
        for (float x : m.p[t]) ASSERT_TRUE(std::isfinite(x)) << tag << " " << m.names[t];
      if (policy == NanPolicy::kSkipStep) {
        EXPECT_TRUE(r.skipped) << tag;
        EXPECT_EQ(eng.skipped_steps(), 1) << tag;
        EXPECT_EQ(m.p, before.p) << tag;
      } else {
        EXPECT_FALSE(r.skipped) << tag;
        EXPECT_NE(m.p[1], before.p[1]) << tag << ": other tensors still update";
      }
    }
}

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) { return celo2::testing::run_mpi_tests(argc, argv, celo2::g_comm); }
