// celo2-bench-gpu: the Celo2 recipe step on one GPU over the parameter set of GPT-3 XL
// (gpt_tensors(24, 2048, 8192, 50257, 2048): real shapes, 1.3B elements; celo2 on the
// matrices, AdamW on embeddings, norms and biases, as the seed label rules route them),
// against the machine's own roofline measured in the same run:
//   - device copy bandwidth (cudaMemcpy D2D, bytes read + written),
//   - sgemm, tf32 and bf16 GEMM rates (8192³, cuBLAS),
// and against a fused AdamW step on the same tensors. Reports per step: element-wise time
// (rule phases without Newton–Schulz + the update + the AdamW-labelled tensors) and its
// bandwidth vs the copy roofline; Newton–Schulz time and FLOP rate vs the GEMM rate of its
// precision (float32, tf32, bf16); the whole step; the ratio Celo2 step / AdamW step.
// Full numbers go to $OUT/celo2_bench_gpu.json and .csv (--out, default $OUT or
// ./celo2-bench-gpu-out); a short table is printed last.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "celo2/comm_model.h"
#include "celo2/cuda/check.h"
#include "celo2/cuda/rule_cuda.h"
#include "celo2/newton_schulz.h"
#include "celo2/plan.h"
#include "ns_bench.h"  // ns_input, normalized_err: the CPU table's inputs and measure
#if CELO2_BENCH_ENGINE
#include <chrono>

#include "celo2/cuda_backend.h"
#include "celo2/engine.h"
#endif

