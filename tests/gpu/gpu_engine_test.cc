// The GPU engine (celo2/gpu_engine.h) on one rank of NCCL against the CPU Optimizer, the
// numeric contract: the parameter change after several steps within 1e-4 of the CPU's
// (max|err| / RMS, spec §8: the CUDA rule's float32 tolerance), with both branches (celo2
// and adamw) and frozen tensors; bucketing, bf16 parameters and gradients with a float32
// master, the NaN policies, relabelling and theta swaps, and checkpoints that move between
// the GPU engine and the CPU Optimizer in both directions.
#include <cuda_runtime.h>

#include <cstdio>
#include <filesystem>

#include "celo2/cuda/rule_cuda.h"
#include "celo2/gpu_engine.h"
#include "celo2/nccl_communicator.h"
#include "celo2/optimizer.h"
#include "gpu_test_util.h"

namespace {

using celo2::gputest::DeviceBuf;
using celo2::gputest::randn;
using celo2::gputest::rel_error;

constexpr double kTol = 1e-4;

std::shared_ptr<celo2::NcclCommunicator> nccl() {
  static std::shared_ptr<celo2::NcclCommunicator> c(celo2::make_nccl_communicator_ex());
  return c;
}

// A small transformer-like model: embedding, attention / MLP matrices, biases, a norm
// scale, a 3-D tensor, an empty tensor and a scalar.
struct Model {
  std::vector<std::string> names = {"embed.weight", "layers.0.attn.qkv.weight", "layers.0.attn.qkv.bias",
                                    "layers.0.mlp.fc1.weight", "layers.0.mlp.fc2.weight", "layers.0.ln.scale",
                                    "layers.0.heads", "empty", "head.weight", "temperature"};
  std::vector<std::vector<int64_t>> shapes = {{64, 24}, {72, 24}, {72}, {96, 24}, {24, 96}, {24},
                                              {3, 8, 24}, {0, 4}, {64, 24}, {}};
  std::vector<std::vector<float>> params, grads;
  explicit Model(uint64_t seed) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      int64_t n = 1;
      for (int64_t s : shapes[i]) n *= s;
      params.push_back(randn(n, seed + i, 0.2f));
      grads.emplace_back(n, 0.0f);
    }
  }
  // In place: the CPU optimizer holds pointers into these vectors.
  void new_grads(int step) {
    for (size_t i = 0; i < grads.size(); ++i) {
      const std::vector<float> r = randn(grads[i].size(), 1000 + 37 * step + i, 0.05f);
      std::copy(r.begin(), r.end(), grads[i].begin());
    }
  }
};

// The same model's tensors in device memory, float32.
struct DeviceModel {
  std::vector<std::unique_ptr<DeviceBuf<>>> p, g;
  explicit DeviceModel(const Model& m) {
    for (size_t i = 0; i < m.params.size(); ++i) {
      p.push_back(std::make_unique<DeviceBuf<>>(m.params[i]));
      g.push_back(std::make_unique<DeviceBuf<>>(m.grads[i].size()));
    }
  }
  void upload_grads(const Model& m) {
    for (size_t i = 0; i < m.grads.size(); ++i) g[i]->upload(m.grads[i]);
  }
};

celo2::OptimizerOptions options() {
  celo2::OptimizerOptions o;
  o.theta = celo2::Theta::project_default(o.rule);
  o.weight_decay = 0.05;
  // The seed's routing plus one frozen tensor.
  o.rules = celo2::LabelRules::parse("re:^temperature$ => frozen; ndim<=1 => adamw; re:embed => adamw; * => celo2");
  return o;
}

// The parameter change from `init` of GPU vs CPU, per tensor.
void expect_same_change(const Model& init, const Model& cpu, const DeviceModel& gpu, double tol,
                        const std::string& what) {
  for (size_t i = 0; i < init.params.size(); ++i) {
    const size_t n = init.params[i].size();
    if (!n) continue;
    const std::vector<float> got = gpu.p[i]->download();
    std::vector<float> dg(n), dc(n);
    for (size_t j = 0; j < n; ++j) {
      dg[j] = got[j] - init.params[i][j];
      dc[j] = cpu.params[i][j] - init.params[i][j];
    }
    double sq = 0;
    for (float x : dc) sq += static_cast<double>(x) * x;
    if (sq == 0) {  // frozen: untouched on both
      EXPECT_EQ(got, init.params[i]) << what << " " << init.names[i];
      continue;
    }
    EXPECT_LE(rel_error(dg.data(), dc.data(), static_cast<int64_t>(n)), tol) << what << " " << init.names[i];
  }
}

