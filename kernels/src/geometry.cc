// Geometry of a tensor for the rule: factored axes (spec §2), normalization groups (§3.6)
// and Newton–Schulz matrices (§3.9); StepConstants; RuleState allocation.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "celo2/rule.h"

namespace celo2 {

Geometry Geometry::of(std::span<const int64_t> shape) {
  Geometry g;
  if (shape.size() > static_cast<size_t>(kMaxDims))
    throw std::invalid_argument("tensors of more than " + std::to_string(kMaxDims) +
                                " dimensions are not supported");
  g.shape.assign(shape.begin(), shape.end());
  g.ndim = static_cast<int>(shape.size());
  g.numel = 1;
  for (int64_t s : shape) {
    if (s < 0) throw std::invalid_argument("negative dimension in shape " + g.shape_str());
    if (s > 0 && g.numel > (int64_t{1} << 40) / s)
      throw std::invalid_argument("shape " + g.shape_str() + " is too large");
    g.numel *= s;
  }
  const int n = g.ndim;
  auto product_except = [&](int a, int b) {
    int64_t p = 1;
    for (int ax = 0; ax < n; ++ax)
      if (ax != a && ax != b) p *= shape[ax];
    return p;
  };
  if (n >= 2) {
    g.factored = true;
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return shape[a] < shape[b]; });
    g.d0 = order[n - 1];
    g.d1 = order[n - 2];
    g.row_count = product_except(g.d0, -1);
    g.col_count = product_except(g.d1, -1);
    g.rest_count = product_except(g.d0, g.d1);
    // Strides of every axis in the row space (shape without d0) and col space (without d1).
    int64_t rs = 1, cs = 1;
    for (int ax = n - 1; ax >= 0; --ax) {
      if (ax != g.d0) { g.row_step[ax] = rs; rs *= shape[ax]; }
      if (ax != g.d1) { g.col_step[ax] = cs; cs *= shape[ax]; }
    }
    // In the row space, d1 sits at position d1' with stride row_step[d1].
    g.rest_of_row_mod = g.row_step[g.d1];
    g.rest_of_row_len = shape[g.d1];
    g.rest_of_row_div = g.row_step[g.d1] * shape[g.d1];
    g.mat_rows = shape[n - 2];
    g.mat_cols = shape[n - 1];
    g.norm_size = g.mat_rows * g.mat_cols;
  } else {
    g.norm_size = n == 1 ? shape[0] : 1;
  }
  g.norm_groups = g.norm_size == 0 ? 0 : g.numel / g.norm_size;
  return g;
}

int64_t Geometry::row_index(int64_t i) const {
  int64_t r = 0;
  for (int ax = ndim - 1; ax >= 0; --ax) {
    r += (i % shape[ax]) * row_step[ax];
    i /= shape[ax];
  }
  return r;
}

int64_t Geometry::col_index(int64_t i) const {
  int64_t c = 0;
  for (int ax = ndim - 1; ax >= 0; --ax) {
    c += (i % shape[ax]) * col_step[ax];
    i /= shape[ax];
  }
  return c;
}

int64_t Geometry::rest_index_of_row(int64_t r) const {
  return (r / rest_of_row_div) * rest_of_row_mod + r % rest_of_row_mod;
}

std::string Geometry::shape_str() const { return format_shape(shape); }

int64_t state_plane(int64_t n) {
  constexpr int64_t kMin = 4096, kSkew = 1024 + 16;
  return n < kMin ? n : (n + 15) / 16 * 16 + kSkew;
}

RuleState RuleState::zeros(const Geometry& geo, bool packed) {
  return zeros_for(geo, geo.numel, packed ? 0 : state_plane(geo.numel));
}

RuleState RuleState::zeros_for(const Geometry& geo, int64_t len, int64_t plane) {
  if (plane < 0 || (plane > 0 && plane < len))
    throw std::invalid_argument("RuleState: plane stride " + std::to_string(plane) + " below the " +
                                std::to_string(len) + " elements it holds");
  RuleState s;
  s.plane = plane;
  const int64_t P = s.stride(len);
  assign_huge(s.m, static_cast<size_t>(kMom * P));
  assign_huge(s.rms, static_cast<size_t>(kRms * P));
  if (geo.factored) {
    s.v_row.assign(static_cast<size_t>(kFac * geo.row_count), 0.0f);
    s.v_col.assign(static_cast<size_t>(kFac * geo.col_count), 0.0f);
  } else {
    assign_huge(s.v_diag, static_cast<size_t>(kFac * P));
  }
  return s;
}

void RuleState::point(Slice& s, int64_t len, int64_t at) {
  s.m = m.data() + at;
  s.rms = rms.data() + at;
  s.v_diag = v_diag.empty() ? nullptr : v_diag.data() + at;
  s.plane = stride(len);
}

StepConstants StepConstants::of(const RuleConfig& cfg, int64_t iteration) {
  StepConstants sc;
  auto clip01 = [](float b) { return std::clamp(b, 0.0f, 1.0f); };
  auto correction = [&](float b) {
    // 1 / (1 - b^t); b = 1 would divide by zero, as in the original: keep it finite.
    const double denom = 1.0 - std::pow(static_cast<double>(b), static_cast<double>(iteration));
    return denom > 0.0 ? static_cast<float>(1.0 / denom) : 1.0f;
  };
  for (int k = 0; k < kMom; ++k) sc.mom[k] = clip01(cfg.mom_decays[k]);
  for (int k = 0; k < kRms; ++k) sc.rms[k] = clip01(cfg.rms_decays[k]);
  for (int k = 0; k < kFac; ++k) sc.fac[k] = clip01(cfg.fac_decays[k]);
  if (cfg.bias_correction) {
    for (int k = 0; k < kMom; ++k) sc.bc_mom[k] = correction(sc.mom[k]);
    for (int k = 0; k < kRms; ++k) sc.bc_rms[k] = correction(sc.rms[k]);
    for (int k = 0; k < kFac; ++k) sc.bc_fac[k] = correction(sc.fac[k]);
  }
  return sc;
}

}  // namespace celo2
