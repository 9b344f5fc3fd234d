// The NCCL communicator on one rank: rank discovery (no GPU needed), the CPU Engine over
// NCCL equals the Engine over the local communicator (host buffers staged through the
// device; tolerance 0: the same numbers are summed by a one-rank all-reduce), and the GPU
// step (device gradients all-reduced asynchronously by NCCL, then the CUDA rule and update)
// equals the CPU Optimizer to 1e-4 relative on the parameter change.
#include <cstdlib>

#include "celo2/cuda/rule_cuda.h"
#include "celo2/engine.h"
#include "celo2/nccl_communicator.h"
#include "celo2/optimizer.h"
#include "gpu_test_util.h"

namespace {

using celo2::gputest::DeviceBuf;
using celo2::gputest::randn;
using celo2::gputest::rel_error;

struct EnvGuard {
  std::vector<std::string> names;
  explicit EnvGuard(std::vector<std::string> n) : names(std::move(n)) { clear(); }
  ~EnvGuard() { clear(); }
  void clear() {
    for (const auto& n : names) unsetenv(n.c_str());
  }
};

TEST(NcclRanks, DiscoveryOrderTorchrunSlurmOpenMpi) {
  EnvGuard g({"RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"});
  EXPECT_EQ(celo2::detect_launch().launcher, "none");
  setenv("OMPI_COMM_WORLD_RANK", "3", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  celo2::LaunchInfo r = celo2::detect_launch();
  EXPECT_EQ(r.launcher, "openmpi");
  EXPECT_EQ(r.rank, 3);
  EXPECT_EQ(r.local_rank, 1);
  setenv("SLURM_PROCID", "5", 1);
  setenv("SLURM_NTASKS", "8", 1);
  setenv("SLURM_LOCALID", "2", 1);
  r = celo2::detect_launch();
  EXPECT_EQ(r.launcher, "slurm");
  EXPECT_EQ(r.size, 8);
  EXPECT_EQ(r.local_rank, 2);
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "2", 1);
  setenv("LOCAL_RANK", "0", 1);
  r = celo2::detect_launch();
  EXPECT_EQ(r.launcher, "torchrun");
  EXPECT_EQ(r.size, 2);
  setenv("RANK", "2", 1);
  EXPECT_THROW(celo2::detect_launch(), celo2::CommError);  // rank >= size
  setenv("RANK", "x", 1);
  EXPECT_THROW(celo2::detect_launch(), celo2::CommError);
  unsetenv("WORLD_SIZE");
  setenv("RANK", "0", 1);
  EXPECT_THROW(celo2::detect_launch(), celo2::CommError);  // incomplete
}

struct Model {
  std::vector<std::string> names = {"layers.0.attn.weight", "layers.0.attn.bias", "embed.table",
                                    "layers.0.conv.weight", "scale"};
  std::vector<std::vector<int64_t>> shapes = {{48, 32}, {32}, {20, 16}, {4, 3, 5, 5}, {}};
  std::vector<std::vector<float>> params;
  explicit Model(uint64_t seed) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      int64_t n = 1;
      for (int64_t s : shapes[i]) n *= s;
      params.push_back(randn(n, seed + i, 0.2f));
    }
  }
};

// An engine over `comm` (options ea) and one over the local communicator (options eb), on
// the same Model(seed) and the same random gradients for `steps` steps: the same bits.
void expect_same_bits(const celo2::EngineOptions& ea_opts, std::shared_ptr<celo2::Communicator> comm,
                      const celo2::EngineOptions& eb_opts, int seed, int steps, uint64_t grad_seed) {
  Model a(seed), b(seed);
  std::vector<std::vector<float>> grads(a.shapes.size());
  celo2::Engine ea(ea_opts, std::move(comm)), eb(eb_opts, celo2::make_local_communicator());
  for (size_t i = 0; i < a.shapes.size(); ++i) {
    grads[i].resize(a.params[i].size());
    ea.add_tensor(a.names[i], a.shapes[i], a.params[i].data(), grads[i].data());
    eb.add_tensor(b.names[i], b.shapes[i], b.params[i].data(), grads[i].data());
  }
  for (int step = 0; step < steps; ++step) {
    for (size_t i = 0; i < grads.size(); ++i) grads[i] = randn(grads[i].size(), grad_seed + step * 10 + i, 0.1f);
    ea.step_with_lr(0.01);
    eb.step_with_lr(0.01);
  }
  for (size_t i = 0; i < a.shapes.size(); ++i)
    EXPECT_EQ(0, std::memcmp(a.params[i].data(), b.params[i].data(), a.params[i].size() * 4)) << a.names[i];
}