namespace {

using celo2::cuda::NsPrecision;

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CELO2_CUDA_CHECK(cudaEventCreate(&a));
    CELO2_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  void start() { CELO2_CUDA_CHECK(cudaEventRecord(a)); }
  double stop_ms() {
    CELO2_CUDA_CHECK(cudaEventRecord(b));
    CELO2_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CELO2_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
};

template <class F>
double median_ms(int iters, F fn) {
  Timer t;
  fn();  // warm-up
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> v;
  for (int i = 0; i < iters; ++i) {
    t.start();
    fn();
    v.push_back(t.stop_ms());
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Dev {
  float* p = nullptr;
  explicit Dev(int64_t n) { CELO2_CUDA_CHECK(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(float))); }
  ~Dev() { cudaFree(p); }
};

// Copy bandwidth (GB/s counting read + write).
double copy_bandwidth(int64_t bytes, int iters) {
  void *a, *b;
  CELO2_CUDA_CHECK(cudaMalloc(&a, bytes));
  CELO2_CUDA_CHECK(cudaMalloc(&b, bytes));
  CELO2_CUDA_CHECK(cudaMemset(a, 0, bytes));
  const double ms = median_ms(iters, [&] { CELO2_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// GEMM rate (TFLOP/s) of an n³ product in the given precision.
double gemm_rate(int n, NsPrecision prec, int iters) {
  cublasHandle_t h;
  CELO2_CUBLAS_CHECK(cublasCreate(&h));
  CELO2_CUBLAS_CHECK(cublasSetMathMode(h, prec == NsPrecision::kTf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  const size_t es = prec == NsPrecision::kBf16 ? 2 : 4;
  void *A, *B, *C;
  const size_t bytes = static_cast<size_t>(n) * n * es;
  CELO2_CUDA_CHECK(cudaMalloc(&A, bytes));
  CELO2_CUDA_CHECK(cudaMalloc(&B, bytes));
  CELO2_CUDA_CHECK(cudaMalloc(&C, bytes));
  if (es == 4) {
    celo2::cuda::fill_random_device(static_cast<float*>(A), int64_t{n} * n, 1, 1.0f);
    celo2::cuda::fill_random_device(static_cast<float*>(B), int64_t{n} * n, 2, 1.0f);
  } else {
    CELO2_CUDA_CHECK(cudaMemset(A, 0x3c, bytes));  // bf16 ~ 0.011: finite, non-zero
    CELO2_CUDA_CHECK(cudaMemset(B, 0x3c, bytes));
  }
  const float one = 1.0f, zero = 0.0f;
  const double ms = median_ms(iters, [&] {
    if (es == 4)
      CELO2_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, static_cast<float*>(A), n,
                                     static_cast<float*>(B), n, &zero, static_cast<float*>(C), n));
    else
      CELO2_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, A, CUDA_R_16BF, n, B,
                                      CUDA_R_16BF, n, &zero, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  });
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  cublasDestroy(h);
  return 2.0 * n * n * static_cast<double>(n) / (ms * 1e-3) / 1e12;
}

#if CELO2_BENCH_ENGINE
// The whole engine step on its cuda backend, one rank (local communicator): what a trainer
// calls. Tensors are views into the flat p / g buffers (float32). Host wall time per step
// (step() returns when the update is in place), median of `iters`; the engine's phases.
nlohmann::json engine_bench(const std::vector<celo2::ModelTensor>& tensors, float* p, float* g, int iters) {
  celo2::register_cuda_backend();
  celo2::EngineOptions eo;
  eo.opt.rules = celo2::LabelRules::seed_default();
  eo.opt.theta = celo2::Theta::adam_like(eo.opt.rule);
  eo.opt.weight_decay = 0.1;
  eo.backend = "cuda";
  eo.grad_mode = celo2::GradMode::kReduced;
  celo2::Engine eng(eo, celo2::make_local_communicator());
  int64_t off = 0;
  for (const auto& t : tensors) {
    int64_t n = 1;
    for (int64_t s : t.shape) n *= s;
    eng.add_tensor(t.name, t.shape, p + off, g + off);
    off += n;
  }
  std::vector<double> ms;
  std::map<std::string, std::vector<double>> phase;
  for (int i = 0; i <= iters; ++i) {
    CELO2_CUDA_CHECK(cudaDeviceSynchronize());
    const auto t0 = std::chrono::steady_clock::now();
    eng.step_with_lr(1e-4);
    const double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (i == 0) continue;  // warm-up (plan, allocation, RuleSet groups)
    ms.push_back(dt);
    for (const auto& [k, v] : eng.last_phase_stats().seconds) phase[k].push_back(v * 1e3);
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  nlohmann::json r = {{"step_ms", med(ms)}, {"engine_bytes", eng.memory_bytes()}, {"params", "float32"}};
  for (auto& [k, v] : phase) r["phase_ms"][k] = med(v);
  return r;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"celo2-bench-gpu: the Celo2 step on one GPU vs its roofline and fused AdamW"};
  bool quick = false;
  int iters = 5;
  std::string out_dir;
  std::vector<std::string> precisions = {"float32", "tf32", "bf16"};
  app.add_flag("--quick", quick, "A small GPT (2 layers, width 256) for a smoke test");
  app.add_option("--iters", iters, "Timed repetitions (median reported)");
  app.add_option("--ns", precisions, "Newton-Schulz precisions to run (float32 tf32 bf16)");
  bool engine = true;
  std::vector<int> ranks = {8, 64};
  app.add_option("--ranks", ranks, "World sizes whose per-rank compute share is timed (the whole-tensor plan)");
  app.add_option("--engine", engine, "Also time the whole engine step on its cuda backend");
  app.add_option("--out", out_dir, "Directory for the JSON and CSV (default $OUT or ./celo2-bench-gpu-out)");
  bool ns_error = true;
  app.add_option("--ns-error", ns_error,
                 "Also measure each precision's Newton-Schulz error against float64 (CPU) at the GPT-3 XL shapes");
  CLI11_PARSE(app, argc, argv);
  if (out_dir.empty()) {
    const char* o = std::getenv("OUT");
    out_dir = o && *o ? o : "celo2-bench-gpu-out";
  }
  try {
    std::string why;
    if (!celo2::cuda::device_available(&why)) {
      std::fprintf(stderr, "celo2-bench-gpu: %s\n", why.c_str());
      return 2;
    }
    cudaDeviceProp prop{};
    CELO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const auto tensors = quick ? celo2::gpt_tensors(2, 256, 1024, 1000, 128)
                               : celo2::gpt_tensors(24, 2048, 8192, 50257, 2048);
    std::vector<std::vector<int64_t>> cshapes;
    int64_t n_celo2 = 0, n_adamw = 0;
    for (const auto& t : tensors) {
      int64_t n = 1;
      for (int64_t s : t.shape) n *= s;
      if (t.label == celo2::Label::kCelo2) {
        cshapes.push_back(t.shape);
        n_celo2 += n;
      } else {
        n_adamw += n;
      }
    }
    const int64_t n_all = n_celo2 + n_adamw;
    std::printf("celo2-bench-gpu: %s, %zu tensors, %.3f B elements (celo2 %.3f B, adamw %.3f B)\n",
                prop.name, tensors.size(), n_all / 1e9, n_celo2 / 1e9, n_adamw / 1e9);

    // Roofline of this device, measured now.
    const int64_t copy_bytes = quick ? (int64_t{256} << 20) : (int64_t{2} << 30);
    const double copy_gbs = copy_bandwidth(copy_bytes, iters);
    const int gn = quick ? 2048 : 8192;
    std::map<std::string, double> gemm_tflops;
    for (const std::string& p : precisions)
      gemm_tflops[p] = gemm_rate(gn, celo2::cuda::parse_ns_precision(p), iters);
    std::printf("roofline: copy %.0f GB/s", copy_gbs);
    for (const auto& [p, r] : gemm_tflops) std::printf(", %s GEMM %.1f TFLOP/s", p.c_str(), r);
    std::printf("\n");

    // Buffers: every tensor back to back; celo2 tensors first, then the adamw ones.
    Dev p(n_all), g(n_all), u(n_celo2), mu(n_all), nu(n_all);
    celo2::cuda::fill_random_device(p.p, n_all, 11, 0.02f);
    celo2::cuda::fill_random_device(g.p, n_all, 12, 1e-3f);
    CELO2_CUDA_CHECK(cudaMemset(mu.p, 0, n_all * 4));
    CELO2_CUDA_CHECK(cudaMemset(nu.p, 0, n_all * 4));
    celo2::AdamWParams aw;
    aw.lr = 1e-4f;
    aw.wd = 0.1f;

    // Fused AdamW over every tensor: the baseline.
    const double adamw_ms = median_ms(iters, [&] { celo2::cuda::adamw_device(aw, n_all, p.p, g.p, mu.p, nu.p); });
    const double adamw_bytes = 28.0 * n_all;  // p r/w, g, mu r/w, nu r/w

    const celo2::RuleConfig cfg;
    const celo2::Theta theta = celo2::Theta::adam_like(cfg);
    nlohmann::json J;
    J["device"] = prop.name;
    J["elements"] = {{"all", n_all}, {"celo2", n_celo2}, {"adamw", n_adamw}};
    J["roofline"] = {{"copy_GBps", copy_gbs}, {"gemm_TFLOPs", gemm_tflops}, {"gemm_n", gn}};
    J["adamw"] = {{"ms", adamw_ms}, {"bytes", adamw_bytes}, {"GBps", adamw_bytes / (adamw_ms * 1e-3) / 1e9}};
    std::vector<std::vector<std::string>> rows;
    for (const std::string& pname : precisions) {
      const NsPrecision prec = celo2::cuda::parse_ns_precision(pname);
      celo2::cuda::RuleSet set(cfg, theta, cshapes, prec);
      const double rule_bytes = set.elementwise_bytes();
      const double apply_bytes = 12.0 * n_celo2;            // p r/w, u
      const double side_bytes = 28.0 * n_adamw;             // the adamw-labelled tensors
      const double ew_bytes = rule_bytes + apply_bytes + side_bytes;
      const double ns_flops = set.newton_schulz_flops();
      std::vector<double> ew, ns, whole;
      Timer t;
      for (int i = 0; i <= iters; ++i) {
        t.start();
        const celo2::cuda::RuleTiming rt = set.step_timed(g.p, p.p, u.p);
        Timer t2;
        t2.start();
        celo2::cuda::apply_step_device(1e-4f, 0.1f, n_celo2, p.p, u.p);
        celo2::cuda::adamw_device(aw, n_adamw, p.p + n_celo2, g.p + n_celo2, mu.p + n_celo2, nu.p + n_celo2);
        const double rest = t2.stop_ms();
        const double all = t.stop_ms();
        if (i == 0) continue;  // warm-up
        ew.push_back(rt.elementwise_ms + rest);
        ns.push_back(rt.newton_schulz_ms);
        whole.push_back(all);
      }
      auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
      const double ew_ms = med(ew), ns_ms = med(ns), step_ms = med(whole);
      const double ew_gbs = ew_bytes / (ew_ms * 1e-3) / 1e9;
      const double ns_tf = ns_flops / (ns_ms * 1e-3) / 1e12;
      J["celo2"][pname] = {{"elementwise_ms", ew_ms}, {"elementwise_bytes", ew_bytes},
                           {"elementwise_GBps", ew_gbs}, {"elementwise_frac_of_copy", ew_gbs / copy_gbs},
                           {"ns_ms", ns_ms}, {"ns_flops", ns_flops}, {"ns_TFLOPs", ns_tf},
                           {"ns_frac_of_gemm", ns_tf / gemm_tflops[pname]}, {"step_ms", step_ms},
                           {"step_over_adamw", step_ms / adamw_ms},
                           {"elementwise_over_adamw", ew_ms / adamw_ms}};
      rows.push_back({pname, std::to_string(ew_ms), std::to_string(ew_gbs / copy_gbs),
                      std::to_string(ns_ms), std::to_string(ns_tf / gemm_tflops[pname]),
                      std::to_string(step_ms), std::to_string(adamw_ms), std::to_string(step_ms / adamw_ms)});
    }
    J["targets"] = {{"elementwise_frac_of_copy_min", 0.5}, {"step_over_adamw_max", 3.0}};

    // Per-rank compute at W ranks: the engine's whole-tensor plan for W (celo2/plan.h, what
    // the cuda backend runs) gives each rank its Celo2 tensors and pieces of AdamW tensors;
    // each rank's share is timed here on this one GPU (one RuleSet over its tensors + update +
    // fused AdamW over its pieces) and the slowest rank is compared with fused AdamW over N/W
    // elements (ZeRO-sharded AdamW). Measured compute, no communication.
    {
      std::vector<celo2::PlanTensor> pt;
      for (const auto& t : tensors) pt.push_back({[&] { int64_t n = 1; for (int64_t s : t.shape) n *= s; return n; }(),
                                                  t.label, celo2::tensor_step_cost(t.shape, t.label, cfg)});
      for (int W : ranks) {
        const std::vector<int64_t> cuts = celo2::plan_cuts(pt, W, celo2::Plan::kWholeTensors);
        const int64_t share = (n_all + W - 1) / W;
        const double adamw_w_ms = median_ms(iters, [&] { celo2::cuda::adamw_device(aw, share, p.p, g.p, mu.p, nu.p); });
        for (const std::string& pname : precisions) {
          const NsPrecision prec = celo2::cuda::parse_ns_precision(pname);
          auto runner = std::make_shared<celo2::cuda::NewtonSchulzCuda>(prec);
          double worst = 0;
          int worst_rank = 0;
          for (int r = 0; r < W; ++r) {
            std::vector<std::vector<int64_t>> shapes;
            int64_t n_c = 0, n_a = 0, off = 0;
            for (size_t i = 0; i < tensors.size(); ++i) {
              const int64_t lo = std::max(off, cuts[r]), hi = std::min(off + pt[i].numel, cuts[r + 1]);
              off += pt[i].numel;
              if (hi <= lo) continue;
              if (tensors[i].label == celo2::Label::kCelo2) {
                shapes.push_back(tensors[i].shape);
                n_c += hi - lo;
              } else {
                n_a += hi - lo;
              }
            }
            std::unique_ptr<celo2::cuda::RuleSet> set;
            if (!shapes.empty()) set = std::make_unique<celo2::cuda::RuleSet>(cfg, theta, shapes, runner);
            const double ms = median_ms(iters, [&] {
              if (set) set->step(g.p, p.p, u.p);
              celo2::cuda::apply_step_device(1e-4f, 0.1f, n_c, p.p, u.p);
              celo2::cuda::adamw_device(aw, n_a, p.p + n_c, g.p + n_c, mu.p + n_c, nu.p + n_c);
            });
            if (ms > worst) {
              worst = ms;
              worst_rank = r;
            }
          }
          J["ranks"][std::to_string(W)][pname] = {{"max_rank_ms", worst}, {"max_rank", worst_rank},
                                                   {"adamw_share_ms", adamw_w_ms},
                                                   {"max_rank_over_adamw_share", worst / adamw_w_ms}};
        }
      }
    }
#if CELO2_BENCH_ENGINE
    if (engine) {
      nlohmann::json r = engine_bench(tensors, p.p, g.p, iters);
      r["step_over_adamw"] = r["step_ms"].get<double>() / adamw_ms;
      J["engine"]["float32"] = r;
    }
#endif

    if (ns_error) {
      // The precision table of docs/PERF.md ("Gram Newton–Schulz"): per shape and input,
      // each precision's result against the float64 standard iteration on the CPU, after
      // the output normalization (max|err| / RMS; the golden files' tolerance is 1e-4).
      const std::vector<std::pair<int64_t, int64_t>> shapes =
          quick ? std::vector<std::pair<int64_t, int64_t>>{{256, 512}, {512, 256}}
                : std::vector<std::pair<int64_t, int64_t>>{{2048, 2048}, {2048, 6144}, {2048, 8192}, {8192, 2048}};
      std::printf("\nNewton-Schulz error vs float64 (after output normalization, max|err|/RMS):\n%-11s %-9s",
                  "shape", "input");
      for (const std::string& pn : precisions) std::printf(" %10s", pn.c_str());
      std::printf("\n");
      for (const auto& [r, c] : shapes)
        for (const std::string kind : {"gaussian", "lowrank"}) {
          const std::vector<float> x = celo2::bench::ns_input(kind, r, c, static_cast<uint64_t>(r * 7 + c));
          std::vector<double> want(x.begin(), x.end());
          celo2::newton_schulz_f64(cfg, r, c, want.data());
          const std::string sname = std::to_string(r) + "x" + std::to_string(c);
          std::printf("%-11s %-9s", sname.c_str(), kind.c_str());
          Dev d(r * c);
          std::vector<float> got(x.size());
          for (const std::string& pn : precisions) {
            celo2::cuda::NewtonSchulzCuda ns(celo2::cuda::parse_ns_precision(pn));
            CELO2_CUDA_CHECK(cudaMemcpy(d.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
            ns.run(cfg, r, c, 1, d.p, nullptr);
            CELO2_CUDA_CHECK(cudaMemcpy(got.data(), d.p, got.size() * 4, cudaMemcpyDeviceToHost));
            const double err = celo2::bench::normalized_err(got, want);
            J["ns_error"][sname][kind][pn] = err;
            std::printf(" %10.2e", err);
          }
          std::printf("\n");
        }
    }

    std::filesystem::create_directories(out_dir);
    std::ofstream(out_dir + "/celo2_bench_gpu.json") << J.dump(2) << "\n";
    std::ofstream csv(out_dir + "/celo2_bench_gpu.csv");
    csv << "ns_precision,elementwise_ms,elementwise_frac_of_copy,ns_ms,ns_frac_of_gemm,step_ms,adamw_ms,step_over_adamw\n";
    for (const auto& r : rows) {
      for (size_t i = 0; i < r.size(); ++i) csv << (i ? "," : "") << r[i];
      csv << "\n";
    }

    std::printf("\n%-8s %12s %10s %10s %10s %10s %10s %10s\n", "NS", "ew ms", "ew/copy", "NS ms",
                "NS/GEMM", "step ms", "AdamW ms", "step/AdamW");
    for (const auto& [pname, v] : J["celo2"].items())
      std::printf("%-8s %12.3f %10.2f %10.3f %10.2f %10.3f %10.3f %10.2f\n", pname.c_str(),
                  v["elementwise_ms"].get<double>(), v["elementwise_frac_of_copy"].get<double>(),
                  v["ns_ms"].get<double>(), v["ns_frac_of_gemm"].get<double>(),
                  v["step_ms"].get<double>(), adamw_ms, v["step_over_adamw"].get<double>());
    if (J.contains("ranks"))
      for (const auto& [w, per] : J["ranks"].items())
        for (const auto& [pn, v] : per.items())
          std::printf("%s ranks, %s NS: slowest rank's compute %.3f ms vs AdamW on N/W %.3f ms: %.2fx\n",
                      w.c_str(), pn.c_str(), v["max_rank_ms"].get<double>(), v["adamw_share_ms"].get<double>(),
                      v["max_rank_over_adamw_share"].get<double>());
    if (J.contains("engine"))
      for (const auto& [k, v] : J["engine"].items())
        std::printf("engine step (cuda backend), %s params/grads, 1 rank, float32 NS: %.3f ms (%.2fx AdamW; "
                    "engine memory %.1f MB)\n", k.c_str(), v["step_ms"].get<double>(),
                    v["step_over_adamw"].get<double>(), v["engine_bytes"].get<double>() / 1e6);
    std::printf("targets: element-wise >= 0.50 of copy bandwidth; step <= 3x AdamW. JSON/CSV in %s\n",
                out_dir.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "celo2-bench-gpu: %s\n", e.what());
    return 1;
  }
  return 0;
}
