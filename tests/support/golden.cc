#include "golden.h"

#include <re2/re2.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <stdexcept>

#include "celo2/engine.h"
#include "celo2/flax_msgpack.h"
#include "celo2/optimizer.h"
#include "celo2/rule.h"
#include "celo2/theta_io.h"

namespace celo2 {
namespace {

double rel_error(const float* got, const float* want, int64_t n);

std::shared_ptr<Communicator>& golden_comm() {
  static std::shared_ptr<Communicator> comm;
  if (!comm) comm = make_communicator("auto");
  return comm;
}

// The raw Celo2 step of every tensor through the sharded Engine: every tensor labelled
// celo2, no weight decay, lr = 1024 (a power of two, so u = (p_before − p_after)/1024 loses
// only the rounding of p_after, ~6e-8 relative to u).
GoldenResult run_rule_sharded(const flax::Value& d, GoldenResult r) {
  EngineOptions eo;
  eo.opt.rule = config_from_value(d.at("config"));
  eo.opt.theta = theta_from_value(d.at("theta"), eo.opt.rule);
  eo.opt.rules = LabelRules::all_celo2();
  eo.grad_mode = GradMode::kReduced;
  Engine eng(eo, golden_comm());
  std::map<std::string, std::vector<float>> params, grads;
  for (const auto& [name, v] : d.at("initial_params").map) {
    params[name] = v.as_array().data;
    grads[name].assign(params[name].size(), 0.0f);
    eng.add_tensor(name, v.as_array().shape, params[name].data(), grads[name].data());
  }
  constexpr double kLr = 1024.0;
  const flax::Value& steps = d.at("steps");
  for (size_t k = 0; k < steps.map.size(); ++k) {
    const flax::Value& s = steps.at(std::to_string(k));
    std::map<std::string, std::vector<float>> before = params;
    for (auto& [name, g] : grads) g = s.at("grads").at(name).as_array().data;
    if (eng.step_with_lr(kLr).skipped) throw std::runtime_error("step skipped");
    for (auto& [name, p] : params) {
      const flax::NdArray& want = s.at("celo2_step").at(name).as_array();
      std::vector<float> u(p.size());
      for (size_t i = 0; i < p.size(); ++i)
        u[i] = static_cast<float>((static_cast<double>(before[name][i]) - p[i]) / kLr);
      const double e = rel_error(u.data(), want.data.data(), static_cast<int64_t>(u.size()));
      r.checks.push_back({name, static_cast<int>(k), e});
      if (!(e <= r.worst)) r.worst = e;
      for (size_t i = 0; i < p.size(); ++i)
        p[i] = static_cast<float>(static_cast<double>(before[name][i]) - 0.01 * want.data[i]);
    }
  }
  return r;
}

}  // namespace

namespace {

double rel_error(const float* got, const float* want, int64_t n) {
  double max_err = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(e <= max_err)) max_err = e;  // NaN propagates as the max
    sq += static_cast<double>(want[i]) * want[i];
  }
  const double rms = n ? std::sqrt(sq / static_cast<double>(n)) : 0.0;
  return max_err / std::max(rms, 1e-30);
}

void check_same_shape(const flax::NdArray& a, const flax::NdArray& b, const std::string& where) {
  if (a.shape != b.shape) throw std::runtime_error(where + ": shapes differ between grads and params");
}

GoldenResult run_rule(const flax::Value& d, GoldenEngine engine, GoldenResult r) {
  const RuleConfig cfg = config_from_value(d.at("config"));
  const Theta theta = theta_from_value(d.at("theta"), cfg);
  struct T {
    Geometry geo;
    RuleState st;
    std::vector<float> p;
  };
  std::map<std::string, T> ts;
  for (const auto& [name, v] : d.at("initial_params").map) {
    const flax::NdArray& a = v.as_array();
    T t{Geometry::of(a.shape), {}, a.data};
    t.st = RuleState::zeros(t.geo);
    ts.emplace(name, std::move(t));
  }
  Workspace ws;
  const flax::Value& steps = d.at("steps");
  for (size_t k = 0; k < steps.map.size(); ++k) {
    const flax::Value& s = steps.at(std::to_string(k));
    for (auto& [name, t] : ts) {
      const flax::NdArray& g = s.at("grads").at(name).as_array();
      const flax::NdArray& want = s.at("celo2_step").at(name).as_array();
      check_same_shape(g, want, name);
      if (g.numel() != t.geo.numel) throw std::runtime_error(name + ": grads do not match params");
      std::vector<float> u(t.geo.numel);
      if (engine == GoldenEngine::kFast)
        celo2_update(cfg, theta, t.geo, t.st, g.data.data(), t.p.data(), u.data(), ws);
      else
        celo2_reference(cfg, theta, t.geo, t.st, g.data.data(), t.p.data(), u.data());
      const double e = rel_error(u.data(), want.data.data(), t.geo.numel);
      r.checks.push_back({name, static_cast<int>(k), e});
      if (!(e <= r.worst)) r.worst = e;
      for (int64_t i = 0; i < t.geo.numel; ++i)
        t.p[i] = static_cast<float>(static_cast<double>(t.p[i]) - 0.01 * want.data[i]);
    }
  }
  return r;
}

