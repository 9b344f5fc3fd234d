// The one planner (celo2/plan.h): the cuts of both plans, the flat plan's owners, the cost
// model they balance.
#include "celo2/plan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <stdexcept>
#include <unordered_map>

#include "celo2/newton_schulz.h"
#include "celo2/rule.h"
#include "celo2/split_ns.h"

namespace celo2 {

namespace {
int64_t overlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t* lo) {
  *lo = std::max(a0, b0);
  return std::max<int64_t>(0, std::min(a1, b1) - *lo);
}

// Matrices of one shape are one kind: each matrix's kind (numbered in order of first
// appearance), how many each kind has, and its first matrix.
struct Kinds {
  std::vector<int> of, count;
  std::vector<size_t> first;
  explicit Kinds(const std::vector<NsMatrix>& mats) : of(mats.size()) {
    std::map<std::pair<int64_t, int64_t>, int> kind;
    for (size_t i = 0; i < mats.size(); ++i) {
      auto [it, fresh] = kind.emplace(std::make_pair(mats[i].rows, mats[i].cols), static_cast<int>(count.size()));
      if (fresh) {
        count.push_back(0);
        first.push_back(i);
      }
      of[i] = it->second;
      ++count[it->second];
    }
  }
};

// The lockstep area argument of ns_load_bound, shared with plan_ns: for each kind of matrix
// (count[s] of them) its time on a group of g ranks, t[s][g], g = 1..W.
struct GroupTimes {
  // time(i, g): matrix i's time on a group of g ranks (g = 1: alone).
  template <class Time>
  GroupTimes(const Kinds& k, int W, Time&& time) : count(k.count) {
    for (size_t s = 0; s < k.first.size(); ++s) {
      std::vector<double> tg(W + 1, 0.0);
      for (int g = 1; g <= W; ++g) tg[g] = time(k.first[s], g);
      total += count[s] * tg[1];
      shortest.push_back(*std::min_element(tg.begin() + 1, tg.end()));
      t.push_back(std::move(tg));
    }
  }
  std::vector<int> count;
  std::vector<std::vector<double>> t;
  std::vector<double> shortest;  // per kind, min over g of t(g)
  double total = 0;  // Σ count · t(1)
  // The group size per kind for a makespan T: the g with t(g) <= T that holds the least
  // rank-time g·t(g); false if some kind has none or the rank-time passes W·T.
  bool sizes(double T, int W, std::vector<int>* g_of = nullptr) const {
    double area = 0;
    if (g_of) g_of->assign(t.size(), 1);
    for (size_t s = 0; s < t.size(); ++s) {
      double best = std::numeric_limits<double>::infinity();
      for (int g = 1; g <= W; ++g)
        if (t[s][g] <= T && g * t[s][g] < best) {
          best = g * t[s][g];
          if (g_of) (*g_of)[s] = g;
        }
      if (!std::isfinite(best)) return false;
      area += count[s] * best;
    }
    return area <= W * T;
  }
  // sizes() refined by the ranks that a long matrix keeps to itself: a matrix whose time alone
  // t(1) leaves less than any other matrix's shortest time d = min_g t(g) under T shares its
  // rank with nothing when it runs alone; split (g >= 2), it holds the rank-time g·t(g). So T
  // needs Σ over such matrices of min(1 rank, least split rank-time / T) plus the others'
  // least rank-time / T to fit in W ranks (the ranks of the lone ones hold nothing else; the
  // rest hold every other piece). Without such matrices this is sizes()'s area test.
  bool fits(double T, int W) const {
    const size_t K = t.size();
    const std::vector<double>& d = shortest;
    double ranks = 0;
    for (size_t s = 0; s < K; ++s) {
      double other = count[s] >= 2 ? d[s] : std::numeric_limits<double>::infinity();
      for (size_t u = 0; u < K; ++u)
        if (u != s) other = std::min(other, d[u]);
      double area = std::numeric_limits<double>::infinity(), split = area;  // least g·t(g) with t(g) <= T
      for (int g = 1; g <= W; ++g)
        if (t[s][g] <= T) {
          area = std::min(area, g * t[s][g]);
          if (g >= 2) split = std::min(split, g * t[s][g]);
        }
      if (!std::isfinite(area)) return false;
      const bool lone = t[s][1] <= T && t[s][1] + other > T;
      ranks += count[s] * (lone ? std::min(1.0, split / T) : area / T);
    }
    return ranks <= W * (1 + 1e-12);
  }
  // The least T that passes `test` (sizes or fits; binary search; everything on one rank,
  // T = total, always passes). lower: the largest T found to fail (a bound from below), else
  // the least found to pass.
  template <class Test>
  double least_makespan(int W, bool lower, Test test) const {
    double lo = total / W, hi = total;
    if (test(lo)) return lo;
    for (int it = 0; it < 200 && hi > lo * (1 + 1e-12); ++it) {
      const double mid = 0.5 * (lo + hi);
      (test(mid) ? hi : lo) = mid;
    }
    return lower ? lo : hi;
  }
  double least_makespan(int W, bool lower) const {
    return least_makespan(W, lower, [&](double T) { return sizes(T, W); });
  }
};
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

NsCostModel NsCostModel::cpu() { return NsCostModel{}; }

NsCostModel NsCostModel::h200() {
  NsCostModel m;
  m.gemm_flops = 400e12;      // TF32 / float32-accumulate GEMMs
  m.bus_bytes = 360e9;        // NVLink all-reduce bus bandwidth
  m.bus_bytes_inter = 50e9;   // InfiniBand, 400 Gb/s per GPU
  m.ranks_per_node = 8;
  m.latency = 15e-6;
  m.group_bytes_share = 0.05;
  return m;
}

double ns_time(const RuleConfig& cfg, const NsCostModel& model, int64_t rows, int64_t cols, int g,
               bool split_poly) {
  if (g <= 1) return newton_schulz_flops(cfg, rows, cols) / model.gemm_flops;
  const double r = static_cast<double>(std::min(rows, cols)), c = static_cast<double>(std::max(rows, cols));
  // The busiest member's block: ceil(c / g) columns (NsBlock's cuts).
  const double flops = split_ns_flops(cfg, r, std::ceil(c / g), g, split_poly);
  const SplitNsCost sc = split_ns_cost(cfg, std::min(rows, cols), g, split_poly);
  const double bw = g <= model.ranks_per_node ? model.bus_bytes : model.bus_bytes_inter;
  return flops / model.gemm_flops + sc.bytes_per_rank / bw + sc.calls() * model.latency;
}

bool ns_split_poly(const RuleConfig& cfg, const NsCostModel& model, int64_t rows, int64_t cols, int g,
                   int force_poly) {
  if (g <= 1 || force_poly == 0) return false;
  if (force_poly >= 1) return true;
  // Only where the model's gain is larger than its error (as kMinGain below): on 2 ranks of
  // this project's 2-core machine a modelled 10 % gain did not show (docs/PERF.md).
  constexpr double kMinPolyGain = 1.10;
  return ns_time(cfg, model, rows, cols, g, true) * kMinPolyGain < ns_time(cfg, model, rows, cols, g, false);
}

int parse_split_poly(const std::string& s) {
  if (s == "auto") return -1;
  if (s == "on") return 1;
  if (s == "off") return 0;
  throw std::invalid_argument("split polynomial: expected auto, on or off, got '" + s + "'");
}

int parse_split_apply(const std::string& s) {
  if (s == "auto") return -1;
  if (s == "product") return 1;
  if (s == "polynomial") return 0;
  throw std::invalid_argument("split apply: expected auto, product or polynomial, got '" + s + "'");
}

namespace {

// plan_ns's search: one packing (pack) of nominal group sizes, and three ways to propose
// sizes (doublings, the bound's sizes, mixed sizes within a kind), each keeping the best
// packing seen in `best` / `best_g`.
class NsPlanner {
 public:
  NsPlanner(const std::vector<NsMatrix>& mats, const std::vector<int64_t>& cuts, const RuleConfig& cfg,
            const NsCostModel& model, int force, int force_poly)
      : mats_(mats), cuts_(cuts), cfg_(cfg), model_(model), force_(force), force_poly_(force_poly),
        W_(static_cast<int>(cuts.size()) - 1), n_(mats.size()), t1_(n_) {
    if (W_ < 1) throw std::invalid_argument("plan_ns: no ranks");
    if (force < 0) throw std::invalid_argument("plan_ns: negative group size " + std::to_string(force));
    double total1 = 0;
    for (size_t i = 0; i < n_; ++i) total1 += t1_[i] = ns_time(cfg, model, mats[i].rows, mats[i].cols, 1);
    mean_ = total1 / W_;
    // The bytes splits may add on any rank (NsCostModel::group_bytes_share of what ZeRO-1
    // sends per step: a reduce-scatter of the gradients and an all-gather of the parameters,
    // 2 · 4N (W−1)/W); none when the share is 0.
    byte_budget_ = model.group_bytes_share > 0
                       ? model.group_bytes_share * 2.0 * 4.0 * static_cast<double>(cuts[W_]) * (W_ - 1) / W_
                       : std::numeric_limits<double>::infinity();
  }

