// The C++ API trainers link: one object that bundles what a training job needs around the
// sharded Engine — options in their text forms (the same strings the tools, the C ABI, the
// Python package and the control plane take), the choice of communicator, the weights, the
// control plane on rank 0, and checkpoints as files or as bytes.
//
//   celo2::ClientOptions o;
//   o.schedule = "cosine:lr=1e-3,warmup=100,total=10000,final=0.1";
//   o.control.address = "127.0.0.1:0";                  // optional: serve celo2.v1.Control
//   celo2::Client opt(o);                                // MPI under mpirun, else local
//   for (auto& t : model.tensors()) opt.add_tensor(t.name, t.shape, t.data, t.grad);
//   while (training) { float loss = forward_backward(); opt.step(loss); }
//   opt.save("ckpt/optimizer.state");                    // what Engine::save_state writes
//
// Invariants: every rank makes the same calls in the same order (construction, add_tensor,
// step, save/load, state_bytes, the setters and gather_params are collective); an option
// that fails to parse throws std::invalid_argument naming it before anything is built;
// the control plane starts at the first step (after registration) and is fed every step.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/engine.h"

namespace celo2 {

struct ClientOptions {
  // "celo2" (Newton–Schulz on matrices) or "celo2-base" (none). `rule`, when set, replaces
  // the variant's RuleConfig entirely.
  std::string variant = "celo2";
  std::optional<RuleConfig> rule;
  // The MLP weights: a published-layout theta.state file, or its bytes. Neither: the
  // project's default weights (config.h, Theta::adam_like).
  std::string theta_path;
  std::vector<uint8_t> theta_bytes;
  std::string schedule = "constant:lr=1e-3";  // schedule.h text form
  std::string rules;                          // labels.h text form; empty: the seed's default
  double weight_decay = 0.0;
  double mult_1d = 20.0;  // learning-rate multiplier of the AdamW branch (and of its decay)
  double max_grad_norm = 0.0;  // global gradient-norm clipping; 0: off
  double adam_b1 = 0.9, adam_b2 = 0.95, adam_eps = 1e-8;
  std::string nan_policy = "skip";  // skip | error | zero
  // "local": every rank passes its own full gradients, the engine averages them.
  // "reduced": gradients are already averaged over ranks (e.g. after DDP's all-reduce).
  // "sharded": the distributed-optimizer contract: only this rank's slice (local_range())
  //            of the flat gradient space needs to hold averaged gradients.
  std::string grads = "local";
  bool gather_params = true;          // false: the trainer all-gathers (or gather_params())
  std::string backend = "cpu";        // cpu | cuda | reference (engine.h EngineOptions::backend)
  std::string plan = "flat";          // flat | whole (engine.h Plan; cuda and reference: whole)
  int64_t bucket_elements = int64_t{1} << 24;
  // Reduce-scatter gradient buckets during backward, as grad_ready() marks tensors final
  // (engine.h EngineOptions::overlap_grad_reduce).
  bool overlap_grad_reduce = false;
  // auto | local | mpi | nccl (unused when one is passed in). auto: MPI when an MPI launcher
  // started more than one rank, else local; with backend "cuda": NCCL when more than one rank.
  std::string communicator = "auto";
  struct Control {
    std::string address;  // empty: no control plane; "127.0.0.1:0" picks a free port
    std::string token, token_file;
    std::string weights_root, checkpoint_dir;
  } control;
};

// The one table of option keys: the C ABI (celo2_options_set, celo2_set), Python (the
// keyword arguments of celo2.torch.Celo2 and celo2._celo2.Optimizer) and docs/OPERATIONS.md
// use these spellings and no others.
struct ClientOptionInfo {
  const char* key;
  const char* type;     // text | path | number | bool | count: how the text form parses
  bool runtime;         // may change while running (Client::set)
  const char* meaning;  // one line
};
const std::vector<ClientOptionInfo>& client_option_table();
// Sets one option from its text form; throws std::invalid_argument naming an unknown key
// (and listing the known ones) or a value that does not parse.
void set_client_option(ClientOptions& o, const std::string& key, const std::string& value);

// The engine's communicator choice for `kind` and the launcher's variables: "auto" is MPI
// when an MPI launcher started more than one rank, else local.
std::shared_ptr<Communicator> client_communicator(const std::string& kind, const std::string& backend = "cpu");
// Whether this build has the engine's "cuda" backend.
bool cuda_backend_supported();

struct ClientStatus {
  int64_t step = 0, skipped = 0;
  double lr = 0.0;           // of the last step (the next step's before the first)
  int rank = 0, world_size = 1;
  std::string backend;       // communicator backend
  size_t num_tensors = 0;
  int64_t total_elements = 0;
  int64_t local_lo = 0, local_hi = 0;  // this rank's slice (after the first step)
  std::string schedule, rules, theta_sha256;
  std::string control_address;  // empty when no control plane runs (or not rank 0)
  double last_step_seconds = 0.0;
  double total_step_seconds = 0.0;  // all steps so far, in this process
  double grad_norm = 0.0;           // the last step's global gradient norm (before clipping)
  double max_grad_norm = 0.0;       // the clipping threshold in force (0: off)
  int64_t label_elements[3] = {};   // celo2, adamw, frozen
};

class Client {
 public:
  // Collective. Throws std::invalid_argument naming a bad option, flax::FormatError for
  // bad weights.
  explicit Client(ClientOptions options, std::shared_ptr<Communicator> comm = nullptr);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Same order on every rank; closes at the first step. `params` is updated in place and
  // `grads` read at each step; both must stay valid (float32, C order, numel(shape)).
  void add_tensor(const std::string& name, const std::vector<int64_t>& shape, float* params,
                  const float* grads);
  // bf16/fp16 parameters (float32 gradients): the engine keeps float32 masters of its slice
  // (Engine::add_tensor with a DType).
  void add_tensor(const std::string& name, const std::vector<int64_t>& shape, void* params, DType dtype,
                  const float* grads);
  // A tensor's param-group hyperparameters (recipe.h TensorGroup); same calls on every rank.
  void set_group(const std::string& name, const TensorGroup& g);

