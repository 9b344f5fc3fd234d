// theta.state <-> Theta (see theta_io.h). The checks collect every layout problem before
// failing, so a wrong file is described in one message (which names are missing, which
// are extra, which shapes differ) instead of one mismatch per attempt.
#include "celo2/theta_io.h"

#include <openssl/evp.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace celo2 {
namespace {

using flax::FormatError;
using flax::NdArray;
using flax::Value;

constexpr const char* kStack = "ff_mod_stack";
constexpr const char* kTilde = "~";
constexpr size_t kProblemsShown = 3;

// "w" + 3 -> "w3". (Spelled out because GCC 12 warns falsely, -Wrestrict, on
// `"w" + std::to_string(i)`.)
std::string indexed_name(const char* prefix, int i) {
  std::string s = prefix;
  s += std::to_string(i);
  return s;
}

std::string join_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "/" + key;
}


// One array the layout expects, in file order (w0__0..w0__13, b0, w1, b1, ..., wL, bL).
struct Expected {
  std::string name;
  std::vector<int64_t> shape;
  int layer;
};

std::vector<Expected> expected_arrays(const RuleConfig& cfg) {
  const int64_t H = cfg.ff_hidden_size;
  const int L = cfg.ff_hidden_layers;
  std::vector<Expected> out;
  for (int l = 0; l <= L; ++l) {
    const int64_t n_out = l == L ? kOutputs : H;
    if (l == 0) {
      for (int g = 0; g < kFeatureGroups; ++g) {
        out.push_back({indexed_name("w0__", g), {kGroupWidth[g], n_out}, 0});
      }
    } else {
      out.push_back({indexed_name("w", l), {H, n_out}, l});
    }
    out.push_back({indexed_name("b", l), {n_out}, l});
  }
  return out;
}

// Celo v1 files carry LSTM state beside the MLP and a leading axis of 1 on every array.
bool looks_like_celo_v1(const Value& root) {
  if (root.find("lstm_init_state") || root.find("rnn_params")) return true;
  const Value* stack = root.find(kStack);
  const Value* params = stack ? stack->find(kTilde) : nullptr;
  const Value* w00 = params ? params->find("w0__0") : nullptr;
  if (!w00 || !w00->is_array()) return false;
  const auto& s = w00->array->shape;
  return s.size() == 3 && s[0] == 1;
}

std::string quoted_list(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", '" : "'") + names[i] + "'";
  return s;
}

[[noreturn]] void refuse(const std::vector<std::string>& problems, const Value& root,
                         const RuleConfig& cfg) {
  std::string msg;
  for (size_t i = 0; i < problems.size() && i < kProblemsShown; ++i) {
    msg += (i ? "; " : "") + problems[i];
  }
  if (problems.size() > kProblemsShown) {
    msg += " (and " + std::to_string(problems.size() - kProblemsShown) + " more)";
  }
  if (looks_like_celo_v1(root)) {
    msg +=
        " — this looks like a Celo v1 checkpoint (LSTM state, a leading axis of 1 on "
        "every array, hidden size 4), which Celo2 cannot use";
  } else {
    msg += " (expected a Celo2 theta with ff_hidden_size " + std::to_string(cfg.ff_hidden_size) +
           " and ff_hidden_layers " + std::to_string(cfg.ff_hidden_layers) + ")";
  }
  throw FormatError(msg);
}

