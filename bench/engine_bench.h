// The sharded engine's step time on a GPT-shaped tensor set, per phase: the `engine` mode of
// celo2-bench. Run under mpirun -np W (W = 1, 2, 4 in docs/PERF.md); rank 0 prints.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "celo2/comm_model.h"
#include "celo2/engine.h"

namespace celo2::bench {

struct EngineBenchOptions {
  int layers = 8;
  int64_t d = 512, ffn = 2048, vocab = 50257, context = 1024;  // ~51M parameters
  int warmup = 1, steps = 3;
  bool base = false;
};

inline int run_engine_bench(const EngineBenchOptions& o) {
  auto comm = std::shared_ptr<Communicator>(make_communicator("auto"));
  const int W = comm->size(), me = comm->rank();
  const auto spec = gpt_tensors(o.layers, o.d, o.ffn, o.vocab, o.context);
  EngineOptions eo;
  eo.opt.rule = o.base ? RuleConfig::celo2_base() : RuleConfig{};
  eo.opt.theta = Theta::random(eo.opt.rule, 1);
  eo.opt.rules = LabelRules::seed_default();
  Engine eng(eo, comm);
  std::vector<std::vector<float>> p(spec.size()), g(spec.size());
  std::mt19937 rng(me);
  std::normal_distribution<float> nd;
  int64_t n = 0;
  for (size_t i = 0; i < spec.size(); ++i) {
    int64_t k = 1;
    for (auto s : spec[i].shape) k *= s;
    n += k;
    p[i].assign(k, 0.02f);
    g[i].resize(k);
    for (auto& x : g[i]) x = nd(rng) * 1e-3f;
    eng.add_tensor(spec[i].name, spec[i].shape, p[i].data(), g[i].data());
  }
  for (int s = 0; s < o.warmup; ++s) eng.step();
  std::map<std::string, double> sec, bytes;
  std::vector<double> step_times;
  for (int s = 0; s < o.steps; ++s) {
    comm->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    eng.step();
    step_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    for (const auto& [ph, t] : eng.last_phase_stats().seconds) sec[ph] += t / o.steps;
    for (const auto& [ph, b] : eng.last_phase_stats().bytes) bytes[ph] += static_cast<double>(b) / o.steps;
  }
  std::sort(step_times.begin(), step_times.end());
  double median = step_times[step_times.size() / 2];
  // The slowest rank sets the pace: report max over ranks of time, mean of bytes.
  comm->all_reduce_sum(&median, 1);  // (sum/W below = mean of medians)
  median /= W;
  if (me == 0) {
    std::printf("engine step: %s, %.1f M parameters, W = %d, median step %.3f s (%.1f M elements/s/rank)\n",
                o.base ? "celo2-base" : "celo2", n / 1e6, W, median, n / 1e6 / W / median);
    std::printf("  %-14s %10s %14s\n", "phase", "seconds", "MB sent/rank");
  }
  for (auto& [ph, t] : sec) {
    std::vector<double> all(W, 0.0);
    all[me] = t;
    comm->all_reduce_sum(all.data(), W);
    double b = bytes[ph];
    comm->all_reduce_sum(&b, 1);
    if (me == 0)
      std::printf("  %-14s %10.4f %14.3f\n", ph.c_str(), *std::max_element(all.begin(), all.end()),
                  b / W / 1e6);
  }
  if (me == 0) {
    const OwnerPlan& plan = eng.owner_plan();
    int split = 0;
    for (size_t i = 0; i < plan.group.size(); ++i) split += std::min(plan.group[i], W - plan.owner[i]) > 1;
    std::printf("  Newton–Schulz plan: %zu matrices, %d split over groups of ranks; modelled load max/mean %.2f "
                "(one owner each %.2f)\n", plan.group.size(), split, plan.imbalance, plan.imbalance_unsplit);
  }
  return 0;
}

}  // namespace celo2::bench
