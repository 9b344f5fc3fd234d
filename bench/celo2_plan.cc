// celo2-plan: the communication model of a sharded Celo2 step (comm_model.h) for a
// GPT-shaped model on several world sizes, against ZeRO-1 AdamW and the layer-wise layout.
// Default: GPT-3 XL (24 layers, d = 2048, FFN 8192, vocab 50257, context 2048).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <string>

#include "celo2/comm_model.h"
#include "celo2/newton_schulz.h"
#include "celo2/plan.h"
#include "celo2/rule.h"

int main(int argc, char** argv) {
  CLI::App app{"celo2-plan: bytes per rank per step of the sharded Celo2 engine"};
  int layers = 24;
  int64_t d = 2048, ffn = 8192, vocab = 50257, ctx = 2048;
  std::vector<int> worlds = {8, 64, 512};
  bool base = false;
  bool split = false;
  std::string ns_model = "cpu", split_poly = "auto";
  double bytes_share = -1;
  double gemm_tflops = 400, nvlink_gbs = 360, ib_gbs = 50, latency_us = 15, node = 8;
  double batch_tokens = 1 << 20, mfu = 0.4, peak_tflops = 989;
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--d", d)->capture_default_str();
  app.add_option("--ffn", ffn)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  app.add_option("--context", ctx)->capture_default_str();
  app.add_option("--world", worlds, "world sizes")->capture_default_str();
  app.add_flag("--base", base, "Celo2-base (no Newton–Schulz)");
  app.add_option("--ns-model", ns_model,
                 "Newton-Schulz cost model of the owner plan in the first table: cpu (what the CPU engine plans "
                 "with) or h200 (the GPU one, as --split)")
      ->check(CLI::IsMember({"cpu", "h200"}))
      ->capture_default_str();
  app.add_flag("--split", split, "also model Newton–Schulz split over groups of ranks (celo2/split_ns.h)");
  app.add_option("--ns-split-poly", split_poly,
                 "how a group forms the polynomial: auto (by cost, as the engine), on (split by rows), off (every member)")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app.add_option("--group-bytes-share", bytes_share,
                 "the first table's limit on the bytes splits add per rank, as a share of ZeRO-1's (0: none; "
                 "default: the cost model's own, cpu 0, h200 0.05)");
  app.add_option("--gemm-tflops", gemm_tflops, "--split: float32/TF32 GEMM rate per GPU")->capture_default_str();
  app.add_option("--nvlink-gbs", nvlink_gbs, "--split: all-reduce bus bandwidth in a node, GB/s")->capture_default_str();
  app.add_option("--ib-gbs", ib_gbs, "--split: all-reduce bus bandwidth across nodes, GB/s")->capture_default_str();
  app.add_option("--latency-us", latency_us, "--split: latency of one small all-reduce")->capture_default_str();
  app.add_option("--node", node, "--split: GPUs per node")->capture_default_str();
  app.add_option("--batch-tokens", batch_tokens, "--split: global batch of the training step")->capture_default_str();
  app.add_option("--mfu", mfu, "--split: model FLOPs utilization of the training step")->capture_default_str();
  app.add_option("--peak-tflops", peak_tflops, "--split: bf16 dense peak per GPU")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto tensors = celo2::gpt_tensors(layers, d, ffn, vocab, ctx);
  const celo2::RuleConfig cfg = base ? celo2::RuleConfig::celo2_base() : celo2::RuleConfig{};
  int64_t n = 0, ns = 0;
  for (const auto& t : tensors) {
    int64_t k = 1;
    for (auto s : t.shape) k *= s;
    n += k;
    if (t.label == celo2::Label::kCelo2) ns += k;
  }
  std::printf("model: %d layers, d=%lld, ffn=%lld, vocab=%lld: %.3f B parameters, %.3f B in "
              "Celo2 matrices\n\n", layers, static_cast<long long>(d), static_cast<long long>(ffn),
              static_cast<long long>(vocab), n / 1e9, ns / 1e9);
  celo2::NsCostModel owner_model = ns_model == "cpu" ? celo2::NsCostModel::cpu() : celo2::NsCostModel::h200();
  if (bytes_share >= 0) owner_model.group_bytes_share = bytes_share;
  const int force_poly = celo2::parse_split_poly(split_poly);
  std::printf("%-6s %-14s", "ranks", "phase");
  std::printf("%14s\n", "MB/rank/step");
  for (int W : worlds) {
    const celo2::CommModel m = celo2::model_step(tensors, cfg, W, true, 0, owner_model, force_poly);
    for (const auto& [phase, b] : m.bytes) std::printf("%-6d %-14s %14.3f\n", W, phase.c_str(), b / 1e6);
    std::printf("%-6d %-14s %14.3f\n", W, "celo2 total", m.celo2 / 1e6);
    std::printf("%-6d %-14s %14.3f   (celo2 / zero1 = %.3f)\n", W, "zero1 adamw", m.zero1_adamw / 1e6,
                m.celo2 / m.zero1_adamw);
    std::printf("%-6d %-14s %14.3f   (all-to-all if owners ignored locality: %.3f MB)\n", W,
                "layer-wise", m.layerwise / 1e6, m.a2a_no_locality / 1e6);
    std::printf("%-6d NS matrices %lld, NS load imbalance (max/mean, the planner's plan, %s cost model) %.2f "
                "(one owner each: %.2f; no plan of this algorithm below %.2f; %lld split, %lld of them with the "
                "polynomial split); layer-wise optimizer-state imbalance %.1f\n\n",
                W, static_cast<long long>(m.ns_matrices), ns_model.c_str(), m.ns_imbalance,
                m.ns_imbalance_unsplit, m.ns_imbalance_bound, static_cast<long long>(m.ns_split),
                static_cast<long long>(m.ns_split_poly), m.layerwise_state_imbalance);
  }
  // The whole-tensor plan (celo2/plan.h; what the engine's cuda backend runs): cuts at Celo2
  // tensor boundaries by modelled cost and memory. Per rank: engine bytes (state and slice
  // buffers, slice_bytes_per_element), Newton–Schulz FLOPs, modelled cost.
  std::vector<celo2::PlanTensor> pt;
  for (const auto& t : tensors) {
    int64_t k = 1;
    for (auto s : t.shape) k *= s;
    pt.push_back({k, t.label, celo2::tensor_step_cost(t.shape, t.label, cfg)});
  }
  std::printf("Whole-tensor plan (the cuda backend): per-rank max/mean\n%-6s %14s %14s %14s %16s\n", "ranks",
              "engine bytes", "NS FLOPs", "modelled cost", "max-rank ms");
  for (int W : worlds) {
    const std::vector<int64_t> cuts = celo2::plan_cuts(pt, W, celo2::Plan::kWholeTensors);
    std::vector<double> state(W, 0), nsf(W, 0), cost(W, 0);
    int64_t off = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      for (int r = 0; r < W; ++r) {
        const int64_t lo = std::max(off, cuts[r]), hi = std::min(off + pt[i].numel, cuts[r + 1]);
        if (hi <= lo) continue;
        const double frac = static_cast<double>(hi - lo) / static_cast<double>(pt[i].numel);
        state[r] += celo2::slice_bytes_per_element(tensors[i].label) * static_cast<double>(hi - lo);
        cost[r] += pt[i].cost * frac;
        if (tensors[i].label == celo2::Label::kCelo2 && cfg.orthogonalize) {
          const celo2::Geometry g = celo2::Geometry::of(tensors[i].shape);
          if (g.factored) nsf[r] += g.norm_groups * celo2::newton_schulz_flops(cfg, g.mat_rows, g.mat_cols);
        }
      }
      off += pt[i].numel;
    }
    auto ratio = [&](const std::vector<double>& v) {
      double mx = 0, sum = 0;
      for (double x : v) {
        mx = std::max(mx, x);
        sum += x;
      }
      return sum > 0 ? mx / (sum / W) : 1.0;
    };
    std::printf("%-6d %14.3f %14.3f %14.3f %16.3f\n", W, ratio(state), ratio(nsf), ratio(cost),
                *std::max_element(cost.begin(), cost.end()) * 1e3);
  }
  if (!split || !cfg.orthogonalize) return 0;
  // Newton–Schulz split over groups of ranks: the engine's planner (celo2/plan.h plan_ns)
  // with the GPU's cost model. Per rank of a group: iters·(4r²c/g + 2r³) FLOPs at the GEMM
  // rate (2r³/g with the polynomial split), plus split_ns_cost's collectives (bytes at
  // NVLink's bandwidth while the group fits in a node, else InfiniBand's; one latency each).
  celo2::NsCostModel gpu = celo2::NsCostModel::h200();
  gpu.gemm_flops = gemm_tflops * 1e12;
  gpu.bus_bytes = nvlink_gbs * 1e9;
  gpu.bus_bytes_inter = ib_gbs * 1e9;
  gpu.ranks_per_node = static_cast<int>(node);
  gpu.latency = latency_us * 1e-6;
  std::printf("\nSplit Newton-Schulz (the engine's planner; assumptions: GEMM %.0f TFLOP/s, all-reduce %.0f GB/s in a "
              "node of %.0f, %.0f GB/s across, %.0f us per call; training step: 6 N tokens at %.0f%% of %.0f TFLOP/s, "
              "%.0f tokens)\n",
              gemm_tflops, nvlink_gbs, node, ib_gbs, latency_us, 100 * mfu, peak_tflops, batch_tokens);
  // The element-wise part of the optimizer step (the rule's phases and the update, AdamW),
  // per rank of the flat plan: tensor_step_cost without Newton–Schulz, over W.
  celo2::RuleConfig no_ns = cfg;
  no_ns.orthogonalize = false;
  double ew_total = 0;
  for (const auto& t : tensors) ew_total += celo2::tensor_step_cost(t.shape, t.label, no_ns);
  std::printf("%-6s %8s %6s %5s %6s %10s %10s %10s %9s %11s %12s %12s %10s %12s %10s\n", "ranks", "matrices", "split",
              "poly", "max g", "load 1", "load split", "bound", "calls", "MB/rank", "vs ZeRO-1", "NS ms", "of step", "opt step ms",
              "of step");
  for (int W : worlds) {
    const celo2::CommModel cm = celo2::model_step(tensors, cfg, W, true, 0, gpu, force_poly);
    // bytes of the busiest rank of the groups' all-reduces in place of their mean
    const double worst = cm.celo2 - cm.ns_group_bytes_mean + cm.ns_group_bytes_max;
    const double step_s = 6.0 * static_cast<double>(n) * batch_tokens / W / (mfu * peak_tflops * 1e12);
    const double opt_s = ew_total / W + cm.ns_max_seconds;
    std::printf("%-6d %8lld %6lld %5lld %6d %10.2f %10.2f %10.2f %9d %11.1f %12.3f %12.2f %9.1f%% %12.2f %9.1f%%\n", W,
                static_cast<long long>(cm.ns_matrices), static_cast<long long>(cm.ns_split),
                static_cast<long long>(cm.ns_split_poly), cm.ns_group_max,
                cm.ns_imbalance_unsplit, cm.ns_imbalance, cm.ns_imbalance_bound, cm.ns_group_calls_max, cm.ns_group_bytes_max / 1e6,
                worst / cm.zero1_adamw, cm.ns_max_seconds * 1e3, 100 * cm.ns_max_seconds / step_s, opt_s * 1e3,
                100 * opt_s / step_s);
  }
  return 0;
}