struct Pair {
  Model init, cpu;
  DeviceModel dev;
  celo2::Optimizer opt;
  celo2::GpuEngine eng;
  Pair(const celo2::OptimizerOptions& o, celo2::GpuEngineOptions go, uint64_t seed = 3)
      : init(seed), cpu(seed), dev(init), opt(o), eng((go.opt = o, go), nccl()) {
    for (size_t i = 0; i < cpu.shapes.size(); ++i) {
      opt.add_tensor(cpu.names[i], cpu.shapes[i], cpu.params[i].data(), cpu.grads[i].data());
      eng.add_tensor(cpu.names[i], cpu.shapes[i], dev.p[i]->ptr, dev.g[i]->ptr);
    }
  }
  std::pair<celo2::StepReport, celo2::StepReport> step(int k, double lr = 3e-3) {
    cpu.new_grads(k);
    dev.upload_grads(cpu);
    return {opt.step_with_lr(lr), eng.step_with_lr(lr)};
  }
};

TEST(GpuEngine, OneRankEqualsCpuOptimizer) {
  CELO2_NEED_GPU();
  Pair t(options(), celo2::GpuEngineOptions{});
  ASSERT_EQ(t.eng.world_size(), 1);
  for (size_t i = 0; i < t.cpu.shapes.size(); ++i) EXPECT_EQ(t.eng.label_of(i), t.opt.label_of(i));
  for (int k = 0; k < 5; ++k) {
    const auto [rc, rg] = t.step(k);
    for (int l = 0; l < 3; ++l) {
      EXPECT_NEAR(rg.grad_norm[l], rc.grad_norm[l], 1e-6 * (1 + rc.grad_norm[l])) << "label " << l;
      EXPECT_NEAR(rg.update_rms[l], rc.update_rms[l], 1e-3 * (1e-12 + rc.update_rms[l])) << "label " << l;
    }
    EXPECT_EQ(rg.step, rc.step);
  }
  expect_same_change(t.init, t.cpu, t.dev, kTol, "5 steps");
  std::printf("%s", t.eng.plan().describe().c_str());
}

TEST(GpuEngine, ManySmallBucketsEqualOneBucket) {
  CELO2_NEED_GPU();
  celo2::GpuEngineOptions small;
  small.bucket_bytes = 4 * 2000;  // several buckets per label
  Pair a(options(), small), b(options(), celo2::GpuEngineOptions{});
  EXPECT_GT(a.eng.plan().buckets.size(), b.eng.plan().buckets.size());
  for (int k = 0; k < 3; ++k) {
    a.step(k);
    b.step(k);
  }
  for (size_t i = 0; i < a.init.params.size(); ++i) {
    const auto x = a.dev.p[i]->download(), y = b.dev.p[i]->download();
    if (!x.empty()) {
      EXPECT_LE(rel_error(x.data(), y.data(), static_cast<int64_t>(x.size())), 1e-6) << a.init.names[i];
    }
  }
  expect_same_change(a.init, a.cpu, a.dev, kTol, "small buckets");
}

TEST(GpuEngine, TrainerStreamIsRespected) {
  CELO2_NEED_GPU();
  Pair t(options(), celo2::GpuEngineOptions{});
  cudaStream_t s;
  CELO2_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int k = 0; k < 3; ++k) {
    t.cpu.new_grads(k);
    // Gradients written asynchronously on the trainer's stream, then step() on that stream.
    for (size_t i = 0; i < t.cpu.grads.size(); ++i)
      if (!t.cpu.grads[i].empty())
        CELO2_CUDA_CHECK(cudaMemcpyAsync(t.dev.g[i]->ptr, t.cpu.grads[i].data(), t.cpu.grads[i].size() * 4,
                                         cudaMemcpyHostToDevice, s));
    t.opt.step_with_lr(3e-3);
    t.eng.step_with_lr(3e-3, s);
  }
  CELO2_CUDA_CHECK(cudaStreamSynchronize(s));
  CELO2_CUDA_CHECK(cudaStreamDestroy(s));
  expect_same_change(t.init, t.cpu, t.dev, kTol, "trainer stream");
}

