#include "celo2/client.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <tuple>

#include "celo2/flax_msgpack.h"
#include "celo2/launch.h"
#include "celo2/theta_io.h"

#ifdef CELO2_HAVE_CONTROL
#include "celo2/control.h"
#endif
#ifdef CELO2_HAVE_CUDA_BACKEND
#include <mutex>

#include "celo2/cuda_backend.h"
#endif

namespace celo2 {
namespace {

GradMode parse_grads(const std::string& s) {
  if (s == "local") return GradMode::kLocal;
  // The engine reads only this rank's slice of reduced gradients, so the distributed
  // optimizer's reduce-scattered gradients are the same mode with a narrower contract.
  if (s == "reduced" || s == "sharded") return GradMode::kReduced;
  throw std::invalid_argument("grads: '" + s + "' is not one of local, reduced, sharded");
}

NanPolicy parse_nan(const std::string& s) {
  if (s == "skip") return NanPolicy::kSkipStep;
  if (s == "error") return NanPolicy::kError;
  if (s == "zero") return NanPolicy::kZero;
  return parse_nan_policy(s);  // the engine's own spellings; throws naming the value
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void check_finite(const char* what, double v) {
  if (!std::isfinite(v)) throw std::invalid_argument(std::string(what) + " is not finite");
}

// A file name no other process or call uses: this process, a counter, the clock.
std::string temp_state_path() {
  static std::atomic<int> counter{0};
  const auto ns = std::chrono::steady_clock::now().time_since_epoch().count();
  return (std::filesystem::temp_directory_path() /
          ("celo2-state-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" +
           std::to_string(ns) + ".state"))
      .string();
}

struct RemoveOnExit {
  std::string path;
  ~RemoveOnExit() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
};

}  // namespace

EngineOptions engine_options_from(const ClientOptions& o) {
  EngineOptions eo;
  OptimizerOptions& opt = eo.opt;
  if (o.rule) {
    opt.rule = *o.rule;
  } else if (o.variant == "celo2") {
    opt.rule = RuleConfig{};
  } else if (o.variant == "celo2-base") {
    opt.rule = RuleConfig::celo2_base();
  } else {
    throw std::invalid_argument("variant: '" + o.variant + "' is not one of celo2, celo2-base");
  }
  opt.rule.validate();
  if (!o.theta_path.empty() && !o.theta_bytes.empty())
    throw std::invalid_argument("theta: give a path or bytes, not both");
  if (!o.theta_path.empty()) opt.theta = load_theta(o.theta_path, opt.rule);
  if (!o.theta_bytes.empty()) {
    try {
      opt.theta = theta_from_bytes(o.theta_bytes, opt.rule);
    } catch (const flax::FormatError& e) {  // name the argument, as a path's errors name the file
      throw flax::FormatError(std::string("theta (") + std::to_string(o.theta_bytes.size()) +
                              " bytes): " + e.what());
    }
  }
  try {
    opt.schedule = Schedule::parse(o.schedule);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("schedule: ") + e.what());
  }
  try {
    opt.rules = o.rules.empty() ? LabelRules::seed_default() : LabelRules::parse(o.rules);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("rules: ") + e.what());
  }
  check_finite("weight_decay", o.weight_decay);
  check_finite("mult_1d", o.mult_1d);
  if (o.weight_decay < 0) throw std::invalid_argument("weight_decay must be >= 0");
  opt.weight_decay = o.weight_decay;
  opt.mult_1d = o.mult_1d;
  if (!std::isfinite(o.max_grad_norm) || o.max_grad_norm < 0)
    throw std::invalid_argument("max_grad_norm must be a finite number >= 0 (0: no clipping)");
  opt.max_grad_norm = o.max_grad_norm;
  for (double b : {o.adam_b1, o.adam_b2})
    if (!(b >= 0.0 && b < 1.0)) throw std::invalid_argument("AdamW betas must lie in [0, 1)");
  if (!(o.adam_eps > 0.0) || !std::isfinite(o.adam_eps))
    throw std::invalid_argument("AdamW eps must be a positive number");
  opt.adam_b1 = static_cast<float>(o.adam_b1);
  opt.adam_b2 = static_cast<float>(o.adam_b2);
  opt.adam_eps = static_cast<float>(o.adam_eps);
  try {
    opt.nan_policy = parse_nan(o.nan_policy);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("nan_policy: ") + e.what());
  }
  eo.grad_mode = parse_grads(o.grads);
  eo.gather_params = o.gather_params;
  eo.plan = parse_plan(o.plan);
  eo.backend = o.backend;
  if (o.bucket_elements < 1) throw std::invalid_argument("bucket_elements must be positive");
  eo.bucket_elements = o.bucket_elements;
  eo.overlap_grad_reduce = o.overlap_grad_reduce;
  return eo;
}