TEST(NcclEngine, OneRankEqualsLocalEngine) {
  CELO2_NEED_GPU();
  std::shared_ptr<celo2::Communicator> nccl(celo2::make_communicator("nccl"));
  ASSERT_EQ(nccl->backend(), "nccl");
  ASSERT_EQ(nccl->size(), 1);
  celo2::EngineOptions eo;
  expect_same_bits(eo, nccl, eo, 1, 3, 50);
  EXPECT_GT(nccl->counters().at("all_reduce").calls, 0);
}

TEST(NcclEngine, SplitCommunicatorAndSplitNewtonSchulz) {
  // Communicator::split on NCCL (ncclCommSplit): a one-rank group whose all-reduce works,
  // and the engine with every matrix forced onto a group (CELO2_NS_SPLIT's option) over
  // NCCL equals the engine over the local communicator with one owner per matrix.
  CELO2_NEED_GPU();
  std::shared_ptr<celo2::Communicator> nccl(celo2::make_communicator("nccl"));
  std::unique_ptr<celo2::Communicator> sub = nccl->split(0, 0);
  ASSERT_EQ(sub->size(), 1);
  ASSERT_EQ(sub->rank(), 0);
  double x[2] = {1.5, -2.0};
  sub->all_reduce_sum(x, 2);
  EXPECT_EQ(x[0], 1.5);
  EXPECT_EQ(x[1], -2.0);
  celo2::EngineOptions ea_opts, eb_opts;
  ea_opts.ns_split = 2;  // one rank: groups of min(2, W) = 1, so this is the owner path over NCCL
  eb_opts.ns_split = 1;
  expect_same_bits(ea_opts, nccl, eb_opts, 3, 2, 70);
}

TEST(NcclGpuStep, DeviceStepEqualsCpuOptimizer) {
  CELO2_NEED_GPU();
  auto nccl = celo2::make_nccl_communicator_ex();
  Model cpu(7);
  celo2::OptimizerOptions oo;
  oo.rules = celo2::LabelRules::all_celo2();
  oo.weight_decay = 0.1;
  oo.theta = celo2::Theta::adam_like(oo.rule);  // the RuleSet below runs the same weights
  celo2::Optimizer opt(oo);
  std::vector<std::vector<float>> grads(cpu.shapes.size());
  for (size_t i = 0; i < cpu.shapes.size(); ++i) {
    grads[i].resize(cpu.params[i].size());
    opt.add_tensor(cpu.names[i], cpu.shapes[i], cpu.params[i].data(), grads[i].data());
  }
  const celo2::Theta theta = celo2::Theta::adam_like(oo.rule);
  celo2::cuda::RuleSet set(oo.rule, theta, cpu.shapes);
  const int64_t n = set.total();
  std::vector<float> flat_p(n);
  const Model init(7);
  for (size_t i = 0; i < init.params.size(); ++i)
    std::copy(init.params[i].begin(), init.params[i].end(), flat_p.begin() + set.offset(i));
  DeviceBuf<> dp(flat_p), dg(n), du(n);
  cudaStream_t compute;
  CELO2_CUDA_CHECK(cudaStreamCreate(&compute));
  for (int step = 0; step < 3; ++step) {
    std::vector<float> flat_g(n);
    for (size_t i = 0; i < grads.size(); ++i) {
      grads[i] = randn(grads[i].size(), 70 + step * 10 + i, 0.1f);
      std::copy(grads[i].begin(), grads[i].end(), flat_g.begin() + set.offset(i));
    }
    opt.step_with_lr(0.01);
    CELO2_CUDA_CHECK(cudaMemcpyAsync(dg.ptr, flat_g.data(), n * 4, cudaMemcpyHostToDevice, compute));
    cudaEvent_t reduced = nccl->all_reduce_sum_async(dg.ptr, n, compute);
    CELO2_CUDA_CHECK(cudaStreamWaitEvent(compute, reduced, 0));
    celo2::cuda::scale_device(dg.ptr, 1.0f / nccl->size(), n, compute);
    set.step(dg.ptr, dp.ptr, du.ptr, compute);
    celo2::cuda::apply_step_device(0.01f, 0.1f, n, dp.ptr, du.ptr, compute);
  }
  CELO2_CUDA_CHECK(cudaStreamSynchronize(compute));
  CELO2_CUDA_CHECK(cudaStreamDestroy(compute));
  const auto got = dp.download();
  for (size_t i = 0; i < cpu.params.size(); ++i) {
    const size_t m = cpu.params[i].size();
    std::vector<float> dgpu(m), dcpu(m);
    for (size_t j = 0; j < m; ++j) {
      dgpu[j] = got[set.offset(i) + j] - init.params[i][j];
      dcpu[j] = cpu.params[i][j] - init.params[i][j];
    }
    EXPECT_LE(rel_error(dgpu.data(), dcpu.data(), m), 1e-4) << cpu.names[i];
  }
}

}  // namespace
