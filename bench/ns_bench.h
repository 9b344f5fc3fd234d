// Gram vs standard Newton–Schulz on this CPU: the `--ns-gram` mode of celo2-bench
// (docs/PERF.md "Gram Newton–Schulz"). Per shape and input, from one run: the FLOPs of each
// method (newton_schulz_flops), the median time, and the error of each float32 method
// against the float64 standard iteration (newton_schulz_f64), measured after the output
// normalization the rule applies next (u / RMS(u)), as max|err| / RMS of the reference: the
// measure of the golden files (tolerance 1e-4).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "celo2/newton_schulz.h"

namespace celo2::bench {

struct NsGramOptions {
  std::vector<std::pair<int64_t, int64_t>> shapes = {{2048, 2048}, {2048, 6144}, {2048, 8192}, {8192, 2048}};
  int reps = 3;
  std::string json_path;
};

// Inputs: "gaussian" (i.i.d., a well-conditioned spectrum) and "lowrank" (a rank-32 product
// plus 1 % noise: the decaying spectrum of gradient momenta, far worse conditioned).
inline std::vector<float> ns_input(const std::string& kind, int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  if (kind == "gaussian") {
    for (float& v : x) v = nd(rng);
    return x;
  }
  const int64_t k = 32;
  std::vector<float> a(static_cast<size_t>(rows * k)), b(static_cast<size_t>(k * cols));
  for (float& v : a) v = nd(rng);
  for (float& v : b) v = nd(rng);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float s = 0;
      for (int64_t q = 0; q < k; ++q) s += a[i * k + q] * b[q * cols + j] / (1.0f + q);
      x[static_cast<size_t>(i * cols + j)] = s + 0.01f * nd(rng);
    }
  return x;
}

// max|a/rms(a) − b/rms(b)| / 1 (both normalized to RMS 1).
inline double normalized_err(const std::vector<float>& got, const std::vector<double>& want) {
  double sg = 0, sw = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    sg += static_cast<double>(got[i]) * got[i];
    sw += want[i] * want[i];
  }
  const double rg = std::sqrt(sg / got.size()), rw = std::sqrt(sw / want.size());
  double m = 0;
  for (size_t i = 0; i < got.size(); ++i) m = std::max(m, std::fabs(got[i] / rg - want[i] / rw));
  return m;
}

inline int run_ns_gram_bench(const NsGramOptions& o) {
  using Clock = std::chrono::steady_clock;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a run cut short keeps what it printed
  const RuleConfig cfg;
  nlohmann::ordered_json out;
  std::printf("Gram vs standard Newton-Schulz (float32, %d iterations; error: max|err| after u/RMS(u) "
              "against the float64 standard iteration; time: median of %d)\n",
              cfg.ns_iters, o.reps);
  std::printf("%-11s %-9s %-14s %9s %9s %9s %11s\n", "shape", "input", "method", "GFLOP", "seconds",
              "GFLOP/s", "error");
  struct Method {
    const char* name;
    NsMethod m;
    int restart;
  };
  const std::vector<Method> methods = {{"standard", NsMethod::kStandard, 0},
                                       {"gram", NsMethod::kGram, 0},
                                       {"gram+restart2", NsMethod::kGram, 2},
                                       {"gram+restart3", NsMethod::kGram, 3}};
  for (auto [r, c] : o.shapes) {
    for (const std::string kind : {"gaussian", "lowrank"}) {
      const std::vector<float> x0 = ns_input(kind, r, c, 17);
      std::vector<double> ref(x0.begin(), x0.end());
      const auto t0 = Clock::now();
      newton_schulz_f64(cfg, r, c, ref.data());
      const double ref_s = std::chrono::duration<double>(Clock::now() - t0).count();
      double std_s = 0;
      for (const Method& m : methods) {
        std::vector<float> x, scratch;
        std::vector<double> ts;
        for (int k = 0; k <= o.reps; ++k) {  // the first is the warm-up
          x = x0;
          const auto a = Clock::now();
          newton_schulz(cfg, r, c, x.data(), scratch, m.m, m.restart);
          if (k) ts.push_back(std::chrono::duration<double>(Clock::now() - a).count());
        }
        std::sort(ts.begin(), ts.end());
        const double s = ts[ts.size() / 2];
        if (m.m == NsMethod::kStandard) std_s = s;
        const double flops = newton_schulz_flops(cfg, r, c, m.m, m.restart);
        const double err = normalized_err(x, ref);
        std::printf("%-11s %-9s %-14s %9.1f %9.3f %9.1f %11.3e%s\n",
                    (std::to_string(r) + "x" + std::to_string(c)).c_str(), kind.c_str(), m.name, flops / 1e9, s,
                    flops / s / 1e9, err,
                    m.m == NsMethod::kStandard ? "" : ("  (time " + std::to_string(s / std_s).substr(0, 5) + "x)").c_str());
        out["rows"].push_back({{"rows", r}, {"cols", c}, {"input", kind}, {"method", m.name},
                               {"flops", flops}, {"seconds", s}, {"time_vs_standard", s / std_s},
                               {"error_vs_f64", err}, {"f64_reference_seconds", ref_s}});
      }
    }
  }
  if (!o.json_path.empty()) {
    std::FILE* f = std::fopen(o.json_path.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", o.json_path.c_str());
      return 1;
    }
    std::fputs(out.dump(1).c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace celo2::bench
