// The single-process Celo2 optimizer: registry, labels, the recipe of spec §4, NaN policy,
// state checkpoints.
#include "celo2/optimizer.h"

#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

#include "celo2/adamw.h"
#include "celo2/flax_msgpack.h"
#include "celo2/theta_io.h"

namespace celo2 {

NanPolicy parse_nan_policy(const std::string& s) {
  if (s == "skip") return NanPolicy::kSkipStep;
  if (s == "error") return NanPolicy::kError;
  if (s == "zero") return NanPolicy::kZero;
  throw std::invalid_argument("unknown NaN policy '" + s + "' (expected skip, error or zero)");
}

const char* nan_policy_name(NanPolicy p) {
  switch (p) {
    case NanPolicy::kSkipStep: return "skip";
    case NanPolicy::kError: return "error";
    case NanPolicy::kZero: return "zero";
  }
  return "?";
}

struct Optimizer::Entry {
  std::string name;
  Geometry geo;
  float* params = nullptr;
  const float* grads = nullptr;
  Label label = Label::kCelo2;
  RuleState rule;                 // celo2 label
  std::vector<float> mu, nu;      // adamw label
  int64_t adam_count = 0;
  std::vector<float> scratch;     // the Celo2 step u / a clean gradient copy

  void reset_branch_state() {
    rule = RuleState{};
    mu.clear();
    nu.clear();
    adam_count = 0;
    if (label == Label::kCelo2) rule = RuleState::zeros(geo);
    if (label == Label::kAdamW) {
      mu.assign(geo.numel, 0.0f);
      nu.assign(geo.numel, 0.0f);
    }
  }
};

Optimizer::Optimizer(OptimizerOptions options) : opts_(std::move(options)) {
  opts_.rule.validate();
  if (opts_.theta.layers.empty()) opts_.theta = Theta::adam_like(opts_.rule);
  opts_.theta.check_fits(opts_.rule);
  opts_.schedule.validate();
  if (!std::isfinite(opts_.weight_decay) || !std::isfinite(opts_.mult_1d))
    throw std::invalid_argument("weight_decay and mult_1d must be finite");
}

Optimizer::~Optimizer() = default;

size_t Optimizer::num_tensors() const { return entries_.size(); }
Label Optimizer::label_of(size_t i) const { return entries_.at(i)->label; }
const std::string& Optimizer::name_of(size_t i) const { return entries_.at(i)->name; }

void Optimizer::add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                           const float* grads) {
  if (step_ > 0 || skipped_ > 0)
    throw std::logic_error("add_tensor('" + name + "'): registration closed at the first step");
  if (name.empty()) throw std::invalid_argument("add_tensor: empty tensor name");
  for (const auto& e : entries_)
    if (e->name == name) throw std::invalid_argument("add_tensor: duplicate tensor name '" + name + "'");
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->geo = Geometry::of(shape);
  if (e->geo.numel > 0 && (params == nullptr || grads == nullptr))
    throw std::invalid_argument("add_tensor('" + name + "'): null params or grads pointer");
  e->params = params;
  e->grads = grads;
  entries_.push_back(std::move(e));
  relabel();
}

void Optimizer::relabel() {
  std::vector<TensorDesc> descs;
  for (const auto& e : entries_) descs.push_back({e->name, e->geo.shape});
  const std::vector<Label> labels = opts_.rules.assign(descs);
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    const bool fresh = e.rule.m.empty() && e.mu.empty();
    if (fresh || e.label != labels[i]) {
      e.label = labels[i];
      e.reset_branch_state();
    }
  }
}

StepReport Optimizer::step() { return step_with_lr(opts_.schedule.at(step_)); }

