// The sharded engine's step time on a GPT-shaped tensor set, per phase: the `engine` mode of
// celo2-bench. Run under mpirun -np W (W = 1, 2, 4 in docs/PERF.md); rank 0 prints.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "celo2/comm_model.h"
#include "celo2/engine.h"
#include "celo2/split_ns.h"

namespace celo2::bench {

struct EngineBenchOptions {
  int layers = 8;
  int64_t d = 512, ffn = 2048, vocab = 50257, context = 1024;  // ~51M parameters
  int warmup = 1, steps = 3;
  bool base = false;
  // --engine-overlap: a backward pass of this many ms per step (0: none), emulated as a
  // device would run it (the host sleeps, tensor by tensor, last first, in proportion to
  // their sizes), then the step; overlap_grad_reduce off and on, one after the other.
  double backward_ms = 0;
  int64_t bucket_elements = int64_t{1} << 22;
};

// Collective: the largest of every rank's x.
inline double max_over_ranks(Communicator& comm, double x) {
  std::vector<double> all(comm.size(), 0.0);
  all[comm.rank()] = x;
  comm.all_reduce_sum(all.data(), comm.size());
  return *std::max_element(all.begin(), all.end());
}

// The bench's GPT-shaped tensors with this rank's gradients (N(0, 1e-3²), seeded by rank) and
// parameters of 0.02.
struct BenchTensors {
  std::vector<ModelTensor> spec;
  std::vector<std::vector<float>> p, g;
  int64_t n = 0;  // elements
  BenchTensors(const EngineBenchOptions& o, int rank)
      : spec(gpt_tensors(o.layers, o.d, o.ffn, o.vocab, o.context)), p(spec.size()), g(spec.size()) {
    std::mt19937 rng(rank);
    std::normal_distribution<float> nd;
    for (size_t i = 0; i < spec.size(); ++i) {
      int64_t k = 1;
      for (auto s : spec[i].shape) k *= s;
      n += k;
      p[i].assign(k, 0.02f);
      g[i].resize(k);
      for (auto& x : g[i]) x = nd(rng) * 1e-3f;
    }
  }
};

inline int run_engine_bench(const EngineBenchOptions& o) {
  auto comm = std::shared_ptr<Communicator>(make_communicator("auto"));
  const int W = comm->size(), me = comm->rank();
  BenchTensors bt(o, me);
  const auto& spec = bt.spec;
  const int64_t n = bt.n;
  EngineOptions eo;
  eo.opt.rule = o.base ? RuleConfig::celo2_base() : RuleConfig{};
  eo.opt.theta = Theta::random(eo.opt.rule, 1);
  eo.opt.rules = LabelRules::seed_default();
  Engine eng(eo, comm);
  for (size_t i = 0; i < spec.size(); ++i) eng.add_tensor(spec[i].name, spec[i].shape, bt.p[i].data(), bt.g[i].data());
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
    const double slowest = max_over_ranks(*comm, t);
    double b = bytes[ph];
    comm->all_reduce_sum(&b, 1);
    if (me == 0) std::printf("  %-14s %10.4f %14.3f\n", ph.c_str(), slowest, b / W / 1e6);
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

// One matrix's Newton–Schulz split over every rank (celo2/split_ns.h), per way of applying
// the polynomial: formed by every member (B), two products with A (no B), split by rows and
// all-gathered. Per shape and way: the slowest rank's median seconds over `reps` calls, the
// busiest member's FLOPs as the planner charges them (split_ns_flops) and their rate. The
// `split-ns` mode of celo2-bench; run under mpirun -np W.
inline int run_split_ns_bench(const std::vector<std::pair<int64_t, int64_t>>& shapes, int reps) {
  auto comm = std::shared_ptr<Communicator>(make_communicator("auto"));
  const int W = comm->size(), me = comm->rank();
  const RuleConfig cfg;
  if (me == 0)
    std::printf("split Newton-Schulz over W = %d ranks, %d iterations, median of %d calls (slowest rank)\n", W,
                cfg.ns_iters, reps);
  for (auto [r, c] : shapes) {
    if (r > c) std::swap(r, c);  // the wide orientation, as the engine gives it
    const int64_t c0 = c * me / W, c1 = c * (me + 1) / W, cl = c1 - c0, cmax = (c + W - 1) / W;
    std::mt19937 rng(7 + me);
    std::normal_distribution<float> nd;
    std::vector<float> x0(static_cast<size_t>(r * cl)), x, scratch;
    for (float& v : x0) v = nd(rng);
    const char* names[] = {"B = bA + cA^2 on every member", "two products with A", "B split by rows + all-gather"};
    for (int mode : {0, 1, 2}) {
      const bool poly = mode == 2;
      const int product = mode == 1 ? 1 : 0;
      std::vector<double> t;
      for (int k = 0; k <= reps; ++k) {  // k = 0: warm-up
        x = x0;
        comm->barrier();
        const auto t0 = std::chrono::steady_clock::now();
        newton_schulz_split(cfg, r, cl, x.data(), *comm, scratch, false, poly, product);
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (k > 0) t.push_back(dt);
      }
      std::sort(t.begin(), t.end());
      const double sec = max_over_ranks(*comm, t[t.size() / 2]);
      const double flops = split_ns_flops(cfg, static_cast<double>(r), static_cast<double>(cmax), W, poly, product);
      if (me == 0)
        std::printf("  %5lldx%-5lld %-32s %8.3f s  %8.2f GFLOP (busiest member)  %7.1f GFLOP/s\n",
                    static_cast<long long>(r), static_cast<long long>(c), names[mode], sec, flops / 1e9,
                    flops / 1e9 / sec);
    }
  }
  return 0;
}

// Overlap of the gradient reduce-scatter with backward (EngineOptions::overlap_grad_reduce):
// per step, the emulated backward (grad_ready(i) as each tensor's gradient is final, when the
// option is on) then step(); medians over steps of backward + step, of the step alone (what
// the trainer waits for after backward), and of the engine's "grads" phase (its exposed
// reduce) and "grads_background" (the worker's time, hidden behind backward).
inline int run_overlap_bench(const EngineBenchOptions& o) {
  auto comm = std::shared_ptr<Communicator>(make_communicator("auto"));
  const int W = comm->size(), me = comm->rank();
  BenchTensors bt(o, me);
  const auto& spec = bt.spec;
  auto& p = bt.p;
  const auto& g = bt.g;
  const int64_t n = bt.n;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  auto max_over_ranks = [&](double x) { return bench::max_over_ranks(*comm, x); };
  if (me == 0)
    std::printf("overlap: %s, %.1f M parameters, W = %d, buckets of %lld floats, backward emulated as %.0f ms of "
                "host sleep per step (a device computing)\n  %-9s %12s %12s %12s %16s %10s\n",
                o.base ? "celo2-base" : "celo2", n / 1e6, W, static_cast<long long>(o.bucket_elements),
                o.backward_ms, "overlap", "bwd+step s", "step s", "grads s", "background s", "overlapped");
  std::vector<float> start;
  for (const bool on : {false, true}) {
    for (size_t i = 0; i < spec.size(); ++i) p[i].assign(g[i].size(), 0.02f);
    EngineOptions eo;
    eo.opt.rule = o.base ? RuleConfig::celo2_base() : RuleConfig{};
    eo.opt.theta = Theta::random(eo.opt.rule, 1);
    eo.opt.rules = LabelRules::seed_default();
    eo.bucket_elements = o.bucket_elements;
    eo.overlap_grad_reduce = on;
    Engine eng(eo, comm);
    for (size_t i = 0; i < spec.size(); ++i) eng.add_tensor(spec[i].name, spec[i].shape, p[i].data(), g[i].data());
    std::vector<double> total, step, grads, background;
    for (int s = 0; s < o.warmup + o.steps; ++s) {
      comm->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      for (size_t i = spec.size(); i-- > 0;) {
        std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(
            o.backward_ms * static_cast<double>(g[i].size()) / static_cast<double>(n)));
        eng.grad_ready(i);  // does nothing with the option off
      }
      const auto t1 = std::chrono::steady_clock::now();
      eng.step();
      const auto t2 = std::chrono::steady_clock::now();
      if (s < o.warmup) continue;
      total.push_back(std::chrono::duration<double>(t2 - t0).count());
      step.push_back(std::chrono::duration<double>(t2 - t1).count());
      const auto& sec = eng.last_phase_stats().seconds;
      grads.push_back(sec.count("grads") ? sec.at("grads") : 0.0);
      background.push_back(sec.count("grads_background") ? sec.at("grads_background") : 0.0);
    }
    const double a = max_over_ranks(median(total)), b = max_over_ranks(median(step)),
                 c = max_over_ranks(median(grads)), d = max_over_ranks(median(background));
    if (me == 0)
      std::printf("  %-9s %12.4f %12.4f %12.4f %16.4f %10s\n", on ? "on" : "off", a, b, c, d,
                  eng.overlapping() ? "yes" : "no");
    // Both runs must end with the same parameters (overlap changes when, not what).
    std::vector<float> flat;
    for (const auto& v : p) flat.insert(flat.end(), v.begin(), v.end());
    if (!on) start = std::move(flat);
    else if (flat != start) {
      std::fprintf(stderr, "overlap bench: parameters differ with overlap on (rank %d)\n", me);
      return 1;
    }
  }
  return 0;
}

}  // namespace celo2::bench
