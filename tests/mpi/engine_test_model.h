// The model and recipe the multi-rank engine tests share (tests/mpi/engine_mpi_test.cc,
// tests/gpu_host/engine_cuda_host_test.cc): one copy of the fixture.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "celo2/lowp.h"
#include "celo2/recipe.h"

namespace celo2::testing {

// A model where matrices cross slice boundaries, some ranks hold no element of a tensor,
// tensors are smaller than W, and 3-d/4-d tensors are present.
struct Model {
  std::vector<std::string> names = {"embed/table", "layer0/attn/w", "layer0/attn/b", "scalar",
                                    "layer0/mlp/w", "conv/k",       "norm/scale",    "tiny/w",
                                    "head/w",       "cube"};
  std::vector<std::vector<int64_t>> shapes = {{23, 8}, {8, 24}, {24}, {}, {24, 37},
                                              {5, 3, 3, 4}, {8}, {2, 1}, {37, 23}, {3, 4, 5}};
  std::vector<std::vector<float>> p, g;
  explicit Model(uint64_t seed) { init(seed); }
  // Another set of tensors (names and shapes), filled the same way.
  Model(uint64_t seed, std::vector<std::string> n, std::vector<std::vector<int64_t>> s)
      : names(std::move(n)), shapes(std::move(s)) {
    init(seed);
  }
  void init(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0, 1);
    for (auto& s : shapes) {
      int64_t n = 1;
      for (auto d : s) n *= d;
      std::vector<float> v(n);
      for (auto& x : v) x = nd(rng) * 0.5f;
      p.push_back(v);
      g.push_back(std::vector<float>(n, 0.0f));
    }
  }
  template <class Opt>
  void register_with(Opt& opt) {
    for (size_t i = 0; i < names.size(); ++i) opt.add_tensor(names[i], shapes[i], p[i].data(), g[i].data());
  }
  void fill_grads(int step, int rank = -1) {
    std::mt19937_64 rng(1000 + step + (rank + 1) * 7919);
    std::normal_distribution<float> nd(0, 1);
    for (auto& v : g)
      for (auto& x : v) x = nd(rng) * (step % 2 ? 1e-2f : 1.0f);
  }
};

// bf16/fp16 parameters: the trainer's low-precision copies of a Model.
struct HalfModel {
  DType dtype;
  std::vector<std::vector<uint16_t>> h;
  HalfModel(const Model& m, DType d) : dtype(d) {
    for (const auto& v : m.p) {
      std::vector<uint16_t> x(v.size());
      for (size_t i = 0; i < v.size(); ++i) x[i] = lowp::to_half(d == DType::kBFloat16, v[i]);
      h.push_back(x);
    }
  }
  float at(size_t t, size_t i) const { return lowp::from_half(dtype == DType::kBFloat16, h[t][i]); }
  void to_float(Model& m) const {
    for (size_t t = 0; t < h.size(); ++t)
      for (size_t i = 0; i < h[t].size(); ++i) m.p[t][i] = at(t, i);
  }
  template <class Opt>
  void register_with(Opt& eng, Model& grads_of) {
    for (size_t t = 0; t < h.size(); ++t)
      eng.add_tensor(grads_of.names[t], grads_of.shapes[t], h[t].data(), dtype, grads_of.g[t].data());
  }
};

inline OptimizerOptions options() {
  OptimizerOptions o;
  o.theta = Theta::random(o.rule, 11);
  o.schedule = Schedule::parse("cosine:lr=1e-2,warmup=2,total=20,final=0.1");
  o.weight_decay = 0.01;
  o.rules = LabelRules::parse("re:^tiny => celo2; ndim<=1 => adamw; re:embed => adamw; * => celo2");
  return o;
}

// The mean over W ranks of the gradients Model(seed).fill_grads(step, r) gives rank r (what
// the engine averages in GradMode::kLocal); `skip(tensor, rank)` drops a rank's part.
template <class Skip>
std::vector<std::vector<float>> mean_grads(uint64_t seed, int step, int W, Skip skip) {
  std::vector<std::vector<float>> mean;
  for (int r = 0; r < W; ++r) {
    Model tmp(seed);
    tmp.fill_grads(step, r);
    mean.resize(tmp.g.size());
    for (size_t i = 0; i < mean.size(); ++i) {
      mean[i].resize(tmp.g[i].size(), 0.0f);
      if (skip(i, r)) continue;
      for (size_t k = 0; k < mean[i].size(); ++k) mean[i][k] += tmp.g[i][k] / W;
    }
  }
  return mean;
}
inline std::vector<std::vector<float>> mean_grads(uint64_t seed, int step, int W) {
  return mean_grads(seed, step, W, [](size_t, int) { return false; });
}

// The rule variants the engine tests run: 0 Celo2, 1 Celo2-base, 2 aggregate magnitude and
// parameter scale, 3 bias correction and preconditioned output.
inline RuleConfig rule_variant(int v) {
  RuleConfig rule;
  switch (v) {
    case 1: rule = RuleConfig::celo2_base(); break;
    case 2: rule.aggregate_mag = true; rule.exp_mult = 0.3f; rule.param_scale_mult = true; break;
    case 3: rule.bias_correction = true; rule.precondition_output = true; break;
    default: break;
  }
  return rule;
}

}  // namespace celo2::testing
