// The CPU backends of the one engine (backend.h): the fast kernels and the reference.
#include <vector>

#include "backend.h"
#include "celo2/recipe.h"

namespace celo2 {
namespace {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  bool slice_phases() const override { return true; }
  void rule_whole(const RuleConfig& cfg, const Theta& theta, const Geometry& geo, RuleState& st,
                  const float* g, const float* p, float* u) override {
    celo2_update(cfg, theta, geo, st, g, p, u, ws_);
  }
  double adamw(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
               float* nu) override {
    return adamw_apply(a, n, p, g, mu, nu, /*reference=*/false, scratch_);
  }

 private:
  Workspace ws_;
  std::vector<float> scratch_;
};

class ReferenceBackend final : public Backend {
 public:
  const char* name() const override { return "reference"; }
  bool slice_phases() const override { return false; }
  void rule_whole(const RuleConfig& cfg, const Theta& theta, const Geometry& geo, RuleState& st,
                  const float* g, const float* p, float* u) override {
    celo2_reference(cfg, theta, geo, st, g, p, u);
  }
  double adamw(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
               float* nu) override {
    return adamw_apply(a, n, p, g, mu, nu, /*reference=*/true, scratch_);
  }

 private:
  std::vector<float> scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(bool reference) {
  if (reference) return std::make_unique<ReferenceBackend>();
  return std::make_unique<CpuBackend>();
}

}  // namespace celo2