std::shared_ptr<Communicator> client_communicator(const std::string& kind, const std::string& backend) {
  // Device memory travels over NCCL; one rank needs no transport at all.
  if (kind == "auto" && backend == "cuda")
    return std::shared_ptr<Communicator>(make_communicator(detect_launch().size > 1 ? "nccl" : "local"));
  return std::shared_ptr<Communicator>(make_communicator(kind));
}

bool cuda_backend_supported() {
#ifdef CELO2_HAVE_CUDA_BACKEND
  return true;
#else
  return false;
#endif
}

// The control plane, when the build has it. Kept behind a holder so this header does not
// depend on gRPC.
struct Client::ControlHolder {
#ifdef CELO2_HAVE_CONTROL
  std::unique_ptr<ControlPlane> plane;
#endif
};

bool Client::control_supported() {
#ifdef CELO2_HAVE_CONTROL
  return true;
#else
  return false;
#endif
}

Client::Client(ClientOptions options, std::shared_ptr<Communicator> comm)
    : opts_(std::move(options)), comm_(std::move(comm)) {
  EngineOptions eo = engine_options_from(opts_);  // before anything collective
  if (!opts_.control.address.empty() && !control_supported())
    throw UnsupportedError("control plane requested (" + opts_.control.address +
                           ") but this build of celo2 has no gRPC control plane");
#ifdef CELO2_HAVE_CUDA_BACKEND
  static std::once_flag registered;
  std::call_once(registered, register_cuda_backend);
#endif
  if (!comm_) comm_ = client_communicator(opts_.communicator, opts_.backend);
  engine_ = std::make_unique<Engine>(std::move(eo), comm_);
  last_lr_ = engine_->options().opt.schedule.at(0);
}

Client::~Client() {
#ifdef CELO2_HAVE_CONTROL
  if (control_ && control_->plane) control_->plane->finish();
#endif
}

void Client::add_tensor(const std::string& name, const std::vector<int64_t>& shape, float* params,
                        const float* grads) {
  add_tensor(name, shape, params, DType::kFloat32, grads);
}

void Client::add_tensor(const std::string& name, const std::vector<int64_t>& shape, void* params, DType dtype,
                        const float* grads) {
  engine_->add_tensor(name, shape, params, dtype, grads);
}

void Client::set_group(const std::string& name, const TensorGroup& g) {
  size_t i = 0;
  try {
    i = engine_->index_of(name);
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument("set_group: no tensor named '" + name + "'");
  }
  engine_->set_group(i, g);
}

void Client::start_control() {
#ifdef CELO2_HAVE_CONTROL
  if (control_) return;
  ControlOptions co;
  if (!opts_.control.address.empty()) co.address = opts_.control.address;
  co.token = opts_.control.token;
  co.token_file = opts_.control.token_file;
  co.weights_root = opts_.control.weights_root;
  co.checkpoint_dir = opts_.control.checkpoint_dir;
  auto holder = std::make_unique<ControlHolder>();
  holder->plane = std::make_unique<ControlPlane>(std::move(co), *engine_, engine_->tensors());
  control_ = std::move(holder);
#else
  throw UnsupportedError("this build of celo2 has no gRPC control plane");
#endif
}

std::string Client::control_address() const {
#ifdef CELO2_HAVE_CONTROL
  if (control_ && control_->plane) return control_->plane->address();
#endif
  return {};
}

StepReport Client::step(std::optional<double> loss, std::optional<double> lr,
                        const std::vector<uint8_t>* has_grad) {
  if (lr) check_finite("lr", *lr);
  if (!opts_.control.address.empty() && !control_) start_control();
  const auto t0 = std::chrono::steady_clock::now();
  // The gradient buckets grad_ready started are collectives in flight: they end before the
  // control plane's own (a command that relabels makes the step reduce them again).
  engine_->finish_grads();
#ifdef CELO2_HAVE_CONTROL
  if (control_) control_->plane->apply_pending(*engine_);
#endif
  const StepReport r = lr ? engine_->step_with_lr(*lr, has_grad) : engine_->step(has_grad);
  last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  total_seconds_ += last_seconds_;
  last_lr_ = r.lr;
  last_grad_norm_ = r.grad_norm_total;
#ifdef CELO2_HAVE_CONTROL
  if (control_) {
    std::optional<double> l = loss;
    if (l && !std::isfinite(*l)) l.reset();
    control_->plane->publish(*engine_, r, l);
  }
#else
  (void)loss;
#endif
  return r;
}