  OwnerPlan run() {
    best_g_.assign(n_, force_ >= 2 ? std::min(force_, W_) : 1);
    best_ = pack(best_g_);
    const double unsplit = force_ >= 2 ? pack(std::vector<int>(n_, 1)).imbalance : best_.imbalance;
    if (force_ == 0 && W_ > 1) {
      try_doublings();
      const Kinds kinds(mats_);
      // Distinct starts only: where the doublings changed nothing their best is no splits.
      std::vector<std::vector<int>> starts = {best_g_};
      add_start(&starts, std::vector<int>(n_, 1));
      try_bound_sizes(kinds, &starts);
      // The mixed search is local, so it runs from several starts: the doublings' best, no
      // splits at all, and each of the bound's candidates. (From the doublings' best alone it
      // stayed at 1.29 for GPT-3 XL on 64 ranks of the H200 model, where starting from no
      // splits finds 1.19: 8 qkv split in pairs; docs/DISTRIBUTED.md.)
      for (const std::vector<int>& from : starts) try_mixed_sizes(kinds, from);
    }
    // Splits stay only where they cut the busiest rank's modelled time by 10 % or more:
    // below that the model's error is larger than the gain (measured on a 2-core CPU: a
    // modelled 6 % gain at W = 2 was not visible within ±20 % run-to-run noise; docs/PERF.md).
    constexpr double kMinGain = 1.10;
    if (force_ == 0 && best_.imbalance * kMinGain > unsplit) best_ = pack(std::vector<int>(n_, 1));
    best_.imbalance_unsplit = unsplit;
    return std::move(best_);
  }