// Returns the ff_mod_stack/~ map, collecting problems on the way there.
const Value* find_params(const Value& root, std::vector<std::string>& problems) {
  const std::string where = root.where.empty() ? "<root>" : root.where;
  if (!root.is_map()) {
    problems.push_back(where + ": expected a map holding 'ff_mod_stack'");
    return nullptr;
  }
  std::vector<std::string> extra;
  for (const auto& [key, val] : root.map) {
    if (key != kStack) extra.push_back(key);
  }
  if (!extra.empty()) {
    problems.push_back(where + ": unexpected top-level key" + (extra.size() > 1 ? "s " : " ") +
                       quoted_list(extra) + " (a Celo2 theta holds only 'ff_mod_stack')");
  }
  const std::string stack_path = join_path(root.where, kStack);
  const Value* stack = root.find(kStack);
  if (!stack) {
    problems.push_back(where + ": missing 'ff_mod_stack'");
    return nullptr;
  }
  if (!stack->is_map() || stack->map.size() != 1 || !stack->find(kTilde)) {
    problems.push_back(stack_path + ": expected a map with the single key '~'");
    return nullptr;
  }
  const Value* params = stack->find(kTilde);
  if (!params->is_map()) {
    problems.push_back(join_path(stack_path, kTilde) + ": expected a map of arrays");
    return nullptr;
  }
  return params;
}

void check_finite(const NdArray& a, const std::string& path) {
  for (size_t i = 0; i < a.data.size(); ++i) {
    if (!std::isfinite(a.data[i])) {
      const std::string what = std::isnan(a.data[i]) ? "nan" : (a.data[i] > 0 ? "inf" : "-inf");
      throw FormatError(path + ": non-finite weight " + what + " at flat index " +
                        std::to_string(i) +
                        (a.dtype == "float64" ? " (after float32 conversion)" : ""));
    }
  }
}

// Internal consistency of a Theta built in code (no config to compare against).
void check_theta_shape(const Theta& theta) {
  if (theta.layers.size() < 2) {
    throw std::invalid_argument("theta needs at least 2 layers, has " +
                                std::to_string(theta.layers.size()));
  }
  for (size_t l = 0; l < theta.layers.size(); ++l) {
    const DenseLayer& d = theta.layers[l];
    const std::string at = "theta layer " + std::to_string(l);
    if (d.in <= 0 || d.out <= 0 || d.w.size() != static_cast<size_t>(d.in) * d.out ||
        d.b.size() != static_cast<size_t>(d.out)) {
      throw std::invalid_argument(at + ": " + std::to_string(d.in) + "x" + std::to_string(d.out) +
                                  " with " + std::to_string(d.w.size()) + " weights and " +
                                  std::to_string(d.b.size()) + " biases");
    }
    const int want_in = l == 0 ? kChannels : theta.layers[l - 1].out;
    if (d.in != want_in) {
      throw std::invalid_argument(at + " has " + std::to_string(d.in) + " inputs, expected " +
                                  std::to_string(want_in));
    }
  }
  if (theta.layers.back().out != kOutputs) {
    throw std::invalid_argument("theta's last layer has " +
                                std::to_string(theta.layers.back().out) + " outputs, expected " +
                                std::to_string(kOutputs));
  }
}

// ---- config fields ----

int int_field(const Value& v) {
  if (v.kind != Value::Kind::kInt) {
    throw FormatError(v.where + ": expected an integer");
  }
  if (v.i < std::numeric_limits<int>::min() || v.i > std::numeric_limits<int>::max()) {
    throw FormatError(v.where + ": integer " + std::to_string(v.i) + " out of range");
  }
  return static_cast<int>(v.i);
}

float float_field(const Value& v) {
  const double d = v.as_number();
  if (std::isfinite(d) && std::fabs(d) > std::numeric_limits<float>::max()) {
    throw FormatError(v.where + ": " + std::to_string(d) + " is outside the float32 range");
  }
  return static_cast<float>(d);  // NaN and inf stay so; validate() names them
}

template <size_t N>
std::array<float, N> floats_field(const Value& v) {
  if (v.kind != Value::Kind::kList || v.list.size() != N) {
    throw FormatError(v.where + ": expected a list of " + std::to_string(N) +
                      " numbers (the published checkpoint layout fixes this count)");
  }
  std::array<float, N> out{};
  for (size_t i = 0; i < N; ++i) out[i] = float_field(v.list[i]);
  return out;
}

}  // namespace

