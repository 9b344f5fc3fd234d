// celo2-plan: the communication model of a sharded Celo2 step (comm_model.h) for a
// GPT-shaped model on several world sizes, against ZeRO-1 AdamW and the layer-wise layout.
// Default: GPT-3 XL (24 layers, d = 2048, FFN 8192, vocab 50257, context 2048).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>

#include "celo2/comm_model.h"
#include "celo2/gpu_plan.h"

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
  // The GPU engine's plan (gpu_plan.h): whole tensors to owners by modelled cost.
  std::vector<celo2::GpuPlanTensor> gt;
  for (const auto& t : tensors) gt.push_back({t.shape, t.label, 0});
  std::printf("GPU engine (whole-tensor owners, 64 MiB buckets): modelled per-rank load and "
              "state\n%-6s %10s %14s %18s %10s\n", "ranks", "imbalance", "max-rank ms",
              "max-rank elements", "/ (N/W)");
  for (int W : worlds) {
    const celo2::GpuPlan p = celo2::GpuPlan::build(gt, W, 64ll << 20);
    double mx = 0;
    for (double l : p.load) mx = std::max(mx, l);
    int64_t me = 0, tot = 0;
    for (int64_t e : p.owned_elements) {
      me = std::max(me, e);
      tot += e;
    }
    std::printf("%-6d %10.3f %14.3f %18lld %10.3f\n", W, p.imbalance, mx * 1e3,
                static_cast<long long>(me), static_cast<double>(me) / (static_cast<double>(tot) / W));
  }
  return 0;
}