 private:
  // A matrix's way of forming the polynomial and per-rank time in a group of s, computed
  // once per (matrix, s): the packings ask for them many times.
  struct InGroup {
    double t;
    bool poly;
  };
  const InGroup& eval(size_t i, int s) {
    const int64_t key = static_cast<int64_t>(i) * (W_ + 1) + s;
    if (auto it = in_group_.find(key); it != in_group_.end()) return it->second;
    const bool poly = ns_split_poly(cfg_, model_, mats_[i].rows, mats_[i].cols, s, force_poly_);
    const double t = s <= 1 ? t1_[i] : ns_time(cfg_, model_, mats_[i].rows, mats_[i].cols, s, poly);
    return in_group_.emplace(key, InGroup{t, poly}).first->second;
  }
  bool poly_in(size_t i, int s) { return eval(i, s).poly; }
  double time_in(size_t i, int s) { return eval(i, s).t; }

  // Keeps p (with nominal sizes g) as the best if it fits the byte budget and beats the best.
  bool offer(OwnerPlan&& p, const std::vector<int>& g) {
    if (p.group_bytes_max > byte_budget_ || !(p.imbalance < best_.imbalance)) return false;
    best_ = std::move(p);
    best_g_ = g;
    return true;
  }

  // Places every matrix for nominal group sizes g, in the order the engine runs them (its
  // Newton–Schulz phase): first the groups, in split_order, each in lockstep (a group starts
  // when its last member is free, since every iteration's all-reduce waits for all of them,
  // and holds every member until its busiest member is done); then each rank's own matrices.
  // load[k] is rank k's modelled finish time. Groups go largest per-rank time first onto the
  // aligned block that frees first; single owners largest first, to the rank that already
  // holds most of the matrix unless that would pass 1.1x the balanced load, else to the rank
  // that frees first.
  OwnerPlan pack(const std::vector<int>& g) {
    const int W = W_;
    const size_t n = n_;
    OwnerPlan p;
    p.load.assign(W, 0.0);
    p.owner.assign(n, 0);
    p.group.assign(n, 1);
    p.split_poly.assign(n, 0);
    std::vector<char> alone(n, 0);  // a group whose block is one rank (the last, short one)
    std::vector<double> t(n);
    double work = 0, tmax = 0;
    for (size_t i = 0; i < n; ++i) {
      t[i] = time_in(i, g[i]);
      work += t[i] * g[i];
      tmax = std::max(tmax, t[i]);
    }
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return t[a] > t[b]; });
    for (size_t i : order) {
      if (g[i] <= 1) continue;
      int best_q = 0;
      double best_score = 0;
      for (int q = 0; q * g[i] < W; ++q) {
        const int a = q * g[i], b = std::min(W, a + g[i]);
        if (force_ >= 2 && q > 0 && b - a < g[i]) break;  // forced: full groups only
        const double start = *std::max_element(p.load.begin() + a, p.load.begin() + b);
        const double score = start + time_in(i, b - a);
        if (q == 0 || score < best_score) {
          best_q = q;
          best_score = score;
        }
      }
      const int a = best_q * g[i], b = std::min(W, a + g[i]);
      p.owner[i] = a;
      if (b - a <= 1) {  // a last block of one rank: an owner, placed with the others below
        alone[i] = 1;
        continue;
      }
      p.group[i] = g[i];
      p.split_poly[i] = poly_in(i, b - a);
      p.split_order.push_back(static_cast<int>(i));
      for (int k = a; k < b; ++k) p.load[k] = best_score;
    }
    constexpr double kOwnerSlack = 1.10;
    const double capacity = std::max(kOwnerSlack * work / W, tmax);
    for (size_t i : order) {
      if (g[i] > 1 && !alone[i]) continue;
      const int64_t lo_i = mats_[i].flat_lo, hi_i = lo_i + mats_[i].rows * mats_[i].cols;
      const double ti = time_in(i, 1);
      // The ranks a matrix overlaps are consecutive: find them by the slice arithmetic.
      const int first = static_cast<int>(
          std::min<int64_t>(W - 1, std::upper_bound(cuts_.begin(), cuts_.end(), lo_i) - cuts_.begin() - 1));
      int best = -1;
      int64_t best_overlap = 0;
      for (int k = std::max(0, first - 1); k < W && cuts_[k] < hi_i; ++k) {
        int64_t lo = 0;
        const int64_t ov = overlap(lo_i, hi_i, cuts_[k], cuts_[k + 1], &lo);
        if (ov > best_overlap && p.load[k] + ti <= capacity) {
          best = k;
          best_overlap = ov;
        }
      }
      if (best < 0) best = static_cast<int>(std::min_element(p.load.begin(), p.load.end()) - p.load.begin());
      p.owner[i] = best;
      p.load[best] += ti;
    }
    p.imbalance = mean_ > 0 ? *std::max_element(p.load.begin(), p.load.end()) / mean_ : 1.0;
    // The groups' collective bytes of the busiest rank (split_ns_cost, as counted).
    std::vector<double> bytes(W, 0.0);
    for (size_t i = 0; i < n; ++i) {
      const int s = std::min(p.group[i], W - p.owner[i]);
      if (s <= 1) continue;
      const double b =
          split_ns_cost(cfg_, std::min(mats_[i].rows, mats_[i].cols), s, p.split_poly[i] != 0).bytes_per_rank;
      for (int k = p.owner[i]; k < p.owner[i] + s; ++k) bytes[k] += b;
    }
    p.group_bytes_max = *std::max_element(bytes.begin(), bytes.end());
    return p;
  }

