// The training loop of the example trainer (celo2-train) and of the comparison test: an
// MlpTask on a Dataset, stepped by celo2::Optimizer under one of three recipes.
//
//   celo2       RuleConfig{} (Newton–Schulz on), labels LabelRules::metatrain_default()
//               ("/b$" biases -> adamw at mult_1d·lr, matrices -> celo2), mult_1d = 20:
//               the inner update of the original meta-training (p − 1e-3·step for the
//               matrices, AdamW at 0.02 for the biases at the default lr 1e-3).
//   celo2-base  RuleConfig::celo2_base() (no Newton–Schulz), every tensor celo2 (spec §4).
//   adamw       every tensor adamw with mult_1d = 1, so lr is the true AdamW learning rate.
//
// Header-only (library celo2_train compiles only the reader). Determinism: the model's initial values
// depend only on TrainOptions::seed, and so does the batch order, through a sampler seed
// derived from it; neither depends on the recipe, so runs with the same seed see the same
// start and the same batches.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "celo2/engine.h"
#include "celo2/optimizer.h"
#include "celo2/theta_io.h"
#include "celo2/train/fashion_mnist.h"
#include "celo2/train/mlp_task.h"

namespace celo2::train {

enum class OptimizerKind { kCelo2, kCelo2Base, kAdamW };

inline OptimizerKind parse_optimizer_kind(const std::string& s) {
  if (s == "celo2") return OptimizerKind::kCelo2;
  if (s == "celo2-base") return OptimizerKind::kCelo2Base;
  if (s == "adamw") return OptimizerKind::kAdamW;
  throw std::invalid_argument("unknown optimizer '" + s + "' (celo2, celo2-base, adamw)");
}

inline const char* optimizer_kind_name(OptimizerKind k) {
  switch (k) {
    case OptimizerKind::kCelo2:
      return "celo2";
    case OptimizerKind::kCelo2Base:
      return "celo2-base";
    case OptimizerKind::kAdamW:
      return "adamw";
  }
  return "?";
}

// The default base learning rate of each recipe: 1e-3 is the lr the Celo2 matrices were
// meta-trained with (their step is RMS-normalized, then orthogonalized); 3e-3 is a common
// AdamW choice for a small MLP.
inline double default_lr(OptimizerKind k) { return k == OptimizerKind::kAdamW ? 3e-3 : 1e-3; }

struct Recipe {
  OptimizerKind kind = OptimizerKind::kCelo2;
  std::string theta_path;  // empty: Theta::project_default (what the optimizer runs by default)
  Schedule schedule = Schedule::constant(1e-3);
  double weight_decay = 0.0;
  std::string rules_text;  // empty: the recipe's rules
  double mult_1d = -1.0;   // < 0: the recipe's (20, or 1 for adamw)
};

inline OptimizerOptions make_optimizer_options(const Recipe& r) {
  OptimizerOptions o;
  switch (r.kind) {
    case OptimizerKind::kCelo2:
      o.rule = RuleConfig{};
      o.rules = LabelRules::metatrain_default();
      o.mult_1d = 20.0;
      break;
    case OptimizerKind::kCelo2Base:
      o.rule = RuleConfig::celo2_base();
      o.rules = LabelRules::all_celo2();
      o.mult_1d = 20.0;
      break;
    case OptimizerKind::kAdamW:
      o.rules = LabelRules::parse("* => adamw");
      o.mult_1d = 1.0;
      break;
  }
  if (!r.rules_text.empty()) o.rules = LabelRules::parse(r.rules_text);
  if (r.mult_1d >= 0.0) o.mult_1d = r.mult_1d;
  if (!r.theta_path.empty()) o.theta = load_theta(r.theta_path, o.rule);
  r.schedule.validate();
  o.schedule = r.schedule;
  o.weight_decay = r.weight_decay;
  return o;
}

struct TrainOptions {
  int steps = 1000;
  int batch = 64;
  uint64_t seed = 0;
  int log_every = 100;  // 0: no log events
};

// The sampler's seed: a fixed function of the run seed, so init and batch order are both
// set by --seed yet are different streams.
inline uint64_t sampler_seed(uint64_t seed) { return seed ^ 0x9e3779b97f4a7c15ULL; }

struct LogEvent {
  int64_t step = 0;        // updates applied so far (1-based at the first event)
  double mean_loss = 0.0;  // mean batch loss over the steps since the previous event
  double lr = 0.0;         // base lr of the latest update
  int64_t skipped = 0;     // skipped steps so far
};

struct TrainResult {
  std::vector<float> losses;  // losses[s]: batch loss before update s+1
  int64_t skipped_steps = 0;
  int64_t nonfinite_entries = 0;
  double seconds = 0.0;  // wall time of the loop (no data loading)
  std::string routing_table;

