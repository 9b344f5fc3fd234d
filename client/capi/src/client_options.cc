// The one table of the client's options (client.h): each key's text form, whether it may
// change while running, its meaning and its setter. The C ABI, Python and the docs use it.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <stdexcept>

#include "celo2/client.h"

namespace celo2 {
namespace {

double parse_number(const std::string& key, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(value.c_str(), &end);
  if (value.empty() || end != value.c_str() + value.size() || errno == ERANGE || !std::isfinite(v))
    throw std::invalid_argument(key + ": '" + value + "' is not a finite number");
  return v;
}

bool parse_bool(const std::string& key, const std::string& value) {
  if (value == "1" || value == "true" || value == "on" || value == "yes") return true;
  if (value == "0" || value == "false" || value == "off" || value == "no") return false;
  throw std::invalid_argument(key + ": '" + value + "' is not a boolean (1/0, true/false)");
}

int64_t parse_count(const std::string& key, const std::string& value) {
  const double v = parse_number(key, value);
  if (v < 1 || v != std::floor(v) || v > 9.0e15)
    throw std::invalid_argument(key + ": '" + value + "' is not a positive whole number");
  return static_cast<int64_t>(v);
}

struct Row {
  ClientOptionInfo info;
  std::function<void(ClientOptions&, const std::string&, const std::string&)> set;
};

const std::vector<Row>& rows() {
  using O = ClientOptions;
  using S = const std::string&;
  static const std::vector<Row> r = {
      {{"variant", "text", false, "celo2 (Newton–Schulz on matrices) or celo2-base (none)"},
       [](O& o, S, S v) { o.variant = v; }},
      {{"theta", "path", true, "the MLP weights (theta.state, flax msgpack); unset: the project's default"},
       [](O& o, S, S v) { o.theta_path = v; }},
      {{"schedule", "text", true, "learning-rate schedule, e.g. cosine:lr=1e-3,warmup=100,total=10000,final=0.1"},
       [](O& o, S, S v) { o.schedule = v; }},
      {{"rules", "text", true, "label rules, e.g. 'ndim<=1 => adamw; re:wte|wpe => adamw; * => celo2'"},
       [](O& o, S, S v) { o.rules = v; }},
      {{"weight_decay", "number", true, "decoupled weight decay of both branches (>= 0)"},
       [](O& o, S k, S v) { o.weight_decay = parse_number(k, v); }},
      {{"mult_1d", "number", true, "learning-rate multiplier of the AdamW branch (also scales its decay)"},
       [](O& o, S k, S v) { o.mult_1d = parse_number(k, v); }},
      {{"max_grad_norm", "number", true, "clip the global gradient norm to this (torch clip_grad_norm_); 0: off"},
       [](O& o, S k, S v) { o.max_grad_norm = parse_number(k, v); }},
      {{"adam_b1", "number", false, "AdamW branch beta1 (torch: betas[0])"},
       [](O& o, S k, S v) { o.adam_b1 = parse_number(k, v); }},
      {{"adam_b2", "number", false, "AdamW branch beta2 (torch: betas[1])"},
       [](O& o, S k, S v) { o.adam_b2 = parse_number(k, v); }},
      {{"adam_eps", "number", false, "AdamW branch epsilon (torch: eps)"},
       [](O& o, S k, S v) { o.adam_eps = parse_number(k, v); }},
      {{"nan_policy", "text", false, "non-finite gradients: skip (the step), error, or zero (the entries)"},
       [](O& o, S, S v) { o.nan_policy = v; }},
      {{"grads", "text", false, "local (the engine averages), reduced (already averaged), sharded (this rank's slice)"},
       [](O& o, S, S v) { o.grads = v; }},
      {{"gather_params", "bool", false, "all-gather the parameters after the update (false: the trainer does)"},
       [](O& o, S k, S v) { o.gather_params = parse_bool(k, v); }},
      {{"backend", "text", false, "cpu, cuda (tensors in device memory; CUDA builds) or reference (the plain kernels)"},
       [](O& o, S, S v) { o.backend = v; }},
      {{"plan", "text", false, "flat (even slices, the rule in phases) or whole (each Celo2 tensor on one rank)"},
       [](O& o, S, S v) { o.plan = v; }},
      {{"bucket_elements", "count", false, "floats per bucket of the gradient reduce-scatter and parameter all-gather"},
       [](O& o, S k, S v) { o.bucket_elements = parse_count(k, v); }},
      {{"overlap_grad_reduce", "bool", false, "reduce-scatter gradient buckets during backward as grad_ready marks tensors (MPI)"},
       [](O& o, S k, S v) { o.overlap_grad_reduce = parse_bool(k, v); }},
      {{"communicator", "text", false, "auto (MPI under an MPI launcher with > 1 rank), local, mpi, nccl"},
       [](O& o, S, S v) { o.communicator = v; }},
      {{"control_address", "text", false, "serve celo2.v1.Control on rank 0 here (host:port; port 0 picks one)"},
       [](O& o, S, S v) { o.control.address = v; }},
      {{"control_token", "text", false, "bearer token of the control plane (>= 16 bytes)"},
       [](O& o, S, S v) { o.control.token = v; }},
      {{"control_token_file", "path", false, "file holding the bearer token"},
       [](O& o, S, S v) { o.control.token_file = v; }},
      {{"control_weights_root", "path", false, "LoadWeights paths must lie under this folder"},
       [](O& o, S, S v) { o.control.weights_root = v; }},
      {{"control_checkpoint_dir", "path", false, "Checkpoint requests write here"},
       [](O& o, S, S v) { o.control.checkpoint_dir = v; }},
  };
  return r;
}

const Row& row_of(const std::string& key) {
  for (const Row& r : rows())
    if (key == r.info.key) return r;
  std::string keys;
  for (const Row& r : rows()) keys += (keys.empty() ? "" : ", ") + std::string(r.info.key);
  throw std::invalid_argument("unknown option '" + key + "' (" + keys + ")");
}

}  // namespace

const std::vector<ClientOptionInfo>& client_option_table() {
  static const std::vector<ClientOptionInfo> t = [] {
    std::vector<ClientOptionInfo> v;
    for (const Row& r : rows()) v.push_back(r.info);
    return v;
  }();
  return t;
}

void set_client_option(ClientOptions& o, const std::string& key, const std::string& value) {
  row_of(key).set(o, key, value);
}

void Client::set(const std::string& key, const std::string& value) {
  const Row& r = row_of(key);
  if (!r.info.runtime) {
    std::string keys;
    for (const Row& x : rows())
      if (x.info.runtime) keys += (keys.empty() ? "" : ", ") + std::string(x.info.key);
    throw std::invalid_argument("'" + key + "' cannot change at run time (" + keys + ")");
  }
  if (key == "schedule") set_schedule(value);
  else if (key == "rules") set_rules(value);
  else if (key == "theta") set_theta_file(value);
  else if (key == "weight_decay") set_weight_decay(parse_number(key, value));
  else if (key == "mult_1d") set_mult_1d(parse_number(key, value));
  else if (key == "max_grad_norm") set_max_grad_norm(parse_number(key, value));
}

}  // namespace celo2