  // First candidates: while the largest per-rank times bound the step, the matrix with the
  // largest per-rank time doubles its group if that lowers its own time. A doubling that
  // would pass the byte budget is undone and that matrix keeps its group.
  void try_doublings() {
    std::vector<int> g = best_g_;
    std::vector<char> capped(n_, 0);
    for (int round = 0; round < 4096 && best_.imbalance > 1.1; ++round) {
      size_t pick = n_;
      for (size_t i = 0; i < n_; ++i)
        if (!capped[i] && g[i] * 2 <= W_ && time_in(i, g[i] * 2) < time_in(i, g[i]) &&
            (pick == n_ || time_in(i, g[i]) > time_in(pick, g[pick])))
          pick = i;
      if (pick == n_) break;  // no matrix gains from a larger group
      g[pick] *= 2;
      OwnerPlan p = pack(g);
      if (p.group_bytes_max > byte_budget_) {
        g[pick] /= 2;
        capped[pick] = 1;
        continue;
      }
      offer(std::move(p), g);
    }
  }

  static void add_start(std::vector<std::vector<int>>* starts, const std::vector<int>& g) {
    if (std::find(starts->begin(), starts->end(), g) == starts->end()) starts->push_back(g);
  }

  // Second candidates: the group sizes of ns_load_bound's area argument (with this plan's
  // own way of forming each polynomial), at its least makespan and a little above it
  // (packing loses some of it), any group size, not only doublings.
  // Each distinct candidate is also added to *starts (for try_mixed_sizes).
  void try_bound_sizes(const Kinds& kinds, std::vector<std::vector<int>>* starts) {
    if (best_.imbalance <= 1.1) return;
    const GroupTimes gt(kinds, W_, [this](size_t i, int s) { return time_in(i, s); });
    const double T = gt.least_makespan(W_, false);
    std::vector<int> g_of;
    for (double f : {1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0}) {
      if (!gt.sizes(T * f, W_, &g_of)) continue;
      std::vector<int> gs(n_);
      for (size_t i = 0; i < n_; ++i) gs[i] = g_of[kinds.of[i]];
      add_start(starts, gs);
      offer(pack(gs), gs);
    }
  }

