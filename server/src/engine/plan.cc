// The one planner (celo2/plan.h): the cuts of both plans, the flat plan's owners, the cost
// model they balance.
#include "celo2/plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "celo2/newton_schulz.h"
#include "celo2/rule.h"

namespace celo2 {

namespace {
int64_t overlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t* lo) {
  *lo = std::max(a0, b0);
  return std::max<int64_t>(0, std::min(a1, b1) - *lo);
}
}  // namespace

Plan parse_plan(const std::string& s) {
  if (s == "flat") return Plan::kFlat;
  if (s == "whole") return Plan::kWholeTensors;
  throw std::invalid_argument("plan: '" + s + "' is not one of flat, whole");
}

const char* plan_name(Plan p) { return p == Plan::kFlat ? "flat" : "whole"; }

double tensor_step_cost(const std::vector<int64_t>& shape, Label label, const RuleConfig& cfg) {
  constexpr double kBandwidth = 4e12, kGemm = 400e12;
  const Geometry g = Geometry::of(shape);
  switch (label) {
    case Label::kFrozen: return 0.0;
    case Label::kAdamW: return 28.0 * static_cast<double>(g.numel) / kBandwidth;
    case Label::kCelo2: break;
  }
  double t = 110.0 * static_cast<double>(g.numel) / kBandwidth;
  if (cfg.orthogonalize && g.factored && g.numel > 0)
    t += static_cast<double>(g.norm_groups) * newton_schulz_flops(cfg, g.mat_rows, g.mat_cols) / kGemm;
  return t;
}

// Engine memory per element of a rank's slice: its gradient and step slices (8 B) plus the
// optimizer state (celo2: m 3 + rms 1 floats; adamw: mu, nu).
double slice_bytes_per_element(Label label) {
  return label == Label::kCelo2 ? 24.0 : label == Label::kAdamW ? 16.0 : 8.0;
}

std::vector<int64_t> plan_cuts(const std::vector<PlanTensor>& tensors, int W, Plan plan) {
  if (W < 1) throw std::invalid_argument("plan_cuts: world size must be >= 1");
  int64_t total = 0;
  double total_cost = 0, total_bytes = 0;
  for (const PlanTensor& t : tensors) {
    total += t.numel;
    total_cost += t.cost;
    total_bytes += slice_bytes_per_element(t.label) * static_cast<double>(t.numel);
  }
  std::vector<int64_t> cuts(W + 1);
  for (int k = 0; k <= W; ++k) cuts[k] = total * k / W;
  if (plan == Plan::kFlat || W == 1 || total == 0) return cuts;
  // Two budgets, both a multiple `a` of the mean: modelled cost (time) and engine bytes
  // (memory). Greedy fill: each segment as long as both fit; a Celo2 tensor whole, an
  // element-wise tensor cut where a budget runs out. Feasibility is monotone in a segment's
  // extent, so the greedy fill uses the fewest segments, and the smallest feasible `a`
  // (binary search) minimizes the worse of the two max/mean ratios.
  const double mean_cost = std::max(total_cost / W, 1e-300), mean_bytes = total_bytes / W;
  auto fill = [&](double a, std::vector<int64_t>* out) {
    const double cap_c = a * mean_cost, cap_b = a * mean_bytes;
    std::vector<int64_t> c = {0};
    double acc_c = 0, acc_b = 0;
    int64_t at = 0;
    for (const PlanTensor& t : tensors) {
      if (t.numel == 0) continue;
      const double bpe = slice_bytes_per_element(t.label);
      if (t.label == Label::kCelo2) {
        const double tb = bpe * static_cast<double>(t.numel);
        if ((acc_c > 0 || acc_b > 0) && (acc_c + t.cost > cap_c || acc_b + tb > cap_b)) {
          c.push_back(at);
          acc_c = acc_b = 0;
        }
        acc_c += t.cost;
        acc_b += tb;
        at += t.numel;
        continue;
      }
      const double cpe = t.cost / static_cast<double>(t.numel);
      int64_t left = t.numel;
      while (left > 0) {
        int64_t fit = static_cast<int64_t>(std::floor((cap_b - acc_b) / bpe));
        if (cpe > 0) fit = std::min(fit, static_cast<int64_t>(std::floor((cap_c - acc_c) / cpe)));
        fit = std::max<int64_t>(fit, 0);
        if (fit >= left) {
          acc_c += cpe * static_cast<double>(left);
          acc_b += bpe * static_cast<double>(left);
          at += left;
          left = 0;
        } else {
          if (fit == 0 && acc_c == 0 && acc_b == 0) fit = 1;  // always progress
          at += fit;
          left -= fit;
          c.push_back(at);
          acc_c = acc_b = 0;
        }
      }
    }
    if (out) *out = c;
    return static_cast<int>(c.size());  // segments
  };
  double lo = 1.0, hi = static_cast<double>(W) + 1.0;
  while (fill(hi, nullptr) > W) hi *= 2;  // a single tensor larger than W means
  for (int it = 0; it < 60 && hi > lo * (1 + 1e-9); ++it) {
    const double mid = 0.5 * (lo + hi);
    (fill(mid, nullptr) <= W ? hi : lo) = mid;
  }
  std::vector<int64_t> c;
  fill(hi, &c);
  // Segments beyond the ones used are empty (at the end); cuts stay monotone.
  for (int k = 0; k <= W; ++k) cuts[k] = k < static_cast<int>(c.size()) ? c[k] : total;
  return cuts;
}

OwnerPlan plan_owners(const std::vector<std::pair<int64_t, int64_t>>& flat,
                      const std::vector<double>& cost, const std::vector<int64_t>& cuts) {
  const int W = static_cast<int>(cuts.size()) - 1;
  auto cut = [&](int k) { return cuts[k]; };
  std::vector<size_t> order(flat.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });
  double total_cost = 0, max_cost = 0;
  for (double c : cost) {
    total_cost += c;
    max_cost = std::max(max_cost, c);
  }
  constexpr double kOwnerSlack = 1.10;
  const double capacity = std::max(kOwnerSlack * total_cost / W, max_cost);
  OwnerPlan plan;
  plan.load.assign(W, 0.0);
  plan.owner.assign(flat.size(), 0);
  for (size_t idx : order) {
    // The ranks a matrix overlaps are consecutive: find them by the slice arithmetic.
    const int first = static_cast<int>(std::min<int64_t>(
        W - 1, std::upper_bound(cuts.begin(), cuts.end(), flat[idx].first) - cuts.begin() - 1));
    int best = -1;
    int64_t best_overlap = 0;
    for (int k = std::max(0, first - 1); k < W && cut(k) < flat[idx].second; ++k) {
      int64_t lo = 0;
      const int64_t ov = overlap(flat[idx].first, flat[idx].second, cut(k), cut(k + 1), &lo);
      if (ov > best_overlap && plan.load[k] + cost[idx] <= capacity) {
        best = k;
        best_overlap = ov;
      }
    }
    if (best < 0)
      best = static_cast<int>(std::min_element(plan.load.begin(), plan.load.end()) - plan.load.begin());
    plan.owner[idx] = best;
    plan.load[best] += cost[idx];
  }
  plan.imbalance = total_cost > 0
      ? *std::max_element(plan.load.begin(), plan.load.end()) / (total_cost / W)
      : 1.0;
  return plan;
}

}  // namespace celo2
