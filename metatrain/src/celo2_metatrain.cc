// celo2-metatrain: meta-trains Celo2's theta with persistent evolution strategies on the
// 8×8 inner tasks, over MPI ranks (mpirun -np N celo2-metatrain train ...), and measures the
// inner-step throughput (bench) and the result (eval).
//
//   celo2-metatrain train --out DIR [--outer-steps N] [--time-limit S] [--resume]
//   celo2-metatrain bench [--seconds S] [--base] [--tasks N] [--unbatched] [--keep-denormals]
//   celo2-metatrain eval --theta A.state [--theta B.state ...] --json out.json
//
// A run directory holds ckpt.json (theta, outer AdamW state, step, wall time, config),
// theta.state (the current theta in the published flax layout, loadable by celo2 and by the
// original Optax load_checkpoint) and metrics.csv (one row per outer step).
#include <CLI/CLI.hpp>
#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/flax_msgpack.h"
#include "celo2/metatrain/eval.h"
#include "celo2/metatrain/pes.h"
#include "celo2/newton_schulz.h"
#include "celo2/theta_io.h"
#include "machine_rates.h"  // bench/: the FMA-throughput loop

namespace {

using namespace celo2;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct TrainArgs {
  std::string out = "metatrain_run";
  int64_t outer_steps = 1000;
  double time_limit = 0;  // seconds, 0 = none
  bool resume = false;
  bool base = false;
  std::string init = "adam_like";
  std::string family = "fashion8,digits,synthetic";
  int tasks = 8;
  double sigma = 0.01;
  int truncation = 50;
  int unroll_min = 100, unroll_max = 2000;
  double outer_lr = -1;  // <0: 5e-5 (celo2) or 1e-4 (celo2-base)
  double outer_wd = 1e-4;
  double reparam_prob = 0.25;
  uint64_t seed = 0;
  int ckpt_every = 50;
  std::string comm = "auto";
  bool progress = true;
  bool keep_denormals = false;
};

// Atomic text writes through the project's one atomic writer (temporary file, fsync, rename).
void write_atomic(const fs::path& path, const std::string& text) {
  flax::write_file_atomic(path.string(), {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

RuleConfig rule_of(bool base) { return base ? RuleConfig::celo2_base() : RuleConfig{}; }

Theta initial_theta(const std::string& init, const RuleConfig& rule, uint64_t seed) {
  if (init == "adam_like") return Theta::adam_like(rule);
  if (init == "random") return Theta::random(rule, seed, 0.1f);
  return load_theta(init, rule);
}

class ProgressBar {
 public:
  ProgressBar(int64_t total, bool enabled) : total_(total), enabled_(enabled && isatty(2)) {}
  void update(int64_t done, double loss, double steps_per_s, double eta_s) {
    if (!enabled_) return;
    const int width = 30;
    const int fill = total_ > 0 ? static_cast<int>(width * std::min<double>(1.0, double(done) / total_)) : 0;
    std::fprintf(stderr, "\r[%s%s] %lld/%lld meta-loss %.4f  %.0f inner steps/s  ETA %.0fs   ",
                 std::string(fill, '#').c_str(), std::string(width - fill, ' ').c_str(),
                 static_cast<long long>(done), static_cast<long long>(total_), loss, steps_per_s,
                 eta_s);
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_) std::fprintf(stderr, "\n");
  }

 private:
  int64_t total_;
  bool enabled_;
};

int run_train(const TrainArgs& a) {
  omp_set_num_threads(1);  // ranks are the parallelism; one core each
  set_blas_threads(1);
  auto comm = make_communicator(a.comm);
  const int rank = comm->rank(), world = comm->size();
  const RuleConfig rule = rule_of(a.base);
  const fs::path dir(a.out);
  const fs::path ckpt_path = dir / "ckpt.json";

  meta::OuterAdamW outer;
  outer.lr = a.outer_lr > 0 ? a.outer_lr : (a.base ? 1e-4 : 5e-5);
  outer.weight_decay = a.outer_wd;
  Theta theta_shape = initial_theta(a.init, rule, a.seed);
  std::vector<float> theta = theta_shape.values();
  int64_t step = 0;
  double wall_before = 0;
  if (a.resume && fs::exists(ckpt_path)) {
    std::ifstream f(ckpt_path);
    nlohmann::json j;
    try {
      f >> j;
    } catch (const std::exception& e) {
      throw std::runtime_error(ckpt_path.string() + ": not a readable checkpoint: " + e.what());
    }
    if (j.value("format", "") != "celo2-metatrain/1") {
      throw std::runtime_error(ckpt_path.string() + ": format is not celo2-metatrain/1");
    }
    if (j.at("base").get<bool>() != a.base) {
      throw std::runtime_error(ckpt_path.string() + ": checkpoint is for " +
                               (a.base ? "Celo2" : "Celo2-base") + ", this run for the other");
    }
    const auto th = j.at("theta").get<std::vector<double>>();
    if (th.size() != theta.size()) {
      throw std::runtime_error(ckpt_path.string() + ": theta has " + std::to_string(th.size()) +
                               " values, the rule needs " + std::to_string(theta.size()));
    }
    for (size_t k = 0; k < th.size(); ++k) theta[k] = static_cast<float>(th[k]);
    outer.m = j.at("adam_m").get<std::vector<double>>();
    outer.v = j.at("adam_v").get<std::vector<double>>();
    outer.t = j.at("adam_t").get<int64_t>();
    step = j.at("step").get<int64_t>();
    wall_before = j.at("wall_s").get<double>();
    if (rank == 0) std::printf("resumed %s at outer step %lld\n", ckpt_path.c_str(), (long long)step);
  }
  if (rank == 0) fs::create_directories(dir);
  comm->barrier();

  meta::TaskFamily family = meta::TaskFamily::parse(a.family);
  meta::PesConfig pc;
  pc.tasks = a.tasks;
  pc.sigma = a.sigma;
  // A resumed run starts fresh inner runs (ξ = 0) from a seed that depends on the step.
  pc.seed = a.seed * 0x100000001b3ULL + static_cast<uint64_t>(step);
  pc.inner.rule = rule;
  pc.inner.truncation = a.truncation;
  pc.inner.unroll_min = a.unroll_min;
  pc.inner.unroll_max = a.unroll_max;
  pc.inner.reparam_prob = a.reparam_prob;
  pc.flush_denormals = !a.keep_denormals;
  theta_shape.set_values(theta.data(), theta.size());
  meta::PesEstimator pes(pc, family, theta_shape, rank, world);

  std::ofstream csv;
  if (rank == 0) {
    const fs::path csv_path = dir / "metrics.csv";
    const bool fresh = !fs::exists(csv_path) || step == 0;
    if (!fresh) {  // drop rows written after the checkpoint we resume from
      std::ifstream in(csv_path);
      std::string line, kept;
      while (std::getline(in, line)) {
        const bool header = kept.empty();
        if (header || std::strtoll(line.c_str(), nullptr, 10) <= step) kept += line + "\n";
      }
      write_atomic(csv_path, kept);
    }
    csv.open(csv_path, fresh ? std::ios::trunc : std::ios::app);
    if (fresh) csv << "step,wall_s,meta_loss,grad_norm,theta_norm,resets,inner_steps_per_s\n";
    std::printf("meta-training %s: %d tasks (%s), sigma %g, truncation %d, unroll [%d, %d], "
                "outer AdamW lr %g wd %g, %d rank(s), init %s, seed %llu\n",
                a.base ? "Celo2-base" : "Celo2", a.tasks, family.names().c_str(), a.sigma,
                a.truncation, a.unroll_min, a.unroll_max, outer.lr, outer.weight_decay, world,
                a.init.c_str(), static_cast<unsigned long long>(a.seed));
  }
  auto save = [&](double wall) {
    if (rank != 0) return;
    nlohmann::json j;
    j["format"] = "celo2-metatrain/1";
    j["base"] = a.base;
    j["step"] = step;
    j["wall_s"] = wall;
    j["theta"] = std::vector<double>(theta.begin(), theta.end());
    j["adam_m"] = outer.m;
    j["adam_v"] = outer.v;
    j["adam_t"] = outer.t;
    j["config"] = {{"tasks", a.tasks},       {"sigma", a.sigma},      {"truncation", a.truncation},
                   {"unroll_min", a.unroll_min}, {"unroll_max", a.unroll_max},
                   {"outer_lr", outer.lr},   {"outer_wd", outer.weight_decay},
                   {"family", a.family},     {"init", a.init},        {"seed", a.seed},
                   {"reparam_prob", a.reparam_prob}, {"ranks", world},
                   {"flush_denormals", !a.keep_denormals}};
    write_atomic(ckpt_path, j.dump());
    Theta t = theta_shape;
    t.set_values(theta.data(), theta.size());
    save_theta((dir / "theta.state").string(), t);
  };

  const auto t0 = Clock::now();
  ProgressBar bar(a.outer_steps, a.progress && rank == 0);
  std::vector<double> grad(theta.size());
  // [loss_sum, pairs, resets, inner_steps, stop] summed over ranks.
  std::vector<double> stats(5);
  double window_steps = 0, window_t = 0;
  auto wt0 = Clock::now();
  const int64_t start_step = step;
  while (step < a.outer_steps) {
    std::fill(grad.begin(), grad.end(), 0.0);
    const meta::PesStats st = pes.estimate(theta, grad);
    stats = {st.loss_sum, st.pairs, st.resets, st.inner_steps,
             (a.time_limit > 0 && seconds_since(t0) > a.time_limit) ? 1.0 : 0.0};
    comm->all_reduce_sum(grad.data(), static_cast<int64_t>(grad.size()));
    comm->all_reduce_sum(stats.data(), static_cast<int64_t>(stats.size()));
    outer.step(theta, grad);
    ++step;
    double gn = 0, tn = 0;
    for (size_t k = 0; k < grad.size(); ++k) gn += grad[k] * grad[k], tn += double(theta[k]) * theta[k];
    window_steps += stats[3];
    window_t = seconds_since(wt0);
    const double sps = window_t > 0 ? window_steps / window_t : 0;
    const double wall = wall_before + seconds_since(t0);
    const double loss = stats[0] / std::max(1.0, stats[1]);
    if (rank == 0) {
      csv << step << ',' << wall << ',' << loss << ',' << std::sqrt(gn) << ',' << std::sqrt(tn)
          << ',' << stats[2] << ',' << sps << '\n';
      const double per_step = seconds_since(t0) / static_cast<double>(step - start_step);
      double eta = per_step * static_cast<double>(a.outer_steps - step);
      if (a.time_limit > 0) eta = std::min(eta, a.time_limit - seconds_since(t0));
      bar.update(step, loss, sps, eta);
    }
    if (window_t > 30) window_steps = 0, wt0 = Clock::now();
    const bool stop = stats[4] > 0;
    if (step % a.ckpt_every == 0 || step == a.outer_steps || stop) {
      if (rank == 0) csv.flush();
      save(wall);
    }
    if (stop) {
      if (rank == 0) {
        bar.finish();
        std::printf("time limit reached at outer step %lld; resume with --resume\n",
                    static_cast<long long>(step));
      }
      break;
    }
  }
  if (rank == 0) {
    bar.finish();
    std::printf("done: outer step %lld, wall %.1f s (this sitting %.1f s); theta in %s\n",
                static_cast<long long>(step), wall_before + seconds_since(t0), seconds_since(t0),
                (dir / "theta.state").c_str());
  }
  return 0;
}

// ---- bench: the machine's FMA rate and the inner step's FLOP ----

// GFLOP/s (an FMA = 2 FLOP), the best of 5 repetitions of ~0.1 s.
template <int Bytes>
double fma_gflops() {
  const int64_t iters = 4'000'000;
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    const float r = bench::fma_chains<Bytes>(iters, 1.0f + 0.1f * rep);
    const double dt = seconds_since(t0);
    if (!std::isfinite(r)) throw std::runtime_error("FMA loop: non-finite result");
    best = std::max(best, bench::fma_chains_flop<Bytes>(iters) / dt / 1e9);
  }
  return best;
}

constexpr int kWidestVector = bench::kNativeVecBytes;

// FLOP of one inner step of one particle, counted from the code that runs:
//  - the MLP's products: forward batch·in·out·2 per layer; backward dW (2·batch·in·out) per
//    layer and dX (the same) for every layer but the first;
//  - the rule, per element, by docs/PERF.md's count of kernels/src/rule_cpu.cc (bench/
//    celo2_bench.cc's roofline table): 806 FLOP for a factored tensor, 537 for a 1-D one;
//    AdamW 14;
//  - Newton–Schulz: newton_schulz_flops (every product 2mnk);
//  - the apply p -= lr·(u + wd·p): 3 per celo2 element.
struct StepFlop {
  double mlp = 0, rule = 0, ns = 0, other = 0;
  double total() const { return mlp + rule + ns + other; }
};
StepFlop inner_step_flop(const meta::InnerConfig& ic) {
  StepFlop f;
  const data::MlpTask model(ic.layers, 0);
  for (size_t l = 0; l + 1 < ic.layers.size(); ++l) {
    const double io = 2.0 * ic.batch * ic.layers[l] * ic.layers[l + 1];
    f.mlp += io * (l == 0 ? 2 : 3);
  }
  const OptimizerOptions o = meta::inner_options(ic, Theta::adam_like(ic.rule));
  std::vector<TensorDesc> desc;
  for (int i = 0; i < model.num_tensors(); ++i) desc.push_back({model.name(i), model.shape(i)});
  const std::vector<Label> labels = o.rules.assign(desc);
  for (int i = 0; i < model.num_tensors(); ++i) {
    const double n = static_cast<double>(model.numel(i));
    const auto& sh = model.shape(i);
    if (labels[i] == Label::kAdamW) {
      f.other += 14 * n;
    } else if (labels[i] == Label::kCelo2) {
      f.rule += (sh.size() >= 2 ? 806 : 537) * n;
      f.other += 3 * n;
      if (ic.rule.orthogonalize && sh.size() >= 2) f.ns += newton_schulz_flops(ic.rule, sh[0], sh[1]);
    }
  }
  return f;
}

int run_bench(double seconds, bool base, int tasks, bool unbatched, bool keep_denormals) {
  omp_set_num_threads(1);
  set_blas_threads(1);
  const RuleConfig rule = rule_of(base);
  meta::TaskFamily family = meta::TaskFamily::parse("fashion8");
  const Theta theta = Theta::adam_like(rule);
  const std::vector<float> flat = theta.values();

  // 0. The machine: one core's FMA rate at the widest vectors this build uses (and 256-bit).
  const double fma_w = fma_gflops<kWidestVector>();
  const double fma_256 = fma_gflops<32>();

  // 1. The whole estimator on one core: `tasks` pairs, truncations of 50.
  meta::PesConfig pc;
  pc.tasks = tasks;
  pc.batched = !unbatched;
  pc.flush_denormals = !keep_denormals;
  pc.inner.rule = rule;
  pc.inner.reparam_prob = 0;
  meta::PesEstimator pes(pc, family, theta, 0, 1);
  std::vector<double> grad(flat.size());
  double steps = 0;
  auto t0 = Clock::now();
  while (seconds_since(t0) < seconds) steps += pes.estimate(flat, grad).inner_steps;
  const double total_rate = steps / seconds_since(t0);
  const StepFlop fl = inner_step_flop(pc.inner);
  const double gflops = total_rate * fl.total() / 1e9;

  // 2. The parts of one inner step, each alone: the MLP's forward+backward, the optimizer
  // step of one particle (one Optimizer; and per particle in an OptimizerBatch of 2·tasks).
  const data::Dataset& ds = *family.sources[0].data;
  data::MlpTask model({64, 32, 10}, 1);
  data::BatchSampler sampler(ds.n, 64, 7);
  std::vector<float> x(64 * 64);
  std::vector<int> y(64);
  sampler.next(ds, x.data(), y.data());
  int64_t n = 0;
  t0 = Clock::now();
  while (seconds_since(t0) < seconds / 4) {
    for (int k = 0; k < 100; ++k) model.loss_and_grad(x.data(), y.data(), 64);
    n += 100;
  }
  const double mlp_s = seconds_since(t0) / static_cast<double>(n);

  Optimizer opt(meta::inner_options(pc.inner, theta));
  for (int i = 0; i < model.num_tensors(); ++i) {
    opt.add_tensor(model.name(i), model.shape(i), model.params(i), model.grads(i));
  }
  n = 0;
  t0 = Clock::now();
  while (seconds_since(t0) < seconds / 4) {
    for (int k = 0; k < 100; ++k) opt.step();
    n += 100;
  }
  const double opt_s = seconds_since(t0) / static_cast<double>(n);

  const int members = 2 * tasks;
  auto batch = meta::make_inner_batch(pc.inner, theta);
  std::vector<data::MlpTask> copies(members, model);
  for (data::MlpTask& c : copies) {
    std::vector<float*> ps;
    std::vector<const float*> gs;
    for (int i = 0; i < c.num_tensors(); ++i) ps.push_back(c.params(i)), gs.push_back(c.grads(i));
    batch->add_member(ps, gs);
  }
  n = 0;
  t0 = Clock::now();
  while (seconds_since(t0) < seconds / 4) {
    for (int k = 0; k < 10; ++k) batch->step();
    n += 10 * members;
  }
  const double batch_s = seconds_since(t0) / static_cast<double>(n);

  const char* path = unbatched ? "unbatched (one Optimizer per particle)" : "batched (one OptimizerBatch)";
  nlohmann::json j = {{"rule", base ? "celo2-base" : "celo2"},
                      {"path", unbatched ? "unbatched" : "batched"},
                      {"flush_denormals", !keep_denormals},
                      {"openblas_core", blas_core()},
                      {"openblas_coretype_env", blas_coretype_env()},
                      {"tasks", tasks},
                      {"inner_steps_per_s_per_core", total_rate},
                      {"flop_per_inner_step", fl.total()},
                      {"flop_mlp", fl.mlp},
                      {"flop_rule", fl.rule},
                      {"flop_newton_schulz", fl.ns},
                      {"flop_other", fl.other},
                      {"gflops", gflops},
                      {"fma_gflops", fma_w},
                      {"fma_vector_bits", kWidestVector * 8},
                      {"fma_gflops_256bit", fma_256},
                      {"efficiency", gflops / fma_w},
                      {"mlp_fwd_bwd_us", mlp_s * 1e6},
                      {"optimizer_step_us", opt_s * 1e6},
                      {"batched_step_us_per_particle", batch_s * 1e6},
                      {"parts_steps_per_s", 1.0 / (mlp_s + opt_s)}};
  std::printf("inner task MLP 64-32-10, batch 64, %s, one core, %d pair(s) (%d particles), %s:\n",
              base ? "Celo2-base" : "Celo2", tasks, members, path);
  std::printf("  machine FMA rate      %8.1f GFLOP/s (%d-bit vectors; %.1f at 256-bit)\n", fma_w,
              kWidestVector * 8, fma_256);
  std::printf("  BLAS                  OpenBLAS '%s' kernels\n", blas_core().c_str());
  if (const std::string note = blas_core_note(); !note.empty()) std::printf("  note: %s\n", note.c_str());
  std::printf("  PES estimator         %8.0f inner steps/s (particle updates, data included; subnormals %s)\n",
              total_rate, keep_denormals ? "kept" : "flushed to zero");
  std::printf("  FLOP per inner step   %8.3f M (MLP %.3f, rule %.3f, Newton-Schulz %.3f, other %.3f)\n",
              fl.total() / 1e6, fl.mlp / 1e6, fl.rule / 1e6, fl.ns / 1e6, fl.other / 1e6);
  std::printf("  arithmetic rate       %8.2f GFLOP/s = %.1f %% of the FMA rate\n", gflops,
              100.0 * gflops / fma_w);
  std::printf("  MLP forward+backward  %8.1f us/step\n", mlp_s * 1e6);
  std::printf("  optimizer step        %8.1f us/step alone (one Optimizer), %.1f us/particle in a batch of %d\n",
              opt_s * 1e6, batch_s * 1e6, members);
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

// Writes kernels/src/project_theta.cc (Celo2) or, with --base, kernels/src/project_theta_base.cc
// (Celo2-base): the weights as C++ literals, so the library carries its default thetas without
// a file (hex floats: exact). Theta::project_default (kernels/src/config.cc) picks the table by
// the rule configuration (kernels/src/project_theta.h).
int run_export_cpp(const std::string& theta_path, const std::string& out_path,
                   const std::string& provenance, bool base) {
  const RuleConfig rule = rule_of(base);
  const Theta theta = load_theta(theta_path, rule);
  const std::vector<float> flat = theta.values();
  const char* variant = base ? "Celo2-base" : "Celo2";
  const char* fn = base ? "project_theta_celo2_base" : "project_theta_celo2";
  std::ostringstream o;
  o << "// The project's default " << variant << " weights, meta-trained with celo2-metatrain (docs/METATRAIN.md).\n"
    << "// Generated by `celo2-metatrain export-cpp" << (base ? " --base" : "") << "`; do not edit by hand.\n";
  std::istringstream prov(provenance);
  for (std::string line; std::getline(prov, line);) o << "// " << line << "\n";
  o << "#include \"project_theta.h\"\n\nnamespace celo2 {\nnamespace {\n\n"
    << "// " << (base ? "RuleConfig::celo2_base()" : "RuleConfig{}")
    << "'s Theta::values(): layer by layer, weights (row-major, in x out), then biases.\n"
    << "constexpr float kTheta[" << flat.size() << "] = {\n";
  char buf[48];
  for (size_t k = 0; k < flat.size(); ++k) {
    std::snprintf(buf, sizeof buf, "%a", static_cast<double>(flat[k]));
    o << (k % 6 == 0 ? "    " : " ") << buf << "f," << (k % 6 == 5 || k + 1 == flat.size() ? "\n" : "");
  }
  o << "};\n\n}  // namespace\n\n"
    << "const std::vector<float>& detail::" << fn << "() {\n"
    << "  static const std::vector<float> v(kTheta, kTheta + " << flat.size() << ");\n"
    << "  return v;\n}\n\n}  // namespace celo2\n";
  write_atomic(out_path, o.str());
  std::printf("wrote %s (%zu values from %s)\n", out_path.c_str(), flat.size(), theta_path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"celo2-metatrain: PES meta-training of Celo2's weights"};
  app.require_subcommand(1);
  TrainArgs a;
  auto* train = app.add_subcommand("train", "meta-train theta (PES over MPI ranks)");
  train->add_option("--out", a.out, "run directory (checkpoint, theta.state, metrics.csv)")->capture_default_str();
  train->add_option("--outer-steps", a.outer_steps, "outer (meta) steps in all")->capture_default_str();
  train->add_option("--time-limit", a.time_limit, "stop (with a checkpoint) after this many seconds; 0: none")->capture_default_str();
  train->add_flag("--resume", a.resume, "continue from OUT/ckpt.json when present");
  train->add_flag("--base", a.base, "meta-train Celo2-base (no Newton–Schulz, every tensor celo2)");
  train->add_option("--init", a.init, "adam_like | random | a theta.state path")->capture_default_str();
  train->add_option("--family", a.family, "inner task sources: fashion8,digits,synthetic")->capture_default_str();
  train->add_option("--tasks", a.tasks, "tasks (antithetic pairs) per estimate")->capture_default_str();
  train->add_option("--sigma", a.sigma, "perturbation standard deviation")->capture_default_str();
  train->add_option("--truncation", a.truncation, "inner steps per truncation")->capture_default_str();
  train->add_option("--unroll-min", a.unroll_min)->capture_default_str();
  train->add_option("--unroll-max", a.unroll_max)->capture_default_str();
  train->add_option("--outer-lr", a.outer_lr, "outer AdamW lr (default 5e-5, 1e-4 with --base)");
  train->add_option("--outer-wd", a.outer_wd)->capture_default_str();
  train->add_option("--reparam-prob", a.reparam_prob, "probability of the reparameterization augmentation per inner run")->capture_default_str();
  train->add_option("--seed", a.seed)->capture_default_str();
  train->add_option("--ckpt-every", a.ckpt_every, "outer steps between checkpoints")->capture_default_str();
  train->add_option("--comm", a.comm, "auto | local | mpi")->capture_default_str();
  train->add_flag("!--no-progress", a.progress, "no progress bar");
  train->add_flag("--keep-denormals", a.keep_denormals,
                  "inner steps with IEEE subnormals (default: flushed to zero, FTZ/DAZ, which is faster)");

  double bench_seconds = 6;
  bool bench_base = false, bench_unbatched = false, bench_keep_denormals = false;
  int bench_tasks = 8;
  auto* bench = app.add_subcommand("bench", "inner steps per second per core");
  bench->add_option("--seconds", bench_seconds)->capture_default_str();
  bench->add_flag("--base", bench_base, "Celo2-base");
  bench->add_option("--tasks", bench_tasks, "antithetic pairs on the one core (train's default: 8 per rank at 1 rank)")
      ->capture_default_str();
  bench->add_flag("--unbatched", bench_unbatched, "one Optimizer per particle (the path before batching)");
  bench->add_flag("--keep-denormals", bench_keep_denormals, "the estimator with IEEE subnormals (as before 2026-12-01's seventh session)");

  meta::EvalArgs ev;
  auto* eval = app.add_subcommand("eval", "evaluation table: thetas vs tuned AdamW on held-out tasks");
  meta::add_eval_options(*eval, ev);

  std::string export_theta, export_out, export_note;
  bool export_base = false;
  auto* exp = app.add_subcommand("export-cpp", "write a theta as the library's default (C++ source)");
  exp->add_option("--theta", export_theta, "theta.state to embed")->required();
  exp->add_option("--out", export_out,
                  "default kernels/src/project_theta.cc (kernels/src/project_theta_base.cc with --base)");
  exp->add_option("--note", export_note, "provenance lines for the header comment");
  exp->add_flag("--base", export_base, "the Celo2-base default (a Celo2-base theta)");

  std::string wt_kind = "adam_like", wt_out;
  bool wt_base = false;
  auto* wt = app.add_subcommand("write-theta", "write a built-in theta in the published layout");
  wt->add_option("--kind", wt_kind, "adam_like | project")->capture_default_str();
  wt->add_option("--out", wt_out)->required();
  wt->add_flag("--base", wt_base, "Celo2-base's");

  CLI11_PARSE(app, argc, argv);
  try {
    if (*train) return run_train(a);
    if (*bench) return run_bench(bench_seconds, bench_base, bench_tasks, bench_unbatched, bench_keep_denormals);
    if (*eval) return meta::run_eval(ev);
    if (*exp) {
      if (export_out.empty())
        export_out = export_base ? "kernels/src/project_theta_base.cc" : "kernels/src/project_theta.cc";
      return run_export_cpp(export_theta, export_out, export_note, export_base);
    }
    if (*wt) {
      const RuleConfig rule = rule_of(wt_base);
      if (wt_kind != "adam_like" && wt_kind != "project") {
        throw std::invalid_argument("--kind must be adam_like or project");
      }
      save_theta(wt_out, wt_kind == "project" ? Theta::project_default(rule) : Theta::adam_like(rule));
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "celo2-metatrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