  // Third candidates: mixed sizes within a kind. From the sizes `from`, the first k
  // matrices of one kind (k = 1 .. all) take another group size (1-6, 8, 10, 12 or 16); the
  // best change is kept, and the search repeats while it improves (one size per kind cannot
  // express, say, some matrices of a kind split in pairs beside whole ones). At most 48
  // values of k per kind and 4,000 packings per start, so that models with many shapes and
  // ranks plan in seconds (GPT-3 XL at 1,024 ranks: about 1 s for celo2-plan's table).
  void try_mixed_sizes(const Kinds& kinds, std::vector<int> from) {
    int packings = 0;
    constexpr int kMaxPackings = 4000;
    double from_imb = pack(from).imbalance;
    for (int round = 0; round < 4 && from_imb > 1.1 && packings < kMaxPackings; ++round) {
      OwnerPlan round_best;
      std::vector<int> round_g;
      double round_imb = from_imb;
      for (size_t kd = 0; kd < kinds.count.size(); ++kd)
        for (int gn : {1, 2, 3, 4, 5, 6, 8, 10, 12, 16}) {
          if (gn > W_) continue;
          std::vector<int> gs = from;
          const size_t count = static_cast<size_t>(kinds.count[kd]);
          const size_t step = std::max<size_t>(1, count / 48);
          for (size_t i = 0, k = 0; i < n_ && k < count; ++i) {
            if (kinds.of[i] != static_cast<int>(kd)) continue;
            ++k;
            if (gs[i] == gn) continue;
            gs[i] = gn;
            if ((k % step != 0 && k != count) || packings >= kMaxPackings) continue;
            ++packings;
            OwnerPlan p = pack(gs);
            if (p.group_bytes_max <= byte_budget_ && p.imbalance < round_imb * (1 - 1e-9)) {
              round_imb = p.imbalance;
              round_best = std::move(p);
              round_g = gs;
            }
          }
        }
      if (round_g.empty()) break;
      from = round_g;
      from_imb = round_imb;
      offer(std::move(round_best), round_g);
    }
  }

  const std::vector<NsMatrix>& mats_;
  const std::vector<int64_t>& cuts_;
  const RuleConfig& cfg_;
  const NsCostModel& model_;
  const int force_, force_poly_, W_;
  const size_t n_;
  std::vector<double> t1_;
  double mean_ = 0, byte_budget_ = 0;
  std::unordered_map<int64_t, InGroup> in_group_;
  OwnerPlan best_;
  std::vector<int> best_g_;  // the nominal group sizes of best_
};

}  // namespace

OwnerPlan plan_ns(const std::vector<NsMatrix>& mats, const std::vector<int64_t>& cuts, const RuleConfig& cfg,
                  const NsCostModel& model, int force, int force_poly) {
  return NsPlanner(mats, cuts, cfg, model, force, force_poly).run();
}

double ns_load_bound(const std::vector<NsMatrix>& mats, int W, const RuleConfig& cfg, const NsCostModel& model) {
  if (W < 1) throw std::invalid_argument("ns_load_bound: no ranks");
  const GroupTimes gt(Kinds(mats), W, [&](size_t i, int g) {
    const NsMatrix& m = mats[i];
    return g <= 1 ? ns_time(cfg, model, m.rows, m.cols, 1)
                  : std::min(ns_time(cfg, model, m.rows, m.cols, g, false), ns_time(cfg, model, m.rows, m.cols, g, true));
  });
  return gt.total > 0 ? gt.least_makespan(W, true, [&](double T) { return gt.fits(T, W); }) / (gt.total / W) : 1.0;
}

}  // namespace celo2
