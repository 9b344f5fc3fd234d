// celo2-plan: the communication model of a sharded Celo2 step (comm_model.h) for a
// GPT-shaped model on several world sizes, against ZeRO-1 AdamW and the layer-wise layout.
// Default: GPT-3 XL (24 layers, d = 2048, FFN 8192, vocab 50257, context 2048).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>

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
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--d", d)->capture_default_str();
  app.add_option("--ffn", ffn)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  app.add_option("--context", ctx)->capture_default_str();
  app.add_option("--world", worlds, "world sizes")->capture_default_str();
  app.add_flag("--base", base, "Celo2-base (no Newton–Schulz)");
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
  std::printf("%-6s %-14s", "ranks", "phase");
  std::printf("%14s\n", "MB/rank/step");
  for (int W : worlds) {
    const celo2::CommModel m = celo2::model_step(tensors, cfg, W);
    for (const auto& [phase, b] : m.bytes) std::printf("%-6d %-14s %14.3f\n", W, phase.c_str(), b / 1e6);
    std::printf("%-6d %-14s %14.3f\n", W, "celo2 total", m.celo2 / 1e6);
    std::printf("%-6d %-14s %14.3f   (celo2 / zero1 = %.3f)\n", W, "zero1 adamw", m.zero1_adamw / 1e6,
                m.celo2 / m.zero1_adamw);
    std::printf("%-6d %-14s %14.3f   (all-to-all if owners ignored locality: %.3f MB)\n", W,
                "layer-wise", m.layerwise / 1e6, m.a2a_no_locality / 1e6);
    std::printf("%-6d NS matrices %lld, NS load imbalance (max/mean) %.2f; layer-wise optimizer-"
                "state imbalance %.1f\n\n", W, static_cast<long long>(m.ns_matrices), m.ns_imbalance,
                m.layerwise_state_imbalance);
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
  return 0;
}
