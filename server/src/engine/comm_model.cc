// The communication model (comm_model.h).
#include "celo2/comm_model.h"

#include <algorithm>

#include "celo2/plan.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"
#include "celo2/split_ns.h"

namespace celo2 {

CommModel model_step(const std::vector<ModelTensor>& tensors, const RuleConfig& cfg, int W,
                     bool gather_params, int ns_split, const NsCostModel& ns_model, int ns_split_poly) {
  CommModel m;
  m.world = W;
  const double f = W > 1 ? static_cast<double>(W - 1) / W : 0.0;
  auto all_reduce = [&](double doubles) { return 2.0 * f * 8.0 * doubles; };
  int64_t N = 0;
  double stats = 0, sq = 0, small = 0;  // doubles in each all-reduce
  std::vector<NsMatrix> mats;
  for (const ModelTensor& t : tensors) {
    const Geometry g = Geometry::of(t.shape);
    if (t.label == Label::kCelo2 && g.numel > 0) {
      stats += (g.factored ? g.row_count + g.col_count : 0) + 1;
      if (cfg.normalize_input) sq += static_cast<double>(g.norm_groups) * g.channels();
      const bool ns = cfg.orthogonalize && g.factored;
      small += 1 + (ns ? 0 : g.norm_groups);
      if (ns)
        for (int64_t k = 0; k < g.norm_groups; ++k) mats.push_back({N + k * g.norm_size, g.mat_rows, g.mat_cols});
    }
    N += g.numel;
  }
  m.elements = N;
  m.ns_matrices = static_cast<int64_t>(mats.size());
  const double bytesN = 4.0 * static_cast<double>(N);
  // the gradient statistics: non-finite count, per-label sums of squares, re-seeded masters
  m.bytes["grads"] = f * bytesN + all_reduce(5);
  m.bytes["stats_reduce"] = all_reduce(stats);
  m.bytes["features"] = cfg.normalize_input ? all_reduce(sq) : 0.0;
  m.bytes["mlp"] = all_reduce(small);
  // All-to-all: what of each member's block lies outside its slice, averaged over ranks;
  // the groups' all-reduces (split_ns_cost, as the communicators count them).
  double moved = 0, ns_elems = 0, group_bytes = 0;
  if (!mats.empty()) {
    std::vector<int64_t> cuts(W + 1);
    for (int k = 0; k <= W; ++k) cuts[k] = N * k / W;
    const OwnerPlan plan = plan_ns(mats, cuts, cfg, ns_model, ns_split, ns_split_poly);
    m.ns_imbalance = plan.imbalance;
    m.ns_imbalance_unsplit = plan.imbalance_unsplit;
    m.ns_imbalance_bound = ns_load_bound(mats, W, cfg, ns_model);
    m.ns_max_seconds = *std::max_element(plan.load.begin(), plan.load.end());
    std::vector<int> rank_calls(W, 0);
    for (size_t i = 0; i < mats.size(); ++i) {
      const int o = plan.owner[i], s = std::min(plan.group[i], W - o);
      for (int j = 0; j < s; ++j) {
        const NsBlock b{mats[i].flat_lo, mats[i].rows, mats[i].cols, s, j};
        moved += static_cast<double>(b.numel() - b.count_in(cuts[o + j], cuts[o + j + 1]));
      }
      ns_elems += static_cast<double>(mats[i].rows * mats[i].cols);
      if (s > 1) {
        const SplitNsCost sc = split_ns_cost(cfg, std::min(mats[i].rows, mats[i].cols), s, plan.split_poly[i] != 0);
        m.ns_split_poly += plan.split_poly[i] != 0;
        ++m.ns_split;
        m.ns_group_max = std::max(m.ns_group_max, s);
        group_bytes += s * sc.bytes_per_rank;
        for (int j = 0; j < s; ++j) rank_calls[o + j] += sc.calls();
      }
    }
    m.ns_group_bytes_max = plan.group_bytes_max;
    m.ns_group_bytes_mean = group_bytes / W;
    m.ns_group_calls_max = *std::max_element(rank_calls.begin(), rank_calls.end());
  }
  const bool merged = gather_params && !cfg.precondition_output;
  const double a2a = 4.0 * moved / W;
  m.a2a_no_locality = 4.0 * ns_elems * f;
  const double sums = cfg.normalize_output && (!merged || m.ns_split > 0) ? all_reduce(static_cast<double>(mats.size())) : 0.0;
  m.bytes["newton_schulz"] = mats.empty() ? 0.0 : (merged ? a2a : 2.0 * a2a) + sums + group_bytes / W;
  // the gate on non-finite updates (one count), then the update RMS sums
  m.bytes["apply"] = all_reduce(1) + all_reduce(3);
  m.bytes["gather"] = gather_params ? f * bytesN : 0.0;
  for (const auto& [k, v] : m.bytes) m.celo2 += v;
  m.zero1_adamw = 2.0 * f * bytesN;
  // Layer-wise: each tensor reduced to and broadcast from one owner (greedy by size): each
  // rank sends about the tensor's bytes once in the reduce and once in the broadcast.
  m.layerwise = W > 1 ? 2.0 * bytesN * f : 0.0;
  std::vector<int64_t> sizes;
  for (const ModelTensor& t : tensors) sizes.push_back(Geometry::of(t.shape).numel);
  std::sort(sizes.rbegin(), sizes.rend());
  std::vector<int64_t> load(W, 0);
  for (int64_t s : sizes) *std::min_element(load.begin(), load.end()) += s;
  m.layerwise_state_imbalance =
      N > 0 ? static_cast<double>(*std::max_element(load.begin(), load.end())) / (static_cast<double>(N) / W) : 1.0;
  return m;
}

std::vector<ModelTensor> gpt_tensors(int layers, int64_t d, int64_t ffn, int64_t vocab,
                                     int64_t context) {
  std::vector<ModelTensor> t;
  t.push_back({"embed/tokens", {vocab, d}, Label::kAdamW});
  t.push_back({"embed/positions", {context, d}, Label::kAdamW});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    t.push_back({p + "ln1.weight", {d}, Label::kAdamW});
    t.push_back({p + "ln1.bias", {d}, Label::kAdamW});
    t.push_back({p + "attn.qkv.weight", {d, 3 * d}, Label::kCelo2});
    t.push_back({p + "attn.qkv.bias", {3 * d}, Label::kAdamW});
    t.push_back({p + "attn.proj.weight", {d, d}, Label::kCelo2});
    t.push_back({p + "attn.proj.bias", {d}, Label::kAdamW});
    t.push_back({p + "ln2.weight", {d}, Label::kAdamW});
    t.push_back({p + "ln2.bias", {d}, Label::kAdamW});
    t.push_back({p + "mlp.fc1.weight", {d, ffn}, Label::kCelo2});
    t.push_back({p + "mlp.fc1.bias", {ffn}, Label::kAdamW});
    t.push_back({p + "mlp.fc2.weight", {ffn, d}, Label::kCelo2});
    t.push_back({p + "mlp.fc2.bias", {d}, Label::kAdamW});
  }
  t.push_back({"ln_f.weight", {d}, Label::kAdamW});
  t.push_back({"ln_f.bias", {d}, Label::kAdamW});
  return t;
}

}  // namespace celo2