TEST(GpuEngine, NanPolicies) {
  CELO2_NEED_GPU();
  Pair t(options(), celo2::GpuEngineOptions{});
  t.step(0);
  // Skip: nothing changes, counted.
  std::vector<std::vector<float>> before;
  for (auto& p : t.dev.p) before.push_back(p->download());
  t.cpu.new_grads(1);
  t.cpu.grads[1][5] = std::nanf("");
  t.cpu.grads[2][0] = INFINITY;
  t.dev.upload_grads(t.cpu);
  const celo2::StepReport r = t.eng.step_with_lr(3e-3);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.nonfinite, 2);
  EXPECT_EQ(t.eng.skipped_steps(), 1);
  EXPECT_EQ(t.eng.step_count(), 1);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(t.dev.p[i]->download(), before[i]) << t.init.names[i];
  t.opt.step_with_lr(3e-3);  // the CPU skips the same step
  t.step(2);
  expect_same_change(t.init, t.cpu, t.dev, kTol, "after a skipped step");

  // Error: thrown, nothing changed.
  auto o = options();
  o.nan_policy = celo2::NanPolicy::kError;
  Pair e(o, celo2::GpuEngineOptions{});
  e.cpu.new_grads(0);
  e.cpu.grads[3][7] = std::nanf("");
  e.dev.upload_grads(e.cpu);
  EXPECT_THROW(e.eng.step_with_lr(3e-3), celo2::NonFiniteGradientError);
  EXPECT_EQ(e.eng.step_count(), 0);
  EXPECT_EQ(e.dev.p[3]->download(), e.init.params[3]);

  // Zero: the bad entries count as zero, as on the CPU.
  o.nan_policy = celo2::NanPolicy::kZero;
  Pair z(o, celo2::GpuEngineOptions{});
  z.cpu.new_grads(0);
  z.cpu.grads[1][3] = std::nanf("");
  z.dev.upload_grads(z.cpu);
  const celo2::StepReport rz = z.eng.step_with_lr(3e-3);
  z.opt.step_with_lr(3e-3);
  EXPECT_FALSE(rz.skipped);
  EXPECT_EQ(rz.nonfinite, 1);
  expect_same_change(z.init, z.cpu, z.dev, kTol, "nan zeroed");
}

TEST(GpuEngine, RelabelAndThetaSwapKeepState) {
  CELO2_NEED_GPU();
  Pair t(options(), celo2::GpuEngineOptions{});
  t.step(0);
  t.step(1);
  t.opt.set_rules(celo2::LabelRules::all_celo2());
  t.eng.set_rules(celo2::LabelRules::all_celo2());
  for (size_t i = 0; i < t.cpu.shapes.size(); ++i) EXPECT_EQ(t.eng.label_of(i), t.opt.label_of(i));
  t.step(2);
  const celo2::Theta adam = celo2::Theta::adam_like(t.opt.options().rule);
  t.opt.set_theta(adam);
  t.eng.set_theta(adam);
  t.step(3);
  expect_same_change(t.init, t.cpu, t.dev, kTol, "relabel + theta");
  // A theta of another shape is refused; the engine still runs with its state.
  celo2::Theta wrong = adam;
  wrong.layers.pop_back();
  EXPECT_ANY_THROW(t.eng.set_theta(wrong));
  t.step(4);
  expect_same_change(t.init, t.cpu, t.dev, kTol, "after a refused theta");
}

TEST(GpuEngine, CheckpointsMoveBetweenGpuAndCpu) {
  CELO2_NEED_GPU();
  const std::string dir = std::filesystem::temp_directory_path() / "celo2_gpu_engine_test";
  std::filesystem::create_directories(dir);
  Pair t(options(), celo2::GpuEngineOptions{});
  for (int k = 0; k < 3; ++k) t.step(k);
  t.eng.save_state(dir + "/gpu.state");
  // A second CPU optimizer from the GPU file continues exactly like the first CPU one.
  Model cpu2 = t.cpu;
  celo2::Optimizer opt2(options());
  for (size_t i = 0; i < cpu2.shapes.size(); ++i)
    opt2.add_tensor(cpu2.names[i], cpu2.shapes[i], cpu2.params[i].data(), cpu2.grads[i].data());
  opt2.load_state(dir + "/gpu.state");
  EXPECT_EQ(opt2.step_count(), 3);
  t.cpu.new_grads(3);
  cpu2.new_grads(3);
  t.opt.step_with_lr(3e-3);
  opt2.step_with_lr(3e-3);
  for (size_t i = 0; i < cpu2.params.size(); ++i) {
    std::vector<float> a(cpu2.params[i].size()), b(a.size());
    for (size_t j = 0; j < a.size(); ++j) {
      a[j] = cpu2.params[i][j] - t.init.params[i][j];
      b[j] = t.cpu.params[i][j] - t.init.params[i][j];
    }
    if (!a.empty()) {
      EXPECT_LE(rel_error(a.data(), b.data(), static_cast<int64_t>(a.size())), kTol) << cpu2.names[i];
    }
  }
  // The CPU's file into a fresh GPU engine whose parameters are the CPU's.
  t.opt.save_state(dir + "/cpu.state");
  Model init2 = t.cpu;
  DeviceModel dev2(init2);
  celo2::GpuEngineOptions go;
  go.opt = options();
  celo2::GpuEngine eng2(go, nccl());
  for (size_t i = 0; i < init2.shapes.size(); ++i)
    eng2.add_tensor(init2.names[i], init2.shapes[i], dev2.p[i]->ptr, dev2.g[i]->ptr);
  eng2.load_state(dir + "/cpu.state");
  EXPECT_EQ(eng2.step_count(), 4);
  t.cpu.new_grads(4);
  dev2.upload_grads(t.cpu);
  t.opt.step_with_lr(3e-3);
  eng2.step_with_lr(3e-3);
  expect_same_change(init2, t.cpu, dev2, kTol, "GPU engine from the CPU's checkpoint");
  // A corrupt file is refused and nothing changes.
  {
    FILE* f = std::fopen((dir + "/bad.state").c_str(), "wb");
    std::fputs("not a state file", f);
    std::fclose(f);
  }
  EXPECT_ANY_THROW(eng2.load_state(dir + "/bad.state"));
  EXPECT_EQ(eng2.step_count(), 5);
  std::filesystem::remove_all(dir);
}

