// The one engine on its "cuda" backend (server/src/engine/cuda_backend.cc), compiled against the
// host emulation of the CUDA runtime and kernels (include/cuda_runtime.h, host_cuda.cc: each
// kernel by the CPU function its CUDA version is tested against), on 1–3 MPI ranks. What
// this checks where no GPU exists: that the backend's state, groups (one RuleSet per update
// count), packing, NaN handling, checkpoints and relabels give the engine the same answer
// as its CPU backend and the single-process Optimizer — to the bit, because the emulated
// kernels are the CPU ones. The multi-rank orchestration itself is the engine's, the same
// code tests/mpi/engine_mpi_test.cc runs; the CUDA kernels are tests/gpu's (on a device).
#include <cuda_runtime.h>  // the host emulation
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>

#include "../mpi/engine_test_model.h"
#include "../mpi/mpi_test_main.h"
#include "celo2/cuda_backend.h"
#include "celo2/engine.h"
#include "celo2/flax_msgpack.h"
#include "celo2/lowp.h"
#include "celo2/optimizer.h"
#include "celo2/params.h"

namespace celo2 {
namespace {

std::shared_ptr<Communicator> g_comm;

using testing::Model;
using testing::rule_variant;

OptimizerOptions options(const RuleConfig& rule = {}) {
  OptimizerOptions o = testing::options();
  o.rule = rule;
  o.theta = Theta::random(rule, 11);
  return o;
}

EngineOptions on_cuda(const OptimizerOptions& o, GradMode grads = GradMode::kReduced) {
  EngineOptions eo;
  eo.opt = o;
  eo.backend = "cuda";
  eo.grad_mode = grads;
  eo.bucket_elements = 11;
  return eo;
}

class CudaBackendVsOptimizer : public ::testing::TestWithParam<int> {};

TEST_P(CudaBackendVsOptimizer, SameBitsEveryStep) {
  const RuleConfig rule = rule_variant(GetParam());
  Model ref(1), dev(1);
  Optimizer opt(options(rule));
  ref.register_with(opt);
  Engine eng(on_cuda(options(rule)), g_comm);
  EXPECT_EQ(eng.options().plan, Plan::kWholeTensors);
  dev.register_with(eng);
  for (int s = 0; s < 4; ++s) {
    ref.fill_grads(s);
    dev.fill_grads(s);
    const StepReport a = opt.step(), b = eng.step();
    EXPECT_EQ(dev.p, ref.p) << "variant " << GetParam() << " step " << s;
    for (int l = 0; l < 3; ++l) EXPECT_NEAR(a.update_rms[l], b.update_rms[l], 1e-12 + 1e-9 * a.update_rms[l]);
    for (int l = 0; l < 3; ++l) EXPECT_NEAR(a.grad_norm[l], b.grad_norm[l], 1e-9 * (1 + a.grad_norm[l]));
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, CudaBackendVsOptimizer, ::testing::Values(0, 1, 2, 3));

TEST(CudaBackend, DataParallelEqualsCpuBackend) {
  // Each rank its own gradients: the same bits as the CPU backend on the same plan.
  Model a(2), b(2);
  EngineOptions eo = on_cuda(options(), GradMode::kLocal);
  Engine dev(eo, g_comm);
  eo.backend = "cpu";
  eo.plan = Plan::kWholeTensors;
  Engine cpu(eo, g_comm);
  a.register_with(dev);
  b.register_with(cpu);
  for (int s = 0; s < 3; ++s) {
    a.fill_grads(s, g_comm->rank());
    b.fill_grads(s, g_comm->rank());
    dev.step();
    cpu.step();
    EXPECT_EQ(a.p, b.p) << "step " << s;
  }
}

TEST(CudaBackend, RefusesNewtonSchulzGroupsByName) {
  // The cuda backend runs whole tensors, where Newton–Schulz is not split: a request for
  // groups (the option or CELO2_NS_SPLIT) is an error naming both, not silently ignored.
  EngineOptions eo = on_cuda(options());
  eo.ns_split = 2;
  try {
    Engine e(eo, g_comm);
    ADD_FAILURE() << "ns_split = 2 accepted on the cuda backend";
  } catch (const UnsupportedError& err) {
    const std::string what = err.what();
    EXPECT_NE(what.find("EngineOptions::ns_split"), std::string::npos) << what;
    EXPECT_NE(what.find("'cuda'"), std::string::npos) << what;
    EXPECT_NE(what.find("flat plan"), std::string::npos) << what;
  }
  eo.ns_split = -1;
  ::setenv("CELO2_NS_SPLIT", "3", 1);
  param::reload();
  EXPECT_THROW(Engine(eo, g_comm), UnsupportedError);
  ::unsetenv("CELO2_NS_SPLIT");
  param::reload();
  // One owner per matrix, or by cost, is what the plan does anyway: accepted.
  for (int force : {0, 1}) {
    eo.ns_split = force;
    EXPECT_NO_THROW(Engine(eo, g_comm)) << "ns_split " << force;
  }
}

TEST(CudaBackend, OverlappedGradientBucketsOnTheWorkerThread) {
  // overlap_grad_reduce on the cuda backend: the worker binds the device (bind_thread) and
  // runs the buckets' copies, reduce-scatters and scales while "backward" marks tensors
  // (last first, one tensor left to the step on odd steps): the same bits as the CPU
  // backend reducing at step time.
  const int W = g_comm->size(), me = g_comm->rank();
  Model a(3), b(3);
  EngineOptions eo = on_cuda(options(), GradMode::kLocal);
  eo.overlap_grad_reduce = true;
  PhaseStats last;
  {
    Engine dev(eo, g_comm);
    EXPECT_EQ(dev.overlapping(), W > 1);
    a.register_with(dev);
    dev.owner_plan();
    for (int s = 0; s < 3; ++s) {
      a.fill_grads(s, me);
      for (size_t t = a.p.size(); t-- > 0;)
        if (!(s % 2 && t == 1)) dev.grad_ready(t);
      dev.step();
    }
    last = dev.last_phase_stats();
  }
  eo.backend = "cpu";
  eo.plan = Plan::kWholeTensors;
  eo.overlap_grad_reduce = false;
  Engine cpu(eo, g_comm);
  b.register_with(cpu);
  for (int s = 0; s < 3; ++s) {
    b.fill_grads(s, me);
    cpu.step();
  }
  EXPECT_EQ(a.p, b.p);
  EXPECT_EQ(last.seconds.count("grads_background"), W > 1 ? 1u : 0u);
}

TEST(CudaBackend, HalfMastersEqualCpuBackend) {
  // bf16 and fp16 parameters: the cuda backend's masters (store_lowp / reseed_master device
  // calls) give the same bits as the CPU backend's, including a trainer's write between
  // steps and a checkpoint round trip of the masters.
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const bool bf = dtype == DType::kBFloat16;
    Model a(4), b(4);
    testing::HalfModel ha(a, dtype), hb(b, dtype);
    EngineOptions eo = on_cuda(options(), GradMode::kLocal);
    Engine dev(eo, g_comm);
    eo.backend = "cpu";
    eo.plan = Plan::kWholeTensors;
    Engine cpu(eo, g_comm);
    ha.register_with(dev, a);
    hb.register_with(cpu, b);
    for (int s = 0; s < 4; ++s) {
      if (s == 2)
        for (auto* h : {&ha, &hb}) h->h[1][3] = lowp::to_half(bf, 2.5f);
      a.fill_grads(s, g_comm->rank());
      b.fill_grads(s, g_comm->rank());
      const StepReport rd = dev.step(), rc = cpu.step();
      EXPECT_EQ(rd.masters_reseeded, rc.masters_reseeded);
      EXPECT_EQ(rd.masters_reseeded, s == 2 ? 1 : 0);
      EXPECT_EQ(ha.h, hb.h) << dtype_name(dtype) << " step " << s;
    }
    const std::string path = ::testing::TempDir() + "/celo2_cuda_half_" + std::to_string(g_comm->size()) + ".state";
    dev.save_state(path);
    g_comm->barrier();
    cpu.load_state(path);
    a.fill_grads(9, g_comm->rank());
    b.fill_grads(9, g_comm->rank());
    dev.step();
    cpu.step();
    EXPECT_EQ(ha.h, hb.h) << dtype_name(dtype) << " after the masters' round trip";
  }
}

TEST(CudaBackend, NanPoliciesAcrossRanks) {
  Model m(3), z(3), ref(3);
  OptimizerOptions o = options();
  Engine skip(on_cuda(o, GradMode::kLocal), g_comm);
  m.register_with(skip);
  m.fill_grads(0, g_comm->rank());
  skip.step();
  const auto before = m.p;
  m.fill_grads(1, g_comm->rank());
  if (g_comm->rank() == g_comm->size() - 1) m.g[4][7] = std::nanf("");
  const StepReport r = skip.step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.nonfinite, 1);
  EXPECT_EQ(m.p, before);
  // zero: the bad entry counts as 0, as on the CPU backend.
  o.nan_policy = NanPolicy::kZero;
  Engine zero(on_cuda(o), g_comm);
  Optimizer opt(o);
  z.register_with(zero);
  ref.register_with(opt);
  z.fill_grads(0);
  ref.fill_grads(0);
  z.g[1][5] = INFINITY;
  ref.g[1][5] = 0.0f;
  EXPECT_EQ(zero.step().nonfinite, 1);
  opt.step();
  EXPECT_EQ(z.p, ref.p);
  // error: names the tensor, changes nothing.
  o.nan_policy = NanPolicy::kError;
  Model e(4);
  Engine err(on_cuda(o), g_comm);
  e.register_with(err);
  e.fill_grads(0);
  e.g[8][0] = std::nanf("");
  const auto keep = e.p;
  try {
    err.step();
    FAIL() << "no error";
  } catch (const NonFiniteGradientError& x) {
    EXPECT_NE(std::string(x.what()).find("head/w"), std::string::npos) << x.what();
  }
  EXPECT_EQ(e.p, keep);
}

TEST(CudaBackend, RelabelThetaSwapAndCheckpoints) {
  // A relabel (state regrouped: the relabelled tensor starts at update count 0 beside others
  // at 2, so two RuleSets), a theta swap (sets rebuilt) and a checkpoint both ways with the
  // CPU Optimizer: the same bits as the Optimizer given the same changes.
  Model ref(8), dev(8);
  Optimizer opt(options());
  ref.register_with(opt);
  Engine eng(on_cuda(options()), g_comm);
  dev.register_with(eng);
  const LabelRules moved = LabelRules::parse("re:^tiny => celo2; ndim<=1 => adamw; * => celo2");
  const Theta other = Theta::random(RuleConfig{}, 99);
  for (int s = 0; s < 6; ++s) {
    if (s == 2) {
      opt.set_rules(moved);
      eng.set_rules(moved);
    }
    if (s == 4) {
      opt.set_theta(other);
      eng.set_theta(other);
    }
    ref.fill_grads(s);
    dev.fill_grads(s);
    opt.step();
    eng.step();
    EXPECT_EQ(dev.p, ref.p) << "step " << s;
  }
  const std::string dir = ::testing::TempDir();
  const std::string from_dev = dir + "/celo2_cuda_host_" + std::to_string(g_comm->size()) + ".state";
  eng.save_state(from_dev);
  Model back_m(8);
  back_m.p = dev.p;
  OptimizerOptions bo = options();
  bo.rules = moved;
  bo.theta = other;
  Optimizer back(bo);
  back_m.register_with(back);
  back.load_state(from_dev);
  // ...and the Optimizer's own file back into a fresh device engine.
  const std::string from_cpu = dir + "/celo2_cuda_host_cpu_" + std::to_string(g_comm->rank()) + ".state";
  opt.save_state(from_cpu);
  const std::string shared = dir + "/celo2_cuda_host_cpu_0.state";
  g_comm->barrier();
  Model again(8);
  again.p = ref.p;
  Engine fresh(on_cuda(bo), g_comm);
  again.register_with(fresh);
  fresh.load_state(shared);
  for (int s = 6; s < 8; ++s) {
    ref.fill_grads(s);
    back_m.fill_grads(s);
    again.fill_grads(s);
    opt.step();
    back.step();
    fresh.step();
    EXPECT_EQ(back_m.p, ref.p) << "device checkpoint into the Optimizer, step " << s;
    EXPECT_EQ(again.p, ref.p) << "Optimizer checkpoint into the device engine, step " << s;
  }
  // A corrupt file is refused on every rank and changes nothing.
  if (g_comm->rank() == 0) {
    std::vector<uint8_t> b = flax::read_file(shared);
    b[b.size() / 2] ^= 1;
    flax::write_file_atomic(shared + ".bad", b);
  }
  g_comm->barrier();
  const auto keep = again.p;
  EXPECT_THROW(fresh.load_state(shared + ".bad"), flax::FormatError);
  EXPECT_EQ(fresh.step_count(), 8);
  EXPECT_EQ(again.p, keep);
}

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) {
  celo2::register_cuda_backend();
  return celo2::testing::run_mpi_tests(argc, argv, celo2::g_comm);
}