StepReport Optimizer::step_with_lr(double lr) {
  StepReport rep;
  rep.lr = lr;
  if (!std::isfinite(lr)) throw std::invalid_argument("step: learning rate is not finite");
  // Scan gradients once: non-finite entries and per-label gradient norms.
  double gsq[3] = {};
  std::vector<int64_t> bad(entries_.size(), 0);
  for (size_t t = 0; t < entries_.size(); ++t) {
    const Entry& e = *entries_[t];
    if (e.label == Label::kFrozen) continue;
    int64_t nb = 0;
    double s = 0.0;
#pragma omp parallel for reduction(+ : nb, s) schedule(static) if (e.geo.numel > 65536)
    for (int64_t i = 0; i < e.geo.numel; ++i) {
      const float g = e.grads[i];
      if (std::isfinite(g)) s += static_cast<double>(g) * g;
      else ++nb;
    }
    bad[t] = nb;
    rep.nonfinite += nb;
    gsq[static_cast<int>(e.label)] += s;
  }
  for (int l = 0; l < 3; ++l) rep.grad_norm[l] = std::sqrt(gsq[l]);
  if (rep.nonfinite > 0) {
    if (opts_.nan_policy == NanPolicy::kError) {
      for (size_t t = 0; t < entries_.size(); ++t)
        if (bad[t])
          throw NonFiniteGradientError("non-finite gradient: " + std::to_string(bad[t]) +
                                       " entries of '" + entries_[t]->name +
                                       "' are NaN or Inf (step " + std::to_string(step_) + ")");
    }
    if (opts_.nan_policy == NanPolicy::kSkipStep) {
      ++skipped_;
      rep.skipped = true;
      rep.step = step_;
      return rep;
    }
  }
  double usq[3] = {};
  int64_t ucount[3] = {};
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    const int64_t n = e.geo.numel;
    if (e.label == Label::kFrozen || n == 0) continue;
    const float* g = e.grads;
    std::vector<float> clean;
    if (bad[t]) {  // NanPolicy::kZero
      clean.assign(g, g + n);
      for (float& v : clean)
        if (!std::isfinite(v)) v = 0.0f;
      g = clean.data();
    }
    e.scratch.resize(n);
    float* p = e.params;
    double sq = 0.0;
    if (e.label == Label::kCelo2) {
      if (opts_.use_reference)
        celo2_reference(opts_.rule, opts_.theta, e.geo, e.rule, g, p, e.scratch.data());
      else
        celo2_update(opts_.rule, opts_.theta, e.geo, e.rule, g, p, e.scratch.data(), ws_);
      const float flr = static_cast<float>(lr), wd = static_cast<float>(opts_.weight_decay);
      const float* u = e.scratch.data();
#pragma omp parallel for simd reduction(+ : sq) schedule(static) if (n > 65536)
      for (int64_t i = 0; i < n; ++i) {
        const float d = flr * (u[i] + wd * p[i]);
        p[i] -= d;
        sq += static_cast<double>(d) * d;
      }
    } else {
      std::memcpy(e.scratch.data(), p, n * sizeof(float));
      AdamWParams a;
      a.b1 = opts_.adam_b1;
      a.b2 = opts_.adam_b2;
      a.eps = opts_.adam_eps;
      a.lr = static_cast<float>(lr * opts_.mult_1d);
      a.wd = static_cast<float>(opts_.weight_decay);
      a.count = ++e.adam_count;
      if (opts_.use_reference) adamw_reference(a, n, p, g, e.mu.data(), e.nu.data());
      else adamw_update(a, n, p, g, e.mu.data(), e.nu.data());
      const float* old = e.scratch.data();
      for (int64_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(old[i]) - p[i];
        sq += d * d;
      }
    }
    usq[static_cast<int>(e.label)] += sq;
    ucount[static_cast<int>(e.label)] += n;
  }
  for (int l = 0; l < 3; ++l)
    rep.update_rms[l] = ucount[l] ? std::sqrt(usq[l] / static_cast<double>(ucount[l])) : 0.0;
  ++step_;
  rep.step = step_;
  return rep;
}

void Optimizer::set_theta(Theta theta) {
  theta.check_fits(opts_.rule);
  opts_.theta = std::move(theta);
}

void Optimizer::set_schedule(const Schedule& s) {
  s.validate();
  opts_.schedule = s;
}

void Optimizer::set_rules(const LabelRules& rules) {
  opts_.rules = rules;
  relabel();
}