Theta theta_from_value(const Value& root, const RuleConfig& cfg) {
  cfg.validate();
  std::vector<std::string> problems;
  const Value* params = find_params(root, problems);
  if (!params) refuse(problems, root, cfg);
  const std::string params_path = join_path(join_path(root.where, kStack), kTilde);

  const std::vector<Expected> expected = expected_arrays(cfg);
  std::vector<const NdArray*> found(expected.size(), nullptr);
  for (size_t k = 0; k < expected.size(); ++k) {
    const Expected& e = expected[k];
    const std::string path = join_path(params_path, e.name);
    const Value* v = params->find(e.name);
    if (!v) {
      problems.push_back(path + ": missing");
    } else if (!v->is_array()) {
      problems.push_back(path + ": expected an array, got a non-array value");
    } else if (v->array->shape != e.shape) {
      problems.push_back(path + ": expected shape " + format_shape(e.shape) + ", got " +
                         format_shape(v->array->shape));
    } else {
      found[k] = v->array.get();
    }
  }
  std::vector<std::string> extra;
  for (const auto& [key, val] : params->map) {
    bool known = false;
    for (const Expected& e : expected) known = known || e.name == key;
    if (!known) extra.push_back(key);
  }
  if (!extra.empty()) {
    problems.push_back(params_path + ": unexpected array" + (extra.size() > 1 ? "s " : " ") +
                       quoted_list(extra));
  }
  if (!problems.empty()) refuse(problems, root, cfg);

  for (size_t k = 0; k < expected.size(); ++k) {
    check_finite(*found[k], join_path(params_path, expected[k].name));
  }

  // Assemble: layer 0's rows are the w0__g blocks stacked in feature-group order.
  Theta theta;
  const int L = cfg.ff_hidden_layers;
  size_t k = 0;
  for (int l = 0; l <= L; ++l) {
    DenseLayer d;
    d.in = l == 0 ? kChannels : cfg.ff_hidden_size;
    d.out = l == L ? kOutputs : cfg.ff_hidden_size;
    d.w.reserve(static_cast<size_t>(d.in) * d.out);
    for (; k < expected.size() && expected[k].name[0] == 'w' && expected[k].layer == l; ++k) {
      d.w.insert(d.w.end(), found[k]->data.begin(), found[k]->data.end());
    }
    d.b = found[k++]->data;  // b<l> follows its weights
    theta.layers.push_back(std::move(d));
  }
  theta.check_fits(cfg);
  return theta;
}

Theta theta_from_bytes(std::span<const uint8_t> bytes, const RuleConfig& cfg) {
  return theta_from_value(flax::decode(bytes), cfg);
}

