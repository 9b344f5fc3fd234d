// AdamW, reference and fused. The fused loop reads g, p, μ, ν and writes p, μ, ν once
// (28 bytes per element): it is memory-bound, the yardstick Celo2's cost is measured by.
#include <cmath>

#include "celo2/adamw.h"
#include "celo2/lane_sum.h"

namespace celo2 {

void adamw_reference(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                     float* nu) {
  const double c1 = 1.0 - std::pow(static_cast<double>(a.b1), static_cast<double>(a.count));
  const double c2 = 1.0 - std::pow(static_cast<double>(a.b2), static_cast<double>(a.count));
  for (int64_t i = 0; i < n; ++i) {
    mu[i] = static_cast<float>(a.b1 * static_cast<double>(mu[i]) + (1.0 - a.b1) * g[i]);
    nu[i] = static_cast<float>(a.b2 * static_cast<double>(nu[i]) +
                               (1.0 - a.b2) * static_cast<double>(g[i]) * g[i]);
    const double mh = mu[i] / c1, vh = nu[i] / c2;
    p[i] = static_cast<float>(p[i] - a.lr * (mh / (std::sqrt(vh) + a.eps) + a.wd * p[i]));
  }
}

namespace {
// The fused update of one element, the constants of one call.
struct AdamWStep {
  float b1, b2, eps, lr, wd, ic1, ic2;
  explicit AdamWStep(const AdamWParams& a)
      : b1(a.b1), b2(a.b2), eps(a.eps), lr(a.lr), wd(a.wd),
        ic1(static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(a.b1), static_cast<double>(a.count))))),
        ic2(static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(a.b2), static_cast<double>(a.count))))) {}
  // Updates mu, nu and returns the new parameter.
  float operator()(float p, float gi, float& mu, float& nu) const {
    const float m = b1 * mu + (1.0f - b1) * gi;
    const float v = b2 * nu + (1.0f - b2) * gi * gi;
    mu = m;
    nu = v;
    return p - lr * ((m * ic1) / (std::sqrt(v * ic2) + eps) + wd * p);
  }
};
}  // namespace

void adamw_update(const AdamWParams& a, int64_t n, float* __restrict p, const float* __restrict g,
                  float* __restrict mu, float* __restrict nu) {
  const AdamWStep st(a);
  auto one = [&](int64_t i) { p[i] = st(p[i], g[i], mu[i], nu[i]); };
  if (n > 32768) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) one(i);
  } else {  // no OpenMP region for small tensors (an `if` clause still enters one)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) one(i);
  }
}

double adamw_update_sumsq(const AdamWParams& a, int64_t n, float* __restrict p, const float* __restrict g,
                          float* __restrict mu, float* __restrict nu) {
  const AdamWStep st(a);
  return lane_sum(n, [&](int64_t i) {
    const float old = p[i];
    p[i] = st(old, g[i], mu[i], nu[i]);
    const double d = static_cast<double>(old) - p[i];
    return d * d;
  });
}

}  // namespace celo2