TEST(GpuEngine, Bf16ParametersAndGradientsWithMaster) {
  CELO2_NEED_GPU();
  // CPU reference: float32 parameters, gradients rounded to bf16 (what the GPU reads).
  auto round_bf16 = [](float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u += 0x7fff + ((u >> 16) & 1);
    u &= 0xffff0000u;
    float y;
    std::memcpy(&y, &u, 4);
    return y;
  };
  auto to_bits = [](const std::vector<float>& v) {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &v[i], 4);
      b[i] = static_cast<uint16_t>(u >> 16);
    }
    return b;
  };
  Model init(11);
  for (auto& p : init.params)
    for (float& x : p) x = round_bf16(x);
  Model cpu = init;
  celo2::Optimizer opt(options());
  std::vector<std::unique_ptr<DeviceBuf<uint16_t>>> pb, gb;
  celo2::GpuEngineOptions go;
  go.opt = options();
  celo2::GpuEngine eng(go, nccl());
  for (size_t i = 0; i < cpu.shapes.size(); ++i) {
    opt.add_tensor(cpu.names[i], cpu.shapes[i], cpu.params[i].data(), cpu.grads[i].data());
    pb.push_back(std::make_unique<DeviceBuf<uint16_t>>(to_bits(init.params[i])));
    gb.push_back(std::make_unique<DeviceBuf<uint16_t>>(init.params[i].size()));
    eng.add_tensor(cpu.names[i], cpu.shapes[i], celo2::DType::kBFloat16, pb[i]->ptr,
                   celo2::DType::kBFloat16, gb[i]->ptr);
  }
  for (int k = 0; k < 4; ++k) {
    cpu.new_grads(k);
    for (size_t i = 0; i < cpu.grads.size(); ++i) {
      for (float& x : cpu.grads[i]) x = round_bf16(x);
      gb[i]->upload(to_bits(cpu.grads[i]));
    }
    opt.step_with_lr(3e-3);
    eng.step_with_lr(3e-3);
  }
  // The bf16 parameters are the CPU's float32 ones rounded, up to one bf16 step where the
  // float32 results straddle a rounding boundary.
  for (size_t i = 0; i < cpu.params.size(); ++i) {
    const auto bits = pb[i]->download();
    for (size_t j = 0; j < bits.size(); ++j) {
      uint32_t u = static_cast<uint32_t>(bits[j]) << 16;
      float got;
      std::memcpy(&got, &u, 4);
      const float want = cpu.params[i][j];
      EXPECT_LE(std::fabs(got - want), std::fabs(want) * (1.0f / 128) + 1e-6f) << cpu.names[i] << "[" << j << "]";
    }
  }
}

TEST(GpuEngine, RefusesHostPointersAndBadOptions) {
  CELO2_NEED_GPU();
  celo2::GpuEngineOptions go;
  go.opt = options();
  celo2::GpuEngine eng(go, nccl());
  std::vector<float> host(12);
  DeviceBuf<> d(12);
  EXPECT_THROW(eng.add_tensor("w", {3, 4}, host.data(), d.ptr), std::invalid_argument);
  EXPECT_THROW(eng.add_tensor("w", {3, 4}, d.ptr, host.data()), std::invalid_argument);
  eng.add_tensor("w", {3, 4}, d.ptr, d.ptr);
  EXPECT_THROW(eng.add_tensor("w", {3, 4}, d.ptr, d.ptr), std::invalid_argument);  // duplicate
  EXPECT_THROW(eng.step_with_lr(NAN), std::invalid_argument);
  go.ns_precision = "fp8";
  EXPECT_ANY_THROW(celo2::GpuEngine(go, nccl()));
}

}  // namespace