Theta load_theta(const std::string& path, const RuleConfig& cfg) {
  const std::vector<uint8_t> bytes = flax::read_file(path);
  try {
    return theta_from_bytes(bytes, cfg);
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
}

Value theta_to_value(const Theta& theta) {
  check_theta_shape(theta);
  Value params = Value::of_map();
  for (size_t l = 0; l < theta.layers.size(); ++l) {
    const DenseLayer& d = theta.layers[l];
    if (l == 0) {
      size_t row = 0;
      for (int g = 0; g < kFeatureGroups; ++g) {
        const size_t rows = static_cast<size_t>(kGroupWidth[g]);
        std::vector<float> block(d.w.begin() + row * d.out, d.w.begin() + (row + rows) * d.out);
        params.map.emplace(indexed_name("w0__", g),
                           Value::of_array({static_cast<int64_t>(rows), d.out}, std::move(block)));
        row += rows;
      }
    } else {
      params.map.emplace(indexed_name("w", l), Value::of_array({d.in, d.out}, d.w));
    }
    params.map.emplace(indexed_name("b", l), Value::of_array({d.out}, d.b));
  }
  Value stack = Value::of_map();
  stack.map.emplace(kTilde, std::move(params));
  Value root = Value::of_map();
  root.map.emplace(kStack, std::move(stack));
  return root;
}

std::vector<uint8_t> theta_to_bytes(const Theta& theta) {
  return flax::encode(theta_to_value(theta));
}

void save_theta(const std::string& path, const Theta& theta) {
  flax::write_file_atomic(path, theta_to_bytes(theta));
}

RuleConfig config_for_theta(const Value& root) {
  const Value* stack = root.find(kStack);
  const Value* params = stack ? stack->find(kTilde) : nullptr;
  const std::string params_path = join_path(join_path(root.where, kStack), kTilde);
  const Value* b0 = params ? params->find("b0") : nullptr;
  if (!b0 || !b0->is_array() || b0->array->shape.empty()) {
    std::string msg = params_path + "/b0: missing or not an array, cannot tell the hidden size";
    if (looks_like_celo_v1(root)) msg += " — this looks like a Celo v1 checkpoint";
    throw FormatError(msg);
  }
  RuleConfig cfg;
  const int64_t hidden = b0->array->shape.back();  // lenient: v1's (1, 4) reads as 4
  if (hidden < 1 || hidden > std::numeric_limits<int>::max()) {
    throw FormatError(params_path + "/b0: hidden size " + std::to_string(hidden) + " is invalid");
  }
  cfg.ff_hidden_size = static_cast<int>(hidden);
  int biases = 1;
  while (biases < 1000 && params->find(indexed_name("b", biases))) ++biases;
  cfg.ff_hidden_layers = biases - 1;
  return cfg;
}

RuleConfig config_from_value(const Value& v) {
  if (!v.is_map()) {
    throw FormatError((v.where.empty() ? std::string("<root>") : v.where) +
                      ": config must be a map");
  }
  RuleConfig c;
  for (const auto& [key, x] : v.map) {
    if (key == "ff_hidden_size")
      c.ff_hidden_size = int_field(x);
    else if (key == "ff_hidden_layers")
      c.ff_hidden_layers = int_field(x);
    else if (key == "mom_decays")
      c.mom_decays = floats_field<kMom>(x);
    else if (key == "rms_decays")
      c.rms_decays = floats_field<kRms>(x);
    else if (key == "fac_decays")
      c.fac_decays = floats_field<kFac>(x);
    else if (key == "exp_mult")
      c.exp_mult = float_field(x);
    else if (key == "rmsmult")
      c.rmsmult = float_field(x);
    else if (key == "param_scale_mult")
      c.param_scale_mult = x.as_bool();
    else if (key == "precondition_output")
      c.precondition_output = x.as_bool();
    else if (key == "normalize_input")
      c.normalize_input = x.as_bool();
    else if (key == "normalize_output")
      c.normalize_output = x.as_bool();
    else if (key == "aggregate_mag")
      c.aggregate_mag = x.as_bool();
    else if (key == "bias_correction")
      c.bias_correction = x.as_bool();
    else if (key == "orthogonalize")
      c.orthogonalize = x.as_bool();
    else if (key == "ns_coeffs")
      c.ns_coeffs = floats_field<3>(x);
    else if (key == "ns_iters")
      c.ns_iters = int_field(x);
    else if (key == "ns_eps")
      c.ns_eps = float_field(x);
    else if (key == "mlp_activation") {
      const std::string& a = x.as_string();
      if (a == "relu")
        c.mlp_activation = Activation::kRelu;
      else if (a == "tanh")
        c.mlp_activation = Activation::kTanh;
      else
        throw FormatError(x.where + ": unknown mlp_activation '" + a + "' (relu or tanh)");
    } else {
      throw FormatError((v.where.empty() ? std::string("<root>") : v.where) +
                        ": unknown config key '" + key + "'");
    }
  }
  c.validate();
  return c;
}

std::string sha256_hex(std::span<const uint8_t> bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("SHA-256 failed (OpenSSL EVP_Digest)");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    out += kHex[digest[i] >> 4];
    out += kHex[digest[i] & 0xf];
  }
  return out;
}

}  // namespace celo2
