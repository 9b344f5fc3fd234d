// The one engine on its "cuda" backend (celo2/cuda_backend.h) on one GPU against the CPU
// Optimizer: the numeric contract, the parameter change after several steps within 1e-4 of
// the CPU's (max|err| / RMS, spec §8: the CUDA rule's float32 tolerance), with both
// branches (celo2 and adamw), a frozen tensor, an empty tensor and a scalar; the NaN
// policies; a relabel and a theta swap (the backend regroups its RuleSets); and checkpoints
// that move between the device engine and the CPU Optimizer in both directions. The
// multi-rank orchestration is the engine's, tested on CPU ranks (tests/mpi,
// tests/gpu_host/engine_cuda_host_test.cc); this test is what only a device can check.
#include <cuda_runtime.h>

#include <filesystem>

#include "celo2/cuda_backend.h"
#include "celo2/engine.h"
#include "celo2/lowp.h"
#include "celo2/state_file.h"
#include "celo2/optimizer.h"
#include "gpu_test_util.h"

namespace {

using celo2::gputest::DeviceBuf;
using celo2::gputest::randn;
using celo2::gputest::rel_error;

constexpr double kTol = 1e-4;

struct Model {
  std::vector<std::string> names = {"embed.weight", "layers.0.attn.qkv.weight", "layers.0.attn.qkv.bias",
                                    "layers.0.mlp.fc1.weight", "layers.0.mlp.fc2.weight", "layers.0.ln.scale",
                                    "layers.0.heads", "empty", "head.weight", "temperature", "frozen.pos"};
  std::vector<std::vector<int64_t>> shapes = {{64, 24}, {72, 24}, {72}, {96, 24}, {24, 96}, {24},
                                              {3, 8, 24}, {0, 4}, {64, 24}, {}, {16, 24}};
  std::vector<std::vector<float>> params, grads;
  explicit Model(uint64_t seed) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      int64_t n = 1;
      for (int64_t s : shapes[i]) n *= s;
      params.push_back(randn(n, seed + i, 0.2f));
      grads.emplace_back(n, 0.0f);
    }
  }
  void new_grads(int step) {  // in place: the CPU optimizer holds pointers into these
    for (size_t i = 0; i < grads.size(); ++i) {
      const std::vector<float> r = randn(grads[i].size(), 1000 + 37 * step + i, 0.05f);
      std::copy(r.begin(), r.end(), grads[i].begin());
    }
  }
};

celo2::OptimizerOptions options() {
  celo2::OptimizerOptions o;
  o.theta = celo2::Theta::random(o.rule, 7);
  o.schedule = celo2::Schedule::parse("cosine:lr=1e-2,warmup=2,total=20,final=0.1");
  o.weight_decay = 0.01;
  o.rules = celo2::LabelRules::parse("re:frozen => frozen; re:embed => adamw; ndim<=1 => adamw; * => celo2");
  return o;
}

// The model's tensors in device memory, registered with an engine on the cuda backend.
struct OnDevice {
  std::vector<std::unique_ptr<DeviceBuf<>>> p, g;
  std::unique_ptr<celo2::Engine> eng;
  OnDevice(const Model& m, const celo2::OptimizerOptions& o) {
    celo2::register_cuda_backend();
    celo2::EngineOptions eo;
    eo.opt = o;
    eo.backend = "cuda";
    eo.grad_mode = celo2::GradMode::kReduced;
    eng = std::make_unique<celo2::Engine>(eo, celo2::make_local_communicator());
    for (size_t i = 0; i < m.shapes.size(); ++i) {
      p.push_back(std::make_unique<DeviceBuf<>>(m.params[i]));
      g.push_back(std::make_unique<DeviceBuf<>>(m.grads[i]));
      eng->add_tensor(m.names[i], m.shapes[i], p.back()->ptr, g.back()->ptr);
    }
  }
  void upload_grads(const Model& m) {
    for (size_t i = 0; i < g.size(); ++i) g[i]->upload(m.grads[i]);
  }
  void expect_close(const Model& cpu, const Model& start, const std::string& what) {
    for (size_t i = 0; i < p.size(); ++i) {
      const std::vector<float> got = p[i]->download();
      std::vector<float> dg(got.size()), dc(got.size());
      for (size_t k = 0; k < got.size(); ++k) {
        dg[k] = got[k] - start.params[i][k];
        dc[k] = cpu.params[i][k] - start.params[i][k];
      }
      if (got.empty()) continue;
      EXPECT_LE(rel_error(dg.data(), dc.data(), dg.size()), kTol) << what << ": " << cpu.names[i];
    }
  }
};