void Client::save(const std::string& path) {
  if (path.empty()) throw std::invalid_argument("save: empty path");
  engine_->save_state(path);
}

void Client::load(const std::string& path) {
  if (path.empty()) throw std::invalid_argument("load: empty path");
  engine_->load_state(path);
}

std::vector<uint8_t> Client::state_bytes() {
  // The Engine writes checkpoints only as files (rank 0): write one, read it back, share it.
  RemoveOnExit tmp{temp_state_path()};
  engine_->save_state(tmp.path);
  std::vector<uint8_t> bytes;
  if (comm_->rank() == 0) bytes = flax::read_file(tmp.path);
  int64_t n = static_cast<int64_t>(bytes.size());
  comm_->broadcast(&n, sizeof(n), 0);
  bytes.resize(static_cast<size_t>(n));
  comm_->broadcast(bytes.data(), n, 0);
  return bytes;
}

void Client::load_state_bytes(std::span<const uint8_t> bytes) {
  RemoveOnExit tmp{temp_state_path()};
  if (comm_->rank() == 0) {
    // A failed write leaves no file: load_state then fails on every rank with rank 0's
    // message, so no rank is left waiting.
    try {
      flax::write_file_atomic(tmp.path, bytes);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "celo2: writing optimizer state to %s: %s\n", tmp.path.c_str(), e.what());
    }
  }
  engine_->load_state(tmp.path);
}

void Client::set_schedule(const std::string& text) {
  try {
    engine_->set_schedule(Schedule::parse(text));
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("schedule: ") + e.what());
  }
}

void Client::set_rules(const std::string& text) {
  LabelRules r;
  try {
    r = LabelRules::parse(text);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("rules: ") + e.what());
  }
  engine_->set_rules(r);
}

void Client::set_theta_file(const std::string& path) {
  engine_->set_theta(load_theta(path, engine_->options().opt.rule));
}

void Client::set_weight_decay(double wd) {
  check_finite("weight_decay", wd);
  if (wd < 0) throw std::invalid_argument("weight_decay must be >= 0");
  engine_->set_weight_decay(wd);
}

void Client::set_max_grad_norm(double v) { engine_->set_max_grad_norm(v); }

void Client::set_mult_1d(double m) {
  check_finite("mult_1d", m);
  engine_->set_mult_1d(m);
}

void Client::gather_params() { engine_->gather_params(); }

void Client::grad_ready(size_t i) { engine_->grad_ready(i); }
void Client::grad_ready(const std::string& name) { engine_->grad_ready(engine_->index_of(name)); }

ClientStatus Client::status() {
  ClientStatus s;
  s.step = engine_->step_count();
  s.skipped = engine_->skipped_steps();
  s.lr = last_lr_;
  s.rank = comm_->rank();
  s.world_size = comm_->size();
  s.backend = comm_->backend();
  s.num_tensors = engine_->num_tensors();
  s.total_elements = engine_->total_elements();
  std::tie(s.local_lo, s.local_hi) = engine_->local_range();
  s.schedule = engine_->options().opt.schedule.to_string();
  s.rules = engine_->options().opt.rules.to_string();
  // The engine holds the weights in force (the control plane may have swapped them).
  s.theta_sha256 = sha256_hex(theta_to_bytes(engine_->options().opt.theta));
  s.control_address = control_address();
  s.last_step_seconds = last_seconds_;
  s.total_step_seconds = total_seconds_;
  s.grad_norm = last_grad_norm_;
  s.max_grad_norm = engine_->options().opt.max_grad_norm;
  const std::vector<TensorDesc> tensors = engine_->tensors();
  for (size_t i = 0; i < tensors.size(); ++i)
    s.label_elements[static_cast<int>(engine_->label_of(i))] += numel_of(tensors[i].shape);
  return s;
}

std::string Client::routing_table() const { return engine_->routing_table(); }
std::string Client::plan_report() { return engine_->plan_report(); }

}  // namespace celo2
