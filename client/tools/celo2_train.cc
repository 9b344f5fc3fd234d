// celo2-train: the example trainer. Trains a small MLP on Fashion-MNIST (8x8 by default,
// the meta-training task) with Celo2, Celo2-base or AdamW through celo2::Optimizer, and
// prints the loss curve, the mean training loss of the last 100 steps and, with --eval, the
// test accuracy. The same --seed gives the same initial weights and the same batches
// whatever the optimizer, so runs compare like for like.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "celo2/control.h"
#include "celo2/train/fashion_mnist.h"
#include "celo2/train/mlp_task.h"
#include "celo2/train/train_loop.h"

namespace {

std::vector<int> parse_layers(const std::string& text) {
  std::vector<int> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    const int v = std::stoi(item, &used);
    if (used != item.size() || v <= 0) {
      throw std::invalid_argument("--layers: bad size '" + item + "'");
    }
    out.push_back(v);
  }
  if (out.size() < 2) throw std::invalid_argument("--layers: need at least in,out");
  return out;
}

int side_of_input(int dim) {
  const int side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(dim))));
  if (side * side != dim || side < 1 || side > celo2::data::kFashionMnistSide) {
    throw std::invalid_argument(
        "--layers: the input size must be side*side with side in "
        "1..28 (64 = 8x8, 784 = 28x28), got " +
        std::to_string(dim));
  }
  return side;
}