  // One update. `loss` (this step's, mean over ranks if known) goes to the control plane.
  // `lr`, when set, replaces the schedule's learning rate for this step.
  // `has_grad` (optional): Engine::step's, one byte per tensor (0: no gradient this step).
  StepReport step(std::optional<double> loss = std::nullopt, std::optional<double> lr = std::nullopt,
                  const std::vector<uint8_t>* has_grad = nullptr);

  // Overlap (ClientOptions::overlap_grad_reduce): the tensor registered `i`-th (or named
  // `name`) has its final gradient for this step (Engine::grad_ready).
  void grad_ready(size_t i);
  void grad_ready(const std::string& name);

  // Checkpoints: the Engine's world-size-independent file (state_file.h). state_bytes()
  // returns the same bytes save() writes, on every rank; load_state_bytes() uses rank 0's.
  void save(const std::string& path);
  void load(const std::string& path);
  std::vector<uint8_t> state_bytes();
  void load_state_bytes(std::span<const uint8_t> bytes);

  // Changes at a step boundary on every rank (collective by contract: same calls, same
  // order). The control plane's commands do the same from outside.
  // One option of client_option_table() marked runtime, by key and text value.
  void set(const std::string& key, const std::string& value);
  void set_schedule(const std::string& text);
  void set_rules(const std::string& text);
  void set_theta_file(const std::string& path);
  void set_weight_decay(double wd);
  void set_mult_1d(double m);
  void set_max_grad_norm(double v);

  // gather_params = false: every rank's updated slice to every rank (what the Engine does
  // when gather_params = true). Collective.
  void gather_params();

  // Starts the control plane now (collective; otherwise it starts at the first step when
  // options.control.address is set). Throws UnsupportedError when built without gRPC.
  void start_control();
  std::string control_address() const;  // rank 0 once started; else empty
  static bool control_supported();

  ClientStatus status();
  std::string routing_table() const;
  std::string plan_report();
  std::vector<TensorDesc> tensors() const { return engine_->tensors(); }
  Engine& engine() { return *engine_; }
  const ClientOptions& options() const { return opts_; }

 private:
  struct ControlHolder;
  ClientOptions opts_;
  std::shared_ptr<Communicator> comm_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ControlHolder> control_;
  double last_lr_ = 0.0, last_seconds_ = 0.0, total_seconds_ = 0.0, last_grad_norm_ = 0.0;
};

// Builds the EngineOptions the text options describe (throws std::invalid_argument naming
// the option). Shared with the C ABI and the Python module.
EngineOptions engine_options_from(const ClientOptions& o);

}  // namespace celo2
