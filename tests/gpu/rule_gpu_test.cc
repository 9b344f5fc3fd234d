// The CUDA rule against the CPU path (the reference for the GPU path), with the tolerance of
// each comparison stated where it is checked:
//  - every golden file (spec §8) on the GPU: max|err|/RMS(expected) <= 1e-4 per tensor;
//  - random tensors of many shapes (0-d to 4-d), GPU vs celo2_update: <= 1e-4, and two GPU
//    runs give identical bits (deterministic reductions);
//  - bf16 params/grads with a float32 master vs the float32 path: <= 2e-2 (bf16 keeps 8
//    significant bits, relative rounding 2^-9 per value);
//  - Newton–Schulz on cuBLAS vs the kernels' double-precision reference: float32 <= 1e-4,
//    tf32 <= 3e-2, bf16 <= 1e-1 (speed modes, sanity bounds);
//  - fused AdamW on the device vs adamw_update: <= 1e-6.
#include <filesystem>
#include <map>

#include "celo2/adamw.h"
#include "celo2/cuda/rule_cuda.h"
#include "celo2/flax_msgpack.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"
#include "celo2/theta_io.h"
#include "gpu_test_util.h"

namespace {

using celo2::gputest::DeviceBuf;
using celo2::gputest::randn;
using celo2::gputest::rel_error;

std::vector<std::string> golden_rule_files() {
  std::vector<std::string> out;
  // CELO2_GOLDEN_DIR in the environment: binaries built elsewhere (tests/gpu/prebuild.sh).
  const char* golden_env = std::getenv("CELO2_GOLDEN_DIR");
  const std::string golden_dir = golden_env && *golden_env ? golden_env : CELO2_GOLDEN_DIR;
  for (const auto& e : std::filesystem::directory_iterator(golden_dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("rule_", 0) == 0 && e.path().extension() == ".msgpack") out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(GoldenGpu, EveryRuleFileWithinTolerance) {
  CELO2_NEED_GPU();
  const auto files = golden_rule_files();
  ASSERT_EQ(files.size(), 11u);
  for (const std::string& path : files) {
    const auto bytes = celo2::flax::read_file(path);
    const celo2::flax::Value d = celo2::flax::decode(bytes);
    const celo2::RuleConfig cfg = celo2::config_from_value(d.at("config"));
    const celo2::Theta theta = celo2::theta_from_value(d.at("theta"), cfg);
    std::vector<std::string> names;
    std::vector<std::vector<int64_t>> shapes;
    for (const auto& [name, v] : d.at("initial_params").map) {
      names.push_back(name);
      shapes.push_back(v.as_array().shape);
    }
    celo2::cuda::RuleSet set(cfg, theta, shapes);
    std::vector<float> p(set.total()), g(set.total()), u(set.total());
    for (size_t i = 0; i < names.size(); ++i) {
      const auto& a = d.at("initial_params").at(names[i]).as_array();
      std::copy(a.data.begin(), a.data.end(), p.begin() + set.offset(i));
    }
    DeviceBuf<> dg(g.size()), dp(p.size()), du(u.size());
    const celo2::flax::Value& steps = d.at("steps");
    double worst = 0;
    for (size_t k = 0; k < steps.map.size(); ++k) {
      const celo2::flax::Value& s = steps.at(std::to_string(k));
      for (size_t i = 0; i < names.size(); ++i) {
        const auto& ga = s.at("grads").at(names[i]).as_array();
        std::copy(ga.data.begin(), ga.data.end(), g.begin() + set.offset(i));
      }
      dg.upload(g);
      dp.upload(p);
      set.step(dg.ptr, dp.ptr, du.ptr);
      u = du.download();
      for (size_t i = 0; i < names.size(); ++i) {
        const auto& want = s.at("celo2_step").at(names[i]).as_array();
        const float* got = u.data() + set.offset(i);
        const double e = rel_error(got, want.data.data(), want.numel());
        worst = std::max(worst, e);
        EXPECT_LE(e, 1e-4) << path << " step " << k << " tensor " << names[i];
        float* pp = p.data() + set.offset(i);
        for (int64_t j = 0; j < want.numel(); ++j)
          pp[j] = static_cast<float>(static_cast<double>(pp[j]) - 0.01 * want.data[j]);
      }
    }
    std::printf("%s: worst %.3e\n", std::filesystem::path(path).filename().c_str(), worst);
  }
}

const std::vector<std::vector<int64_t>> kShapes = {
    {}, {1}, {7}, {5000}, {6, 10}, {12, 5}, {8, 8}, {1, 9}, {300, 70}, {64, 257},
    {3, 4, 5}, {2, 3, 4, 5}, {5, 1, 3}, {4, 33, 17}, {2, 2, 40, 3}};

// GPU vs CPU fast path, for a config; `steps` updates with evolving params.
void compare_with_cpu(const celo2::RuleConfig& cfg, uint64_t seed) {
  const celo2::Theta theta = celo2::Theta::random(cfg, seed);
  celo2::cuda::RuleSet set(cfg, theta, kShapes);
  std::vector<celo2::RuleState> st;
  for (size_t i = 0; i < kShapes.size(); ++i) st.push_back(celo2::RuleState::zeros(set.geometry(i)));
  celo2::Workspace ws;
  std::vector<float> p = randn(set.total(), seed + 1, 0.3f);
  DeviceBuf<> dg(set.total()), dp(set.total()), du(set.total());
  for (int step = 0; step < 3; ++step) {
    std::vector<float> g = randn(set.total(), seed + 10 + step, step == 1 ? 3.0f : 0.05f);
    if (step == 2) g[0] = 5000.0f;  // clipped
    dg.upload(g);
    dp.upload(p);
    set.step(dg.ptr, dp.ptr, du.ptr);
    const std::vector<float> u = du.download();
    for (size_t i = 0; i < kShapes.size(); ++i) {
      const celo2::Geometry& geo = set.geometry(i);
      std::vector<float> want(geo.numel);
      const int64_t off = set.offset(i);
      celo2::celo2_update(cfg, theta, geo, st[i], g.data() + off, p.data() + off, want.data(), ws);
      EXPECT_LE(rel_error(u.data() + off, want.data(), geo.numel), 1e-4)
          << "shape " << geo.shape_str() << " step " << step;
      if (step == 2) {  // the state too
        const celo2::RuleState gs = set.download_state(i);
        EXPECT_LE(rel_error(gs.m.data(), st[i].m.data(), gs.m.size()), 1e-6) << geo.shape_str();
        if (geo.factored) {
          EXPECT_LE(rel_error(gs.v_row.data(), st[i].v_row.data(), gs.v_row.size()), 1e-6)
              << geo.shape_str();
        }
      }
    }
    for (size_t j = 0; j < p.size(); ++j) p[j] -= 0.01f * u[j];
  }
}

TEST(RuleGpu, RandomShapesMatchCpuDefault) {
  CELO2_NEED_GPU();
  compare_with_cpu(celo2::RuleConfig{}, 1);
}

TEST(RuleGpu, RandomShapesMatchCpuVariants) {
  CELO2_NEED_GPU();
  celo2::RuleConfig base = celo2::RuleConfig::celo2_base();
  compare_with_cpu(base, 2);
  celo2::RuleConfig v;
  v.bias_correction = true;
  v.aggregate_mag = true;
  v.exp_mult = 0.5f;
  v.param_scale_mult = true;
  v.precondition_output = true;
  v.ff_hidden_size = 16;
  v.ff_hidden_layers = 3;
  compare_with_cpu(v, 3);
  celo2::RuleConfig t;
  t.mlp_activation = celo2::Activation::kTanh;
  t.normalize_input = false;
  t.exp_mult = 0.3f;
  compare_with_cpu(t, 4);
}

TEST(RuleGpu, Deterministic) {
  CELO2_NEED_GPU();
  const celo2::RuleConfig cfg;
  const celo2::Theta theta = celo2::Theta::random(cfg, 9);
  std::vector<std::vector<float>> outs;
  for (int run = 0; run < 2; ++run) {
    celo2::cuda::RuleSet set(cfg, theta, kShapes);
    DeviceBuf<> dg(randn(set.total(), 5)), dp(randn(set.total(), 6)), du(set.total());
    set.step(dg.ptr, dp.ptr, du.ptr);
    set.step(dg.ptr, dp.ptr, du.ptr);
    outs.push_back(du.download());
  }
  EXPECT_EQ(0, std::memcmp(outs[0].data(), outs[1].data(), outs[0].size() * sizeof(float)));
}

TEST(RuleGpu, Bf16ParamsAndGradsNearFloat32) {
  CELO2_NEED_GPU();
  const celo2::RuleConfig cfg;
  const celo2::Theta theta = celo2::Theta::random(cfg, 11);
  const std::vector<std::vector<int64_t>> shapes = {{256, 96}, {96}, {4, 32, 48}};
  celo2::cuda::RuleSet s32(cfg, theta, shapes), s16(cfg, theta, shapes);
  const int64_t n = s32.total();
  const std::vector<float> p0 = randn(n, 12, 0.2f);
  DeviceBuf<> p32(p0), master(p0), u(n), g32(n), gconv(n);
  DeviceBuf<uint16_t> p16(n), g16(n);
  celo2::cuda::float_to_bf16_device(master.ptr, p16.ptr, n);
  const float lr = 0.01f, wd = 0.1f;
  for (int step = 0; step < 4; ++step) {
    g32.upload(randn(n, 20 + step, 0.1f));
    // float32 path
    s32.step(g32.ptr, p32.ptr, u.ptr);
    celo2::cuda::apply_step_device(lr, wd, n, p32.ptr, u.ptr);
    // bf16 path: grads arrive in bf16, the update goes into the float32 master, params are
    // the master rounded to bf16.
    celo2::cuda::float_to_bf16_device(g32.ptr, g16.ptr, n);
    celo2::cuda::bf16_to_float_device(g16.ptr, gconv.ptr, n);
    s16.step(gconv.ptr, master.ptr, u.ptr);
    celo2::cuda::apply_step_device(lr, wd, n, master.ptr, u.ptr);
    celo2::cuda::float_to_bf16_device(master.ptr, p16.ptr, n);
  }
  DeviceBuf<> back(n);
  celo2::cuda::bf16_to_float_device(p16.ptr, back.ptr, n);
  const auto a = back.download(), b = p32.download(), m = master.download();
  // Compare the parameter change, not the parameters (which are dominated by p0).
  std::vector<float> da(n), db(n), dm(n);
  for (int64_t i = 0; i < n; ++i) {
    da[i] = a[i] - p0[i];
    db[i] = b[i] - p0[i];
    dm[i] = m[i] - p0[i];
  }
  EXPECT_LE(rel_error(dm.data(), db.data(), n), 2e-2) << "float32 master vs float32 path";
  // The bf16 parameters themselves: within bf16 rounding of the float32 result.
  double worst = 0;
  for (int64_t i = 0; i < n; ++i)
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - m[i]) / std::max(1e-6, std::fabs(static_cast<double>(m[i]))));
  EXPECT_LE(worst, 1.0 / 256.0) << "bf16 params are the master rounded to nearest";
}

TEST(NewtonSchulzGpu, MatchesReference) {
  CELO2_NEED_GPU();
  const celo2::RuleConfig cfg;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{64, 256}, {256, 64}, {128, 128}, {1, 50}, {50, 1}, {33, 17}};
  const std::pair<celo2::cuda::NsPrecision, double> modes[] = {
      {celo2::cuda::NsPrecision::kFloat32, 1e-4},
      {celo2::cuda::NsPrecision::kTf32, 3e-2},
      {celo2::cuda::NsPrecision::kBf16, 1e-1}};
  for (const auto& [mode, tol] : modes) {
    celo2::cuda::NewtonSchulzCuda ns(mode);
    for (const auto& [r, c] : shapes) {
      const int64_t batch = 3, rc = r * c;
      std::vector<float> x = randn(batch * rc, 100 + r * 7 + c);
      DeviceBuf<> dx(x);
      ns.run(cfg, r, c, batch, dx.ptr, nullptr);
      const auto got = dx.download();
      for (int64_t b = 0; b < batch; ++b) {
        std::vector<float> want(x.begin() + b * rc, x.begin() + (b + 1) * rc);
        celo2::newton_schulz_reference(cfg, r, c, want.data());
        EXPECT_LE(rel_error(got.data() + b * rc, want.data(), rc), tol)
            << celo2::cuda::ns_precision_name(mode) << " " << r << "x" << c << " batch " << b;
      }
    }
  }
}