GoldenResult run_optimizer(const flax::Value& d, GoldenEngine engine, GoldenResult r) {
  OptimizerOptions o;
  o.rule = config_from_value(d.at("config"));
  o.theta = theta_from_value(d.at("theta"), o.rule);
  o.weight_decay = d.at("weight_decay").as_number();
  o.mult_1d = d.at("mult_1d").as_number();
  o.use_reference = engine == GoldenEngine::kReference;
  std::string rules;
  for (const auto& [name, label] : d.at("labels").map)
    rules += "re:^" + RE2::QuoteMeta(name) + "$ => " + label.as_string() + "\n";
  o.rules = LabelRules::parse(rules);
  std::unique_ptr<Optimizer> single;
  std::unique_ptr<Engine> sharded;
  if (engine == GoldenEngine::kSharded) {
    EngineOptions eo;
    eo.opt = o;
    eo.grad_mode = GradMode::kReduced;
    sharded = std::make_unique<Engine>(eo, golden_comm());
  } else {
    single = std::make_unique<Optimizer>(o);
  }
  std::map<std::string, std::vector<float>> params, grads;
  for (const auto& [name, v] : d.at("initial_params").map) {
    params[name] = v.as_array().data;
    grads[name].assign(params[name].size(), 0.0f);
  }
  auto add = [&](const std::string& name, const std::vector<int64_t>& shape, float* p, const float* g) {
    if (sharded) sharded->add_tensor(name, shape, p, g);
    else single->add_tensor(name, shape, p, g);
  };
  // Registration order: the file's (sorted) order; labels come from the file, not the order.
  for (const auto& [name, v] : d.at("initial_params").map)
    add(name, v.as_array().shape, params[name].data(), grads[name].data());
  const flax::Value& steps = d.at("steps");
  for (size_t k = 0; k < steps.map.size(); ++k) {
    const flax::Value& s = steps.at(std::to_string(k));
    std::map<std::string, std::vector<float>> before = params;
    for (auto& [name, g] : grads) {
      const flax::NdArray& a = s.at("grads").at(name).as_array();
      if (a.data.size() != g.size()) throw std::runtime_error(name + ": grads do not match params");
      g = a.data;
    }
    const double lr = s.at("lr").as_number();
    const StepReport rep = sharded ? sharded->step_with_lr(lr) : single->step_with_lr(lr);
    if (rep.skipped) throw std::runtime_error("step " + std::to_string(k) + " was skipped");
    for (auto& [name, p] : params) {
      const flax::NdArray& want = s.at("params_after").at(name).as_array();
      const int64_t n = static_cast<int64_t>(p.size());
      std::vector<float> got_d(n), want_d(n);
      for (int64_t i = 0; i < n; ++i) {
        got_d[i] = p[i] - before[name][i];
        want_d[i] = want.data[i] - before[name][i];
      }
      const double e = rel_error(got_d.data(), want_d.data(), n);
      r.checks.push_back({name, static_cast<int>(k), e});
      if (!(e <= r.worst)) r.worst = e;
      p = want.data;  // continue from the expected trajectory
    }
  }
  return r;
}

}  // namespace

GoldenResult run_golden_file(const std::string& path, GoldenEngine engine) {
  const flax::Value d = flax::decode(flax::read_file(path));
  GoldenResult r;
  r.path = path;
  r.format = d.at("format").as_string();
  if (r.format == "celo2-golden-rule/1")
    return engine == GoldenEngine::kSharded ? run_rule_sharded(d, std::move(r))
                                            : run_rule(d, engine, std::move(r));
  if (r.format == "celo2-golden-optimizer/1") return run_optimizer(d, engine, std::move(r));
  throw std::runtime_error(path + ": unknown golden format '" + r.format + "'");
}

int run_golden_cli(const std::vector<std::string>& files, double tol, bool verbose,
                   GoldenEngine engine) {
  int failed = 0;
  // Under mpirun every rank checks its own result; rank 0 prints.
  const bool quiet = engine == GoldenEngine::kSharded && golden_comm()->rank() != 0;
  if (quiet && !std::freopen("/dev/null", "w", stdout)) return 1;
  if (engine == GoldenEngine::kSharded)
    std::printf("sharded engine: %s communicator, %d rank(s)\n", golden_comm()->backend().c_str(),
                golden_comm()->size());
  for (const std::string& f : files) {
    try {
      const GoldenResult r = run_golden_file(f, engine);
      const bool ok = r.worst <= tol;
      if (verbose)
        for (const auto& c : r.checks)
          std::printf("  step %d %-16s max|err|/RMS %.3e%s\n", c.step, c.tensor.c_str(),
                      c.rel_err, c.rel_err <= tol ? "" : "  FAIL");
      std::printf("%s %s (%s): %zu checks, worst max|err|/RMS %.3e (tol %.1e)\n",
                  ok ? "PASS" : "FAIL", f.c_str(), r.format.c_str(), r.checks.size(), r.worst,
                  tol);
      if (!ok) ++failed;
    } catch (const std::exception& e) {
      std::printf("ERROR %s: %s\n", f.c_str(), e.what());
      ++failed;
    }
  }
  std::printf("%zu passed, %d failed\n", files.size() - failed, failed);
  return failed ? 1 : 0;
}

}  // namespace celo2