  // Mean of the last k batch losses (all of them when fewer were recorded).
  double mean_loss_last(int64_t k) const {
    if (losses.empty()) return std::nan("");
    const int64_t n = static_cast<int64_t>(losses.size());
    const int64_t from = n - std::min(k, n);
    const double sum = std::accumulate(losses.begin() + from, losses.end(), 0.0);
    return sum / static_cast<double>(n - from);
  }
};

struct TrainHooks {
  std::function<void(const std::string&)> on_ready;  // routing table, before step 1
  std::function<void(const LogEvent&)> on_log;     // every log_every steps and at the end
  std::function<void(const StepReport&)> on_skip;  // a step the optimizer skipped
  // Sharded Engine only, on every rank (so they may be collective, e.g. the control plane's
  // step-boundary broadcast): once the tensors are registered, before each step(), and after
  // each step() with this rank's batch loss.
  std::function<void(Engine&)> on_engine;
  std::function<void(Engine&)> before_step;
  std::function<void(Engine&, const StepReport&, float loss)> after_step;
};

// Trains `task` for t.steps updates on batches of `data` drawn with sampler_seed(t.seed).
// Without a communicator: the single-process Optimizer. With one: the sharded Engine,
// data-parallel — every rank draws its own batches (sampler seed + rank), the engine
// averages the gradients, and the losses reported are the mean over ranks.
inline TrainResult train_mlp(const data::Dataset& data, data::MlpTask& task,
                             OptimizerOptions options, const TrainOptions& t,
                             const TrainHooks& hooks = {},
                             std::shared_ptr<Communicator> comm = nullptr) {
  if (data.dim != task.input_dim()) {
    throw std::invalid_argument("train_mlp: data has dim " + std::to_string(data.dim) +
                                ", the model's input is " + std::to_string(task.input_dim()));
  }
  if (t.steps < 0) throw std::invalid_argument("train_mlp: steps must be >= 0");
  std::unique_ptr<Optimizer> single;
  std::unique_ptr<Engine> engine;
  if (comm) {
    EngineOptions eo;
    eo.opt = std::move(options);
    eo.grad_mode = GradMode::kLocal;
    engine = std::make_unique<Engine>(std::move(eo), comm);
  } else {
    single = std::make_unique<Optimizer>(std::move(options));
  }
  for (int i = 0; i < task.num_tensors(); ++i) {
    if (engine) engine->add_tensor(task.name(i), task.shape(i), task.params(i), task.grads(i));
    else single->add_tensor(task.name(i), task.shape(i), task.params(i), task.grads(i));
  }
  if (engine && hooks.on_engine) hooks.on_engine(*engine);
  TrainResult result;
  result.routing_table = engine ? engine->routing_table() : single->routing_table();
  if (hooks.on_ready) hooks.on_ready(result.routing_table);
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;

  data::BatchSampler sampler(data.n, t.batch, sampler_seed(t.seed) + static_cast<uint64_t>(rank));
  std::vector<float> x(static_cast<size_t>(t.batch) * data.dim);
  std::vector<int> y(static_cast<size_t>(t.batch));
  result.losses.reserve(static_cast<size_t>(t.steps));
  double window_sum = 0.0;
  int64_t window_n = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int s = 1; s <= t.steps; ++s) {
    sampler.next(data, x.data(), y.data());
    const float loss = task.loss_and_grad(x.data(), y.data(), t.batch);
    result.losses.push_back(loss);
    if (engine && hooks.before_step) hooks.before_step(*engine);
    const StepReport rep = engine ? engine->step() : single->step();
    if (engine && hooks.after_step) hooks.after_step(*engine, rep, loss);
    result.nonfinite_entries += rep.nonfinite;
    if (rep.skipped) {
      ++result.skipped_steps;
      if (hooks.on_skip) hooks.on_skip(rep);
    }
    window_sum += loss;
    ++window_n;
    if (hooks.on_log && t.log_every > 0 && (s % t.log_every == 0 || s == t.steps)) {
      if (comm && world > 1) {
        comm->all_reduce_sum(&window_sum, 1);
        window_sum /= world;
      }
      hooks.on_log({s, window_sum / static_cast<double>(window_n), rep.lr, result.skipped_steps});
      window_sum = 0.0;
      window_n = 0;
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (comm && world > 1) {  // report the mean loss over ranks
    comm->all_reduce_sum(result.losses.data(), static_cast<int64_t>(result.losses.size()));
    for (float& l : result.losses) l /= static_cast<float>(world);
  }
  return result;
}

}  // namespace celo2::train
