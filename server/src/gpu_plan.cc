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
  double s = static_cast<double>(g.numel) * 110.0 / 4.0e12;
  if (g.ndim >= 2 && g.numel > 0)
    s += newton_schulz_flops(RuleConfig{}, g.mat_rows, g.mat_cols) *
         static_cast<double>(g.norm_groups) / 4.0e14;
  return s;
}

double gpu_adamw_cost(int64_t elements) { return static_cast<double>(elements) * 28.0 / 4.0e12; }

GpuPlan GpuPlan::build(const std::vector<GpuPlanTensor>& tensors, int world, int64_t bucket_bytes) {
  if (world < 1) throw std::invalid_argument("GpuPlan: world size must be >= 1");
  if (bucket_bytes < 4) throw std::invalid_argument("GpuPlan: bucket_bytes must be >= 4");
  const int n = static_cast<int>(tensors.size());
  GpuPlan p;
  p.world = world;
  p.pieces_of.assign(n, {});
  p.owned_elements.assign(world, 0);
  p.load.assign(world, 0.0);

  std::vector<int64_t> numel(n);
  int64_t with_state = 0;
  for (int i = 0; i < n; ++i) {
    numel[i] = Geometry::of(tensors[i].shape).numel;
    if (tensors[i].label != Label::kFrozen) with_state += numel[i];
  }
  // Pieces: celo2 tensors whole; AdamW ones in near-equal parts of at most a quarter of the
  // balanced share (never below 64 Ki elements).
  const int64_t cap = std::max<int64_t>(int64_t{1} << 16, (with_state + 4 * world - 1) / (4 * world));
  std::vector<double> cost;
  for (int i = 0; i < n; ++i) {
    const GpuPlanTensor& t = tensors[i];
    if (t.label == Label::kFrozen || numel[i] == 0) continue;
    const int64_t k = t.label == Label::kAdamW ? (numel[i] + cap - 1) / cap : 1;
    for (int64_t j = 0; j < k; ++j) {
      GpuPiece pc;
      pc.tensor = i;
      pc.lo = numel[i] * j / k;
      pc.n = numel[i] * (j + 1) / k - pc.lo;
      p.pieces_of[i].push_back(static_cast<int>(p.pieces.size()));
      p.pieces.push_back(pc);
      cost.push_back(t.label == Label::kAdamW ? gpu_adamw_cost(pc.n) : gpu_tensor_cost(t.shape));
    }
  }
  const int np = static_cast<int>(p.pieces.size());
  std::vector<int> order(np);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return cost[a] > cost[b]; });
  for (int i : order) {
    const int r = static_cast<int>(std::min_element(p.load.begin(), p.load.end()) - p.load.begin());
    p.pieces[i].owner = r;
    p.load[r] += cost[i];
  }
  const double total = std::accumulate(p.load.begin(), p.load.end(), 0.0);
  p.imbalance = total > 0 ? *std::max_element(p.load.begin(), p.load.end()) / (total / world) : 1.0;

  // Buckets per owner, pieces in order.
  const int64_t bcap = std::max<int64_t>(1, bucket_bytes / 4);
  std::vector<std::vector<GpuBucket>> per_rank(world);
  for (int k = 0; k < np; ++k) {
    const GpuPiece& pc = p.pieces[k];
    const GpuPlanTensor& t = tensors[pc.tensor];
    auto& list = per_rank[pc.owner];
    const bool fits = !list.empty() && list.back().label == t.label &&
                      list.back().counter == t.counter && list.back().elements + pc.n <= bcap;
    if (!fits) {
      GpuBucket b;
      b.owner = pc.owner;
      b.label = t.label;
      b.counter = t.counter;
      list.push_back(std::move(b));
    }
    list.back().pieces.push_back(k);
    list.back().elements += pc.n;
  }
  for (int r = 0; r < world; ++r) {
    int64_t off = 0;
    for (GpuBucket& b : per_rank[r]) {
      b.flat_offset = off;
      for (int k : b.pieces) {
        p.pieces[k].flat_offset = off;
        off += p.pieces[k].n;
      }
    }
    p.owned_elements[r] = off;
  }
  for (size_t k = 0;; ++k) {  // round-robin over owners
    bool any = false;
    for (int r = 0; r < world; ++r) {
      if (k >= per_rank[r].size()) continue;
      any = true;
      for (int pc : per_rank[r][k].pieces) p.pieces[pc].bucket = static_cast<int>(p.buckets.size());
      p.buckets.push_back(std::move(per_rank[r][k]));
    }
    if (!any) break;
  }
  return p;
}

int GpuPlan::owner_of(size_t tensor) const {
  const auto& v = pieces_of.at(tensor);
  return v.empty() ? -1 : pieces[v.front()].owner;
}

bool GpuPlan::same_placement(const GpuPlan& o, size_t tensor) const {
  if (tensor >= pieces_of.size() || tensor >= o.pieces_of.size()) return false;
  const auto &a = pieces_of[tensor], &b = o.pieces_of[tensor];
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k)
    if (!(pieces[a[k]] == o.pieces[b[k]])) return false;
  return true;
}

std::string GpuPlan::describe() const {
  std::ostringstream os;
  std::vector<int> npieces(world, 0), nbuckets(world, 0);
  for (const GpuPiece& pc : pieces) npieces[pc.owner] += 1;
  for (const GpuBucket& b : buckets) nbuckets[b.owner] += 1;
  for (int r = 0; r < world; ++r)
    os << "rank " << r << ": " << npieces[r] << " pieces, " << owned_elements[r]
       << " elements with state, " << nbuckets[r] << " buckets, modelled " << load[r] * 1e3
       << " ms\n";
  os << "imbalance (max/mean modelled load): " << imbalance << "\n";
  return os.str();
}

}  // namespace celo2