int run(int argc, char** argv) {
  CLI::App app{"celo2-train: train an MLP on Fashion-MNIST with Celo2 or AdamW"};
  std::string optimizer = "celo2";
  std::string theta_path;
  double lr = 0.0;
  std::string schedule_text;
  int steps = 1000;
  uint64_t seed = 0;
  int batch = 64;
  double wd = 0.0;
  std::string rules_text;
  double mult_1d = 0.0;
  int log_every = 100;
  std::string csv_path;
  bool eval = false;
  std::string layers_text = "64,32,10";
  std::string data_dir;

  app.add_option("--optimizer", optimizer, "celo2 | celo2-base | adamw")
      ->check(CLI::IsMember({"celo2", "celo2-base", "adamw"}))
      ->capture_default_str();
  app.add_option("--theta", theta_path,
                 "Celo2 weights (published theta.state layout); default: the project's default "
                 "for the variant (Theta::project_default: the meta-trained weights for celo2 and "
                 "celo2-base, the constructed Adam-like weights where none are meta-trained)");
  auto* lr_opt = app.add_option("--lr", lr,
                                "base learning rate (default 1e-3 for celo2/celo2-base, "
                                "3e-3 for adamw)");
  auto* sched_opt =
      app.add_option("--schedule", schedule_text,
                     "schedule text, e.g. cosine:lr=1e-3,warmup=100,total=1000,final=0.1 (default: "
                     "constant at --lr)");
  app.add_option("--steps", steps, "updates")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--seed", seed, "seed of the initial weights and the batch order")
      ->capture_default_str();
  app.add_option("--batch", batch, "batch size")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--wd", wd, "weight decay")->capture_default_str();
  auto* rules_opt = app.add_option(
      "--rules", rules_text,
      "label rules text, e.g. 're:/b$ => adamw; * => celo2' (default: per optimizer)");
  auto* mult_opt = app.add_option("--mult-1d", mult_1d,
                                  "lr multiplier of the adamw branch (default 20; 1 for "
                                  "--optimizer adamw)");
  app.add_option("--log-every", log_every, "print the mean loss every N steps (0: never)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--csv", csv_path, "write step,loss (batch loss before each update)");
  app.add_flag("--eval", eval, "report the test accuracy on t10k at the end");
  app.add_option("--layers", layers_text, "MLP sizes in,hidden...,classes (in: 64 or 784)")
      ->capture_default_str();
  std::string comm_kind = "auto";
  app.add_option("--comm", comm_kind,
                 "none (single-process Optimizer) | auto | local | mpi (sharded Engine)")
      ->capture_default_str();
  app.add_option("--data-dir", data_dir,
                 "Fashion-MNIST directory (default $CELO2_FASHION_MNIST_DIR or "
                 "/usr/share/datasets/fashion-mnist)");
  // The control plane (celo2.v1.Control, driven by celo2ctl): rank 0 serves it, every rank
  // applies its commands at the same step boundary.
  celo2::ControlOptions control_opts;
  std::string control_addr, control_log;
  int step_sleep_ms = 0;
  app.add_option("--control", control_addr,
                 "serve the control plane at host:port (rank 0; port 0: any free port, printed); "
                 "needs the sharded engine");
  app.add_option("--control-token-file", control_opts.token_file,
                 "bearer token for --control (default: $CELO2_CONTROL_TOKEN)");
  app.add_option("--weights-root", control_opts.weights_root,
                 "LoadWeights by path reads only files inside this directory");
  app.add_option("--checkpoint-dir", control_opts.checkpoint_dir,
                 "SaveCheckpoint writes into this directory");
  app.add_option("--tls-cert", control_opts.tls_cert_file, "control plane TLS certificate (PEM)");
  app.add_option("--tls-key", control_opts.tls_key_file, "control plane TLS key (PEM)");
  app.add_option("--tls-client-ca", control_opts.tls_client_ca_file,
                 "require client certificates signed by this CA (mutual TLS)");
  std::string metrics_addr;
  app.add_option("--metrics", metrics_addr,
                 "serve Prometheus text at http://host:port/metrics (rank 0; needs --control; "
                 "port 0: any free port, printed)");
  app.add_option("--control-log", control_log,
                 "also log each applied control change to this file ({rank} -> the rank)");
  app.add_option("--step-sleep-ms", step_sleep_ms,
                 "sleep before each step of the sharded engine (tests: slow a job down)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  const bool with_control = !control_addr.empty();
  control_opts.address = control_addr;
  if (!metrics_addr.empty() && !with_control)
    throw std::invalid_argument("--metrics needs --control (it serves the control plane's status)");
  if (with_control && comm_kind == "none")
    throw std::invalid_argument("--control needs the sharded engine (not --comm none)");

  using namespace celo2;
  // --comm none: the single-process Optimizer; otherwise the sharded Engine (one rank
  // unless launched by mpirun/srun).
  std::shared_ptr<Communicator> comm;
  if (comm_kind != "none") comm = make_communicator(comm_kind);
  const bool root = !comm || comm->rank() == 0;
  if (!root && !std::freopen("/dev/null", "w", stdout)) return 1;  // rank 0 speaks
  if (comm)
    std::printf("engine: %s communicator, %d rank(s), data-parallel (each rank its own batches)\n",
                comm->backend().c_str(), comm->size());
  train::Recipe recipe;
  recipe.kind = train::parse_optimizer_kind(optimizer);
  recipe.theta_path = theta_path;
  if (!theta_path.empty() && recipe.kind == train::OptimizerKind::kAdamW) {
    std::cerr << "note: --theta has no effect with --optimizer adamw\n";
  }
  if (sched_opt->count() > 0) {
    recipe.schedule = Schedule::parse(schedule_text);
    if (lr_opt->count() > 0) std::cerr << "note: --schedule sets the lr; --lr is ignored\n";
  } else {
    recipe.schedule = Schedule::constant(lr_opt->count() > 0 ? lr : train::default_lr(recipe.kind));
  }
  recipe.weight_decay = wd;
  if (rules_opt->count() > 0) recipe.rules_text = rules_text;
  if (mult_opt->count() > 0) recipe.mult_1d = mult_1d;
  const std::vector<int> layers = parse_layers(layers_text);
  const int side = side_of_input(layers.front());
  if (layers.back() != data::kFashionMnistClasses) {
    throw std::invalid_argument("--layers: the last size must be 10 (classes)");
  }

  OptimizerOptions options = train::make_optimizer_options(recipe);
  const data::Dataset train_set = data::load_fashion_mnist(data::Split::kTrain, side, data_dir);
  data::MlpTask task(layers, seed);

  std::printf("optimizer %s  theta %s  schedule %s  wd %g  mult_1d %g\n",
              train::optimizer_kind_name(recipe.kind),
              recipe.kind == train::OptimizerKind::kAdamW ? "-"
              : !theta_path.empty() ? theta_path.c_str()
              // What runs when no weights are given (prepare_options fills it in).
              : celo2::Theta::project_default(options.rule) == celo2::Theta::adam_like(options.rule)
                  ? "adam_like (constructed; the project default for this variant)"
                  : "project default (meta-trained, weights/)",
              options.schedule.to_string().c_str(), options.weight_decay, options.mult_1d);
  std::printf("data %lld examples, %dx%d; model %s (%lld parameters); batch %d; seed %llu\n",
              static_cast<long long>(train_set.n), side, side, layers_text.c_str(),
              static_cast<long long>(task.num_params()), batch,
              static_cast<unsigned long long>(seed));

  train::TrainOptions topts;
  topts.steps = steps;
  topts.batch = batch;
  topts.seed = seed;
  topts.log_every = log_every;
  train::TrainHooks hooks;
  hooks.on_ready = [](const std::string& table) {
    std::printf("routing table:\n%s\n", table.c_str());
    std::fflush(stdout);
  };
  hooks.on_log = [](const train::LogEvent& e) {
    std::printf("step %lld loss %.4f lr %.1e%s\n", static_cast<long long>(e.step), e.mean_loss,
                e.lr, e.skipped > 0 ? (" skipped " + std::to_string(e.skipped)).c_str() : "");
    std::fflush(stdout);
  };
  hooks.on_skip = [](const StepReport& r) {
    std::fprintf(stderr, "warning: step skipped (%lld non-finite gradient entries)\n",
                 static_cast<long long>(r.nonfinite));
  };
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> control_log_file(nullptr, &std::fclose);
  std::unique_ptr<ControlPlane> control;  // after the log: destroyed first
  std::unique_ptr<MetricsServer> metrics;  // after the control plane: destroyed first
  if (with_control) {
    const int rank = comm->rank();
    if (!control_log.empty()) {
      std::string path = control_log;
      for (size_t at; (at = path.find("{rank}")) != std::string::npos;)
        path.replace(at, 6, std::to_string(rank));
      control_log_file.reset(std::fopen(path.c_str(), "w"));
      if (!control_log_file) throw std::runtime_error(path + ": cannot open for writing");
    }
    // Every rank says what it applied and when: the same lines on every rank.
    control_opts.on_applied = [rank, log = control_log_file.get()](const AppliedChange& c) {
      char line[512];
      std::snprintf(line, sizeof line, "rank %d applied %s v%lld at step %lld: %.300s\n", rank,
                    c.setting.c_str(), static_cast<long long>(c.version),
                    static_cast<long long>(c.step), c.detail.c_str());
      std::fputs(line, stderr);
      if (log) {
        std::fputs(line, log);
        std::fflush(log);
      }
    };
    hooks.on_engine = [&](Engine& engine) {
      std::vector<TensorDesc> tensors;
      for (int i = 0; i < task.num_tensors(); ++i) tensors.push_back({task.name(i), task.shape(i)});
      control = std::make_unique<ControlPlane>(control_opts, engine, std::move(tensors));
      if (engine.rank() == 0) {
        std::printf("control: listening on %s\n", control->address().c_str());
        if (!metrics_addr.empty()) {
          metrics = std::make_unique<MetricsServer>(metrics_addr, [&control] {
            return control->prometheus_text();
          });
          std::printf("metrics: http://127.0.0.1:%d/metrics\n", metrics->port());
        }
        std::fflush(stdout);
      }
    };
    hooks.after_step = [&](Engine& engine, const StepReport& r, float loss) {
      double mean = loss;
      if (engine.world_size() > 1) {
        engine.comm().all_reduce_sum(&mean, 1);
        mean /= engine.world_size();
      }
      control->publish(engine, r, mean);
    };
  }
  hooks.before_step = [&](Engine& engine) {
    if (control) control->apply_pending(engine);
    if (step_sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(step_sleep_ms));
  };
  const train::TrainResult res =
      train::train_mlp(train_set, task, std::move(options), topts, hooks, comm);
  if (control) control->finish();  // queued commands fail with UNAVAILABLE; streams end
  if (!root) return 0;

  if (!csv_path.empty()) {
    std::ofstream csv(csv_path);
    if (!csv) throw std::runtime_error(csv_path + ": cannot open for writing");
    csv << "step,loss\n";
    for (size_t s = 0; s < res.losses.size(); ++s) csv << s + 1 << ',' << res.losses[s] << '\n';
    if (!csv) throw std::runtime_error(csv_path + ": write failed");
  }
  std::printf("final mean_loss_last100 %.4f\n", res.mean_loss_last(100));
  std::printf("skipped_steps %lld (non-finite gradient entries %lld)\n",
              static_cast<long long>(res.skipped_steps),
              static_cast<long long>(res.nonfinite_entries));
  std::printf("train_seconds %.2f (%.3f ms/step)\n", res.seconds,
              steps > 0 ? 1e3 * res.seconds / steps : 0.0);
  if (eval) {
    const data::Dataset test_set = data::load_fashion_mnist(data::Split::kTest, side, data_dir);
    const double acc = task.accuracy(test_set.x.data(), test_set.y.data(), test_set.n);
    std::printf("test_accuracy %.4f\n", acc);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "celo2-train: %s\n", e.what());
    return 1;
  }
}