TEST(EngineOnCuda, MatchesTheCpuOptimizer) {
  CELO2_NEED_GPU();
  Model cpu(1), start(1);
  celo2::Optimizer opt(options());
  for (size_t i = 0; i < cpu.names.size(); ++i)
    opt.add_tensor(cpu.names[i], cpu.shapes[i], cpu.params[i].data(), cpu.grads[i].data());
  OnDevice dev(start, options());
  const Model origin = start;
  for (int s = 0; s < 5; ++s) {
    cpu.new_grads(s);
    dev.upload_grads(cpu);
    opt.step();
    dev.eng->step();
    dev.expect_close(cpu, origin, "step " + std::to_string(s));
  }
}

TEST(EngineOnCuda, Bf16MastersOnTheDevice) {
  // bf16 parameters in device memory: the engine's device masters (k_store_lowp,
  // k_reseed_master) follow the CPU engine's host masters on the same bf16 start within the
  // rule's tolerance; a write into the device parameters re-seeds exactly that master.
  CELO2_NEED_GPU();
  Model m(3);
  std::vector<std::vector<uint16_t>> host;
  for (auto& v : m.params) {
    host.emplace_back(v.size());
    for (size_t k = 0; k < v.size(); ++k) host.back()[k] = celo2::lowp::to_bf16(v[k]);
  }
  celo2::register_cuda_backend();
  celo2::EngineOptions eo;
  eo.opt = options();
  eo.grad_mode = celo2::GradMode::kReduced;
  eo.plan = celo2::Plan::kWholeTensors;
  celo2::Engine cpu(eo, celo2::make_local_communicator());
  eo.backend = "cuda";
  celo2::Engine gpu(eo, celo2::make_local_communicator());
  std::vector<std::unique_ptr<DeviceBuf<uint16_t>>> dp;
  std::vector<std::unique_ptr<DeviceBuf<>>> dg;
  for (size_t i = 0; i < m.shapes.size(); ++i) {
    dp.push_back(std::make_unique<DeviceBuf<uint16_t>>(host[i]));
    dg.push_back(std::make_unique<DeviceBuf<>>(m.grads[i]));
    cpu.add_tensor(m.names[i], m.shapes[i], host[i].data(), celo2::DType::kBFloat16, m.grads[i].data());
    gpu.add_tensor(m.names[i], m.shapes[i], dp[i]->ptr, celo2::DType::kBFloat16, dg[i]->ptr);
  }
  for (int s = 0; s < 4; ++s) {
    m.new_grads(s);
    for (size_t i = 0; i < dg.size(); ++i) dg[i]->upload(m.grads[i]);
    if (s == 2 && !host[1].empty()) {  // the trainer writes one element on both sides
      host[1][5] = celo2::lowp::to_bf16(1.5f);
      std::vector<uint16_t> d = dp[1]->download();
      d[5] = host[1][5];
      dp[1]->upload(d);
    }
    const celo2::StepReport rc = cpu.step(), rg = gpu.step();
    EXPECT_EQ(rg.masters_reseeded, rc.masters_reseeded) << "step " << s;
    EXPECT_EQ(rg.masters_reseeded, s == 2 ? 1 : 0) << "step " << s;
  }
  const std::string dir = ::testing::TempDir();
  cpu.save_state(dir + "/bf16_cpu.state");
  gpu.save_state(dir + "/bf16_gpu.state");
  const celo2::StateFile fc = celo2::read_state_file(dir + "/bf16_cpu.state"),
                         fg = celo2::read_state_file(dir + "/bf16_gpu.state");
  for (size_t i = 0; i < m.names.size(); ++i) {
    const auto* a = celo2::find_record(fc, m.names[i]);
    const auto* b = celo2::find_record(fg, m.names[i]);
    ASSERT_TRUE(a && b);
    ASSERT_EQ(a->master.size(), b->master.size()) << m.names[i];
    if (a->master.empty()) continue;
    std::vector<float> dgpu(a->master.size()), dcpu(a->master.size());
    for (size_t k = 0; k < dgpu.size(); ++k) {
      const float start = celo2::lowp::from_bf16(celo2::lowp::to_bf16(m.params[i][k]));
      dgpu[k] = b->master[k] - start;
      dcpu[k] = a->master[k] - start;
    }
    if (m.names[i] == "frozen.pos") continue;  // unchanged on both
    EXPECT_LE(rel_error(dgpu.data(), dcpu.data(), dgpu.size()), kTol) << m.names[i];
    const std::vector<uint16_t> got = dp[i]->download();
    for (size_t k = 0; k < got.size(); ++k)
      ASSERT_EQ(got[k], celo2::lowp::to_bf16(b->master[k])) << m.names[i] << " element " << k;
  }
}