TEST(AdamWGpu, MatchesCpu) {
  CELO2_NEED_GPU();
  const int64_t n = 100003;
  std::vector<float> p = randn(n, 1), g = randn(n, 2), mu(n, 0.0f), nu(n, 0.0f);
  DeviceBuf<> dp(p), dg(g), dmu(mu), dnu(nu);
  celo2::AdamWParams a;
  a.lr = 0.02f;
  a.wd = 0.1f;
  for (int c = 1; c <= 3; ++c) {
    a.count = c;
    celo2::adamw_update(a, n, p.data(), g.data(), mu.data(), nu.data());
    celo2::cuda::adamw_device(a, n, dp.ptr, dg.ptr, dmu.ptr, dnu.ptr);
  }
  const auto got = dp.download();
  EXPECT_LE(rel_error(got.data(), p.data(), n), 1e-6);
}

TEST(RuleGpu, BadConfigsAreRefusedByName) {
  CELO2_NEED_GPU();
  celo2::RuleConfig cfg;
  cfg.ff_hidden_size = 65;
  const celo2::Theta theta = celo2::Theta::random(cfg, 1);
  try {
    celo2::cuda::RuleSet set(cfg, theta, {{4, 4}});
    FAIL() << "expected a refusal";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("hidden sizes up to 64"), std::string::npos) << e.what();
  }
}

}  // namespace
