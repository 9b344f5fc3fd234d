#include "celo2/metatrain/eval.h"

#include <omp.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "celo2/metatrain/tasks.h"
#include "celo2/theta_io.h"
#include "celo2/train/train_loop.h"

namespace celo2::meta {

namespace {

struct EvalTask {
  std::string name;
  std::vector<int> layers;
  int steps;
  data::Dataset train, test;
};

EvalTask make_task(const std::string& name) {
  EvalTask t;
  t.name = name;
  if (name == "fashion8") {
    t.layers = {64, 32, 10};
    t.steps = 2000;
    t.train = data::load_fashion_mnist(data::Split::kTrain, 8);
    t.test = data::load_fashion_mnist(data::Split::kTest, 8);
  } else if (name == "fashion28") {
    t.layers = {784, 128, 10};
    t.steps = 1500;
    t.train = data::load_fashion_mnist(data::Split::kTrain, 28);
    t.test = data::load_fashion_mnist(data::Split::kTest, 28);
  } else if (name == "digits-deep") {
    t.layers = {64, 128, 128, 10};
    t.steps = 1000;
    t.train = load_digits(data::Split::kTrain);
    t.test = load_digits(data::Split::kTest);
  } else if (name == "cancer") {
    t.layers = {30, 64, 64, 2};
    t.steps = 200;
    t.train = load_breast_cancer(data::Split::kTrain);
    t.test = load_breast_cancer(data::Split::kTest);
  } else {
    throw std::invalid_argument("unknown eval task '" + name +
                                "' (fashion8, fashion28, digits-deep, cancer)");
  }
  return t;
}

struct Contender {
  std::string label;
  train::OptimizerKind kind;
  Theta theta;  // celo2 only
  double lr;
};

struct Score {
  double loss = 0, acc = 0;
  int64_t skipped = 0;
};

Score evaluate(const EvalTask& t, const Contender& c, int steps, int seeds) {
  Score s;
  for (int seed = 0; seed < seeds; ++seed) {
    train::Recipe r;
    r.kind = c.kind;
    r.schedule = Schedule::constant(c.lr);
    OptimizerOptions o = train::make_optimizer_options(r);
    if (c.kind != train::OptimizerKind::kAdamW) o.theta = c.theta;
    data::MlpTask model(t.layers, static_cast<uint64_t>(seed));
    train::TrainOptions to;
    to.steps = steps;
    to.seed = static_cast<uint64_t>(seed);
    to.log_every = 0;
    const train::TrainResult res = train::train_mlp(t.train, model, o, to);
    s.loss += res.mean_loss_last(100) / seeds;
    s.acc += model.accuracy(t.test.x.data(), t.test.y.data(), t.test.n) / seeds;
    s.skipped += res.skipped_steps;
  }
  return s;
}

}  // namespace

void add_eval_options(CLI::App& app, EvalArgs& a) {
  app.add_option("--theta", a.thetas, "label=path of a theta to evaluate (repeatable)");
  app.add_option("--theta-if-present", a.optional_thetas,
                 "label=path of a theta evaluated only when the file exists (e.g. downloaded published "
                 "weights); reported absent otherwise");
  app.add_flag("--base", a.base, "Celo2-base thetas and recipe");
  app.add_option("--tasks", a.tasks, "fashion8, fashion28, digits-deep, cancer")->capture_default_str();
  app.add_option("--adamw-lrs", a.adamw_lrs, "AdamW learning-rate grid")->capture_default_str();
  app.add_option("--steps", a.steps, "steps per task (in --tasks order)");
  app.add_option("--seeds", a.seeds, "seeds per (task, optimizer)")->capture_default_str();
  app.add_flag("!--no-adam-like", a.adam_like, "leave out the constructed Adam-like theta");
  app.add_flag("!--no-adamw", a.adamw, "leave out the AdamW grid");
  app.add_option("--json", a.json_path, "write every number here");
}

int run_eval(const EvalArgs& a) {
  const RuleConfig rule = a.base ? RuleConfig::celo2_base() : RuleConfig{};
  const train::OptimizerKind kind = a.base ? train::OptimizerKind::kCelo2Base : train::OptimizerKind::kCelo2;
  std::vector<Contender> contenders;
  nlohmann::json out = nlohmann::json::object();
  auto split = [](const std::string& spec) {
    const auto eq = spec.find('=');
    return std::pair<std::string, std::string>{eq == std::string::npos ? spec : spec.substr(0, eq),
                                               eq == std::string::npos ? spec : spec.substr(eq + 1)};
  };
  for (const std::string& spec : a.thetas) {
    const auto [label, path] = split(spec);
    contenders.push_back({label, kind, load_theta(path, rule), 1e-3});
  }
  for (const std::string& spec : a.optional_thetas) {
    const auto [label, path] = split(spec);
    if (!std::filesystem::exists(path)) {
      std::printf("theta '%s': %s is absent (download it to evaluate it); left out\n", label.c_str(),
                  path.c_str());
      out["absent"][label] = path;
      continue;
    }
    contenders.push_back({label, kind, load_theta(path, rule), 1e-3});
  }
  if (a.adam_like) contenders.push_back({"adam_like", kind, Theta::adam_like(rule), 1e-3});
  out["rule"] = a.base ? "celo2-base" : "celo2";
  std::printf("| task | optimizer | final train loss (last 100) | test accuracy |\n");
  std::printf("|---|---|---|---|\n");
  for (size_t ti = 0; ti < a.tasks.size(); ++ti) {
    EvalTask t = make_task(a.tasks[ti]);
    const int steps = ti < a.steps.size() ? a.steps[ti] : t.steps;
    nlohmann::json jt = {{"layers", t.layers}, {"steps", steps}, {"seeds", a.seeds}};
    for (const Contender& c : contenders) {
      const Score s = evaluate(t, c, steps, a.seeds);
      jt["optimizers"][c.label] = {{"loss", s.loss}, {"acc", s.acc}, {"skipped", s.skipped}};
      std::printf("| %s | %s | %.4f | %.4f |\n", t.name.c_str(), c.label.c_str(), s.loss, s.acc);
      std::fflush(stdout);
    }
    if (!a.adamw || a.adamw_lrs.empty()) {
      out[t.name] = jt;
      continue;
    }
    Score best;
    double best_lr = 0;
    bool first = true;
    for (double lr : a.adamw_lrs) {
      const Contender c{"adamw", train::OptimizerKind::kAdamW, {}, lr};
      const Score s = evaluate(t, c, steps, a.seeds);
      char key[32];
      std::snprintf(key, sizeof key, "adamw_lr_%g", lr);
      jt["adamw_grid"][key] = {{"loss", s.loss}, {"acc", s.acc}};
      if (first || (std::isfinite(s.loss) && s.loss < best.loss)) best = s, best_lr = lr, first = false;
    }
    jt["optimizers"]["adamw_best"] = {{"loss", best.loss}, {"acc", best.acc}, {"lr", best_lr}};
    std::printf("| %s | AdamW (best lr %g of grid) | %.4f | %.4f |\n", t.name.c_str(), best_lr,
                best.loss, best.acc);
    std::fflush(stdout);
    out[t.name] = jt;
  }
  if (!a.json_path.empty()) {
    std::ofstream f(a.json_path);
    if (!f) throw std::runtime_error("cannot write " + a.json_path);
    f << out.dump(2) << "\n";
  }
  return 0;
}

}  // namespace celo2::meta