std::string Optimizer::routing_table() const {
  std::ostringstream s;
  size_t w = 4;
  for (const auto& e : entries_) w = std::max(w, e->name.size());
  s << std::left << std::setw(static_cast<int>(w) + 2) << "name" << std::setw(20) << "shape"
    << std::setw(8) << "label" << std::right << std::setw(12) << "elements" << "\n";
  int64_t total[3] = {}, count[3] = {};
  for (const auto& e : entries_) {
    s << std::left << std::setw(static_cast<int>(w) + 2) << e->name << std::setw(20)
      << e->geo.shape_str() << std::setw(8) << label_name(e->label) << std::right
      << std::setw(12) << e->geo.numel << "\n";
    total[static_cast<int>(e->label)] += e->geo.numel;
    count[static_cast<int>(e->label)] += 1;
  }
  for (int l = 0; l < 3; ++l)
    s << "total " << label_name(static_cast<Label>(l)) << ": " << count[l] << " tensors, "
      << total[l] << " elements\n";
  return s.str();
}

// ---------------------------------------------------------------------------------------
// State checkpoints: {"celo2_state": payload, "sha256": hex of encode(payload)}.
// ---------------------------------------------------------------------------------------
namespace {

constexpr const char* kStateFormat = "celo2-optimizer-state/1";

flax::Value list_of_ints(const std::vector<int64_t>& v) {
  flax::Value out;
  out.kind = flax::Value::Kind::kList;
  for (int64_t x : v) out.list.push_back(flax::Value::of_int(x));
  return out;
}

std::vector<int64_t> with_lead(int64_t lead, const std::vector<int64_t>& shape) {
  std::vector<int64_t> s{lead};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

const flax::NdArray& expect_array(const flax::Value& m, const std::string& key,
                                  const std::string& where, int64_t numel) {
  const flax::NdArray& a = m.at(key).as_array();
  if (a.numel() != numel)
    throw flax::FormatError(where + "/" + key + ": expected " + std::to_string(numel) +
                            " elements, got " + std::to_string(a.numel()));
  for (float v : a.data)
    if (!std::isfinite(v)) throw flax::FormatError(where + "/" + key + ": non-finite value");
  return a;
}

}  // namespace

void Optimizer::save_state(const std::string& path) const {
  flax::Value payload = flax::Value::of_map();
  payload.map["format"] = flax::Value::of_string(kStateFormat);
  payload.map["step"] = flax::Value::of_int(step_);
  payload.map["skipped"] = flax::Value::of_int(skipped_);
  payload.map["theta_sha256"] = flax::Value::of_string(sha256_hex(theta_to_bytes(opts_.theta)));
  flax::Value tensors = flax::Value::of_map();
  for (const auto& ep : entries_) {
    const Entry& e = *ep;
    flax::Value t = flax::Value::of_map();
    t.map["shape"] = list_of_ints(e.geo.shape);
    t.map["label"] = flax::Value::of_string(label_name(e.label));
    if (e.label == Label::kCelo2) {
      t.map["iteration"] = flax::Value::of_int(e.rule.iteration);
      t.map["m"] = flax::Value::of_array(with_lead(kMom, e.geo.shape), e.rule.m);
      t.map["rms"] = flax::Value::of_array(with_lead(kRms, e.geo.shape), e.rule.rms);
      if (e.geo.factored) {
        t.map["v_row"] = flax::Value::of_array({kFac, e.geo.row_count}, e.rule.v_row);
        t.map["v_col"] = flax::Value::of_array({kFac, e.geo.col_count}, e.rule.v_col);
      } else {
        t.map["v_diag"] = flax::Value::of_array(with_lead(kFac, e.geo.shape), e.rule.v_diag);
      }
    } else if (e.label == Label::kAdamW) {
      t.map["count"] = flax::Value::of_int(e.adam_count);
      t.map["mu"] = flax::Value::of_array(e.geo.shape, e.mu);
      t.map["nu"] = flax::Value::of_array(e.geo.shape, e.nu);
    }
    tensors.map[e.name] = std::move(t);
  }
  payload.map["tensors"] = std::move(tensors);
  const std::vector<uint8_t> body = flax::encode(payload);
  flax::Value root = flax::Value::of_map();
  root.map["celo2_state"] = std::move(payload);
  root.map["sha256"] = flax::Value::of_string(sha256_hex(body));
  flax::write_file_atomic(path, flax::encode(root));
}

void Optimizer::load_state(const std::string& path) {
  const std::vector<uint8_t> bytes = flax::read_file(path);
  auto fail = [&](const std::string& m) -> void {
    throw flax::FormatError("optimizer state " + path + ": " + m);
  };
  flax::Value root;
  try {
    root = flax::decode(bytes);
  } catch (const flax::FormatError& e) {
    fail(std::string("not a celo2 checkpoint (") + e.what() + ")");
  }
  if (!root.is_map() || !root.find("celo2_state") || !root.find("sha256"))
    fail("not a celo2 optimizer checkpoint (no celo2_state/sha256)");
  const flax::Value& payload = root.at("celo2_state");
  if (sha256_hex(flax::encode(payload)) != root.at("sha256").as_string())
    fail("checksum mismatch: the file is corrupt");
  try {
    if (payload.at("format").as_string() != kStateFormat)
      fail("format '" + payload.at("format").as_string() + "', expected " + kStateFormat);
    const flax::Value& tensors = payload.at("tensors");
    if (tensors.map.size() != entries_.size())
      fail("holds " + std::to_string(tensors.map.size()) + " tensors, the optimizer has " +
           std::to_string(entries_.size()));
    // Build everything first; swap in only when every tensor validated.
    std::vector<Entry> staged;
    for (const auto& ep : entries_) {
      const Entry& e = *ep;
      const flax::Value* t = tensors.find(e.name);
      if (!t) fail("no state for tensor '" + e.name + "'");
      const std::string where = "tensors/" + e.name;
      std::vector<int64_t> shape;
      for (const auto& d : t->at("shape").list) shape.push_back(static_cast<int64_t>(d.as_number()));
      if (shape != e.geo.shape)
        fail(where + ": shape " + Geometry::of(shape).shape_str() + " in the file, " +
             e.geo.shape_str() + " registered");
      const Label label = parse_label(t->at("label").as_string());
      if (label != e.label)
        fail(where + ": labelled " + label_name(label) + " in the file, " + label_name(e.label) +
             " by the current rules");
      Entry s;
      s.label = label;
      s.geo = e.geo;
      if (label == Label::kCelo2) {
        s.rule.iteration = static_cast<int64_t>(t->at("iteration").as_number());
        s.rule.m = expect_array(*t, "m", where, kMom * e.geo.numel).data;
        s.rule.rms = expect_array(*t, "rms", where, kRms * e.geo.numel).data;
        if (e.geo.factored) {
          s.rule.v_row = expect_array(*t, "v_row", where, kFac * e.geo.row_count).data;
          s.rule.v_col = expect_array(*t, "v_col", where, kFac * e.geo.col_count).data;
        } else {
          s.rule.v_diag = expect_array(*t, "v_diag", where, kFac * e.geo.numel).data;
        }
      } else if (label == Label::kAdamW) {
        s.adam_count = static_cast<int64_t>(t->at("count").as_number());
        s.mu = expect_array(*t, "mu", where, e.geo.numel).data;
        s.nu = expect_array(*t, "nu", where, e.geo.numel).data;
      }
      staged.push_back(std::move(s));
    }
    const int64_t step = static_cast<int64_t>(payload.at("step").as_number());
    const int64_t skipped = static_cast<int64_t>(payload.at("skipped").as_number());
    if (step < 0 || skipped < 0) fail("negative step counter");
    for (size_t i = 0; i < entries_.size(); ++i) {
      entries_[i]->rule = std::move(staged[i].rule);
      entries_[i]->mu = std::move(staged[i].mu);
      entries_[i]->nu = std::move(staged[i].nu);
      entries_[i]->adam_count = staged[i].adam_count;
    }
    step_ = step;
    skipped_ = skipped;
  } catch (const flax::FormatError& e) {
    const std::string m = e.what();
    if (m.rfind("optimizer state ", 0) == 0) throw;
    fail(m);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
}

}  // namespace celo2
