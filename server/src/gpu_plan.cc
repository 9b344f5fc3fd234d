// The GPU engine's ownership and bucket plan (celo2/gpu_plan.h).
#include "celo2/gpu_plan.h"

#include <algorithm>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "celo2/config.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"

namespace celo2 {

double gpu_tensor_cost(const std::vector<int64_t>& shape) {
  const Geometry g = Geometry::of(shape);
  const double n = static_cast<double>(g.numel);
  // ≈ 110 bytes per element for the Celo2 phases (RuleSet::elementwise_bytes' model).
  double s = n * 110.0 / 4.0e12;
  if (g.ndim >= 2 && g.numel > 0)
    s += newton_schulz_flops(RuleConfig{}, g.mat_rows, g.mat_cols) *
         static_cast<double>(g.norm_groups) / 4.0e14;
  return s;
}

GpuPlan GpuPlan::build(const std::vector<GpuPlanTensor>& tensors, int world, int64_t bucket_bytes) {
  if (world < 1) throw std::invalid_argument("GpuPlan: world size must be >= 1");
  if (bucket_bytes < 4) throw std::invalid_argument("GpuPlan: bucket_bytes must be >= 4");
  const int n = static_cast<int>(tensors.size());
  GpuPlan p;
  p.world = world;
  p.owner.assign(n, 0);
  p.flat_offset.assign(n, -1);
  p.bucket_of.assign(n, -1);
  p.owned_elements.assign(world, 0);
  p.load.assign(world, 0.0);

  std::vector<double> cost(n);
  for (int i = 0; i < n; ++i) cost[i] = gpu_tensor_cost(tensors[i].shape);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return cost[a] > cost[b]; });
  for (int i : order) {
    const int r = static_cast<int>(std::min_element(p.load.begin(), p.load.end()) - p.load.begin());
    p.owner[i] = r;
    p.load[r] += cost[i];
  }
  const double total = std::accumulate(p.load.begin(), p.load.end(), 0.0);
  p.imbalance = total > 0 ? *std::max_element(p.load.begin(), p.load.end()) / (total / world) : 1.0;

  // Buckets per owner, in registration order.
  const int64_t cap = std::max<int64_t>(1, bucket_bytes / 4);
  std::vector<std::vector<GpuBucket>> per_rank(world);
  for (int i = 0; i < n; ++i) {
    const GpuPlanTensor& t = tensors[i];
    const int64_t numel = Geometry::of(t.shape).numel;
    if (t.label == Label::kFrozen || numel == 0) continue;
    auto& list = per_rank[p.owner[i]];
    const bool fits = !list.empty() && list.back().label == t.label &&
                      list.back().counter == t.counter && list.back().elements + numel <= cap;
    if (!fits) {
      GpuBucket b;
      b.owner = p.owner[i];
      b.label = t.label;
      b.counter = t.counter;
      list.push_back(std::move(b));
    }
    list.back().tensors.push_back(i);
    list.back().elements += numel;
  }
  // Flat offsets per owner; global order round-robin over owners.
  for (int r = 0; r < world; ++r) {
    int64_t off = 0;
    for (GpuBucket& b : per_rank[r]) {
      b.flat_offset = off;
      int64_t t_off = off;
      for (int i : b.tensors) {
        p.flat_offset[i] = t_off;
        t_off += Geometry::of(tensors[i].shape).numel;
      }
      off += b.elements;
    }
    p.owned_elements[r] = off;
  }
  for (size_t k = 0;; ++k) {
    bool any = false;
    for (int r = 0; r < world; ++r) {
      if (k >= per_rank[r].size()) continue;
      any = true;
      for (int i : per_rank[r][k].tensors) p.bucket_of[i] = static_cast<int>(p.buckets.size());
      p.buckets.push_back(std::move(per_rank[r][k]));
    }
    if (!any) break;
  }
  return p;
}

std::string GpuPlan::describe() const {
  std::ostringstream os;
  std::vector<int> ntensors(world, 0), nbuckets(world, 0);
  for (int o : owner) ntensors[o] += 1;
  for (const GpuBucket& b : buckets) nbuckets[b.owner] += 1;
  for (int r = 0; r < world; ++r)
    os << "rank " << r << ": " << ntensors[r] << " tensors, " << owned_elements[r]
       << " elements with state, " << nbuckets[r] << " buckets, modelled "
       << load[r] * 1e3 << " ms\n";
  os << "imbalance (max/mean modelled load): " << imbalance << "\n";
  return os.str();
}

}  // namespace celo2