TEST(EngineOnCuda, NanPoliciesRelabelThetaSwapAndCheckpoints) {
  CELO2_NEED_GPU();
  Model cpu(2), start(2);
  const Model origin = start;
  celo2::Optimizer opt(options());
  for (size_t i = 0; i < cpu.names.size(); ++i)
    opt.add_tensor(cpu.names[i], cpu.shapes[i], cpu.params[i].data(), cpu.grads[i].data());
  OnDevice dev(start, options());
  const auto moved = celo2::LabelRules::parse("re:frozen => frozen; ndim<=1 => adamw; * => celo2");
  const celo2::Theta other = celo2::Theta::random(celo2::RuleConfig{}, 99);
  for (int s = 0; s < 6; ++s) {
    if (s == 2) {
      opt.set_rules(moved);
      dev.eng->set_rules(moved);
    }
    if (s == 4) {
      opt.set_theta(other);
      dev.eng->set_theta(other);
    }
    cpu.new_grads(s);
    dev.upload_grads(cpu);
    opt.step();
    dev.eng->step();
  }
  dev.expect_close(cpu, origin, "after relabel and theta swap");
  // A NaN skips the step on the device as on the CPU.
  cpu.new_grads(6);
  cpu.grads[3][5] = std::nanf("");
  dev.upload_grads(cpu);
  const celo2::StepReport r = dev.eng->step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.nonfinite, 1);
  // Checkpoints both ways.
  const std::string dir = ::testing::TempDir();
  dev.eng->save_state(dir + "/cuda.state");
  celo2::OptimizerOptions bo = options();
  bo.rules = moved;
  bo.theta = other;
  Model back(2);
  for (size_t i = 0; i < back.params.size(); ++i) back.params[i] = dev.p[i]->download();
  celo2::Optimizer cpu_back(bo);
  for (size_t i = 0; i < back.names.size(); ++i)
    cpu_back.add_tensor(back.names[i], back.shapes[i], back.params[i].data(), back.grads[i].data());
  cpu_back.load_state(dir + "/cuda.state");
  EXPECT_EQ(cpu_back.step_count(), 6);
  EXPECT_EQ(cpu_back.skipped_steps(), 1);
  opt.save_state(dir + "/cpu.state");
  dev.eng->load_state(dir + "/cpu.state");
  const Model before = [&] {
    Model m(2);
    for (size_t i = 0; i < m.params.size(); ++i) m.params[i] = dev.p[i]->download();
    return m;
  }();
  for (size_t i = 0; i < cpu.params.size(); ++i) cpu.params[i] = before.params[i];
  for (int s = 7; s < 9; ++s) {
    cpu.new_grads(s);
    dev.upload_grads(cpu);
    opt.step();
    dev.eng->step();
  }
  dev.expect_close(cpu, before, "after the CPU checkpoint loaded on the device");
}

}  // namespace
