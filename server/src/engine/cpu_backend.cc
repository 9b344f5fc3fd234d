// The host backends of the one engine (backend.h): "cpu" (the fast kernels) and "reference"
// (the plain kernels), and the backend registry.
#include <cmath>
#include <cstring>
#include <map>
#include <stdexcept>
#include <mutex>

#include "backend.h"
#include "celo2/communicator.h"
#include "celo2/host_memory.h"
#include "celo2/lane_sum.h"
#include "celo2/recipe.h"

namespace celo2 {

SliceState SliceState::zeros(Label label, const Geometry& geo, int64_t len, int64_t plane) {
  SliceState s;
  if (label == Label::kCelo2) {
    s.rule = RuleState::zeros_for(geo, len, plane);
  } else if (label == Label::kAdamW) {
    s.mu.assign(len, 0.0f);
    s.nu.assign(len, 0.0f);
  }
  return s;
}

namespace {

class HostBackend : public Backend {
 public:
  explicit HostBackend(bool reference) : reference_(reference) {}
  const char* name() const override { return reference_ ? "reference" : "cpu"; }
  // Skewed planes (celo2/rule.h state_plane): both host backends' kernels take any stride.
  int64_t state_plane(int64_t len) const override { return celo2::state_plane(len); }

  // Zeroed, and on huge pages from 2 MiB up (celo2/host_memory.h alloc_host_floats): the state
  // planes, flat gradients and updates the rule's passes stream.
  float* alloc(int64_t n) override { return alloc_host_floats(n); }
  void release(float* p) noexcept override { free_host_floats(p); }
  void copy(float* dst, const float* src, int64_t n) override {
    if (n > 0 && dst != src) std::memcpy(dst, src, n * sizeof(float));
  }
  void to_host(float* host, const float* src, int64_t n) override { copy(host, src, n); }
  void from_host(float* dst, const float* host, int64_t n) override { copy(dst, host, n); }

  void scale(float* x, int64_t n, float s) override {
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
  }
  void grad_stats(const float* g, int64_t n, double* nonfinite, double* sumsq) override {
    finite_sumsq(g, n, nonfinite, sumsq);
  }
  void zero_nonfinite(float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(x[i])) x[i] = 0.0f;
  }
  double apply(float lr, float wd, int64_t n, float* p, const float* u) override {
    return apply_update(lr, wd, n, p, u);
  }  void store_lowp(DType d, uint16_t* dst, const float* src, int64_t n) override {
    celo2::store_lowp(d, dst, src, n);
  }
  int64_t reseed_master(DType d, float* master, const uint16_t* lowp, int64_t n) override {
    return celo2::reseed_master(d, master, lowp, n);
  }


  void set_state(size_t t, SliceState s) override {
    if (states_.size() <= t) states_.resize(t + 1);
    states_[t] = std::move(s);
  }
  SliceState get_state(size_t t) override { return t < states_.size() ? states_[t] : SliceState{}; }
  int64_t state_bytes() const override {
    int64_t f = 0;
    for (const SliceState& s : states_)
      f += static_cast<int64_t>(s.rule.m.capacity() + s.rule.rms.capacity() + s.rule.v_diag.capacity() +
                                s.rule.v_row.capacity() + s.rule.v_col.capacity() + s.mu.capacity() +
                                s.nu.capacity());
    return f * static_cast<int64_t>(sizeof(float));
  }
  bool slice_phases() const override { return !reference_; }
  SliceState* host_state(size_t t) override {
    if (reference_) return nullptr;  // the reference has no slice kernels
    return &states_.at(t);
  }

  void rule_whole(const RuleConfig& cfg, const Theta& theta, const std::vector<Whole>& tensors) override {
    for (const Whole& w : tensors) {
      RuleState& st = states_.at(w.t).rule;
      st.iteration = w.iteration - 1;  // the rule counts this update itself
      if (reference_) celo2_reference(cfg, theta, *w.geo, st, w.g, w.p, w.u);
      else celo2_update(cfg, theta, *w.geo, st, w.g, w.p, w.u, ws_);
    }
  }
  double adamw(size_t t, const AdamWParams& a, int64_t n, float* p, const float* g) override {
    SliceState& s = states_.at(t);
    return adamw_apply(a, n, p, g, s.mu.data(), s.nu.data(), reference_, scratch_);
  }

 private:
  bool reference_;
  std::vector<SliceState> states_;
  Workspace ws_;
  std::vector<float> scratch_;
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, std::function<std::unique_ptr<Backend>()>>& registry() {
  static std::map<std::string, std::function<std::unique_ptr<Backend>()>> r = {
      {"cpu", [] { return std::make_unique<HostBackend>(false); }},
      {"reference", [] { return std::make_unique<HostBackend>(true); }},
  };
  return r;
}

}  // namespace

void register_backend(const std::string& name, std::function<std::unique_ptr<Backend>()> factory) {
  std::lock_guard<std::mutex> l(registry_mutex());
  registry()[name] = std::move(factory);
}

std::vector<std::string> backend_names() {
  std::lock_guard<std::mutex> l(registry_mutex());
  std::vector<std::string> v;
  for (const auto& [k, f] : registry()) v.push_back(k);
  return v;
}

std::unique_ptr<Backend> make_backend(const std::string& name) {
  std::function<std::unique_ptr<Backend>()> f;
  {
    std::lock_guard<std::mutex> l(registry_mutex());
    auto it = registry().find(name);
    if (it != registry().end()) f = it->second;
  }
  if (!f) {
    std::string known;
    for (const std::string& k : backend_names()) known += (known.empty() ? "" : ", ") + k;
    throw UnsupportedError("backend '" + name + "' is not available in this build (" + known + ")");
  }
  return f();
}

}  // namespace celo2
