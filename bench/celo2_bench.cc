// celo2-bench: how fast the Celo2 rule runs, next to the machine's own rates measured in
// the same process (docs/PERF.md reads its output).
//
// Sections, in order:
//   1. machine rates: STREAM-style copy/triad bandwidth, a vectorized FMA-throughput loop,
//      cblas_sgemm at the Newton–Schulz shapes (1 thread and all threads);
//   2. fused AdamW (celo2::adamw_update), ns per element;
//   3. the Celo2 rule (celo2::celo2_update), Celo2-base and Celo2, 1-D and 2-D tensors,
//      elements/s and the ratio to AdamW at the same size and thread count;
//   4. celo2::newton_schulz GFLOP/s next to the sgemm rate;
//   5. a roofline of AdamW and Celo2-base from FLOP and byte counts per element;
//   6. (--phases) the fast path's phases timed one by one on a whole-tensor Slice, 1 thread.
// A compact summary table and the two targets (Celo2-base <= 4x AdamW per element on one
// thread; Newton–Schulz >= 70 % of sgemm) come last; --json writes every number.
//
// Timing: a hand-rolled loop (one untimed warm-up, then the median of N timed repetitions
// of one whole call) rather than Google Benchmark. The quantities that matter are ratios
// between cases of one run (Celo2 over AdamW, NS over sgemm, achieved over roofline), each
// case is one long call (milliseconds to seconds, so timer overhead is irrelevant), and the
// thread count and BLAS thread count must be switched between cases; a plain loop makes all
// of that one line each, where Google Benchmark would need fixtures and a post-processing
// step. The median, not the mean, because the build machine is shared and noisy.
//
// Exit status: 1 if a measured rate is not positive or a step is not finite (the quick
// CTest smoke test relies on this); the performance targets are reported, never enforced,
// because a shared machine cannot promise them.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "engine_bench.h"
#include <nlohmann/json.hpp>

#include "celo2/adamw.h"
#include "celo2/config.h"
#include "celo2/isa.h"
#include "celo2/newton_schulz.h"
#include "machine_rates.h"
#include "ns_bench.h"
#include "celo2/host_memory.h"
#include "celo2/rule.h"

namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;

struct Options {
  bool quick = false;
  bool phases = false;
  bool no_ns = false;  // skip Newton–Schulz: section 4 and the orthogonalized rule
  int threads = 0;  // "all threads"; 0 = omp_get_max_threads()
  int reps = 5;
  double case_budget_s = 20.0;  // fewer repetitions (never below 3) for cases longer than this
  std::string json_path;
};

bool g_failed = false;
void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  g_failed = true;
}

// ---------------------------------------------------------------------------------------
// Timing.
// ---------------------------------------------------------------------------------------

struct Timing {
  double median_s = 0, min_s = 0;
  int reps = 0;
};

double seconds_of(const std::function<void()>& fn) {
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// One warm-up call (also the estimate of the cost), then the median of `reps` calls, or of
// fewer (at least 3) if reps calls would exceed the per-case budget.
Timing time_median(const Options& o, const std::function<void()>& fn) {
  const double warm = seconds_of(fn);
  int reps = o.reps;
  if (warm * reps > o.case_budget_s)
    reps = std::max(3, static_cast<int>(o.case_budget_s / std::max(warm, 1e-9)));
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) t.push_back(seconds_of(fn));
  Timing res;
  res.median_s = median_of(t);
  res.min_s = *std::min_element(t.begin(), t.end());
  res.reps = reps;
  return res;
}

void set_threads(int n) {
  omp_set_num_threads(n);
  celo2::set_blas_threads(n);
}

// Deterministic, fast fill (splitmix64 → uniform in [-scale, scale]); performance does not
// depend on the distribution as long as there are no zeros runs or denormals.
void fill_uniform(std::vector<float>& v, uint64_t seed, float scale) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& x : v) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x = scale * (static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

std::string human_count(int64_t n) {
  if (n >= (1 << 20) && n % (1 << 20) == 0) return std::to_string(n >> 20) + "M";
  if (n >= (1 << 10) && n % (1 << 10) == 0) return std::to_string(n >> 10) + "K";
  return std::to_string(n);
}

std::string shape_name(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return shape.size() == 1 ? "n=" + human_count(shape[0]) : s;
}

// ---------------------------------------------------------------------------------------
// 1. Machine rates.
// ---------------------------------------------------------------------------------------

// STREAM copy (a = b, 8 B/element) and triad (a = b + s·c, 12 B/element), counted the STREAM
// way: bytes the program names, without the write-allocate read of `a`.
struct StreamRates {
  double copy_gbs = 0, triad_gbs = 0;
};

StreamRates measure_stream(const Options& o, int64_t n, int threads) {
  set_threads(threads);
  std::vector<float> a(n), b(n), c(n);
  float* __restrict pa = a.data();
  const float* __restrict pb = b.data();
  const float* __restrict pc = c.data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0.0f;
    b[i] = 1.0f + static_cast<float>(i & 7);
    c[i] = 2.0f;
  }
  const Timing copy = time_median(o, [&] {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i];
  });
  const float s = 0.5f;
  const Timing triad = time_median(o, [&] {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + s * pc[i];
  });
  if (!std::isfinite(a[n / 2])) fail("stream produced a non-finite value");
  return {8.0 * n / copy.median_s / 1e9, 12.0 * n / triad.median_s / 1e9};
}

// The vector width of the rule copy in use (--isa): the roofline's FMA rate is measured at
// that width, so an AVX2 copy on an AVX-512 core is held to the 256-bit rate it can reach.
// Never wider than this file is compiled for.
int rule_vec_bytes() {
  int bytes = celo2::bench::kNativeVecBytes;
  switch (celo2::cpu_isa()) {
    case celo2::CpuIsa::kAvx2: bytes = 32; break;
    case celo2::CpuIsa::kBase: bytes = 16; break;
    default: break;
  }
  return std::min(bytes, celo2::bench::kNativeVecBytes);
}

template <int Bytes>
double fma_gflops_at(const Options& o, int threads) {
  const int64_t iters = o.quick ? 2'000'000 : 20'000'000;
  std::vector<float> sink(threads);
  const Timing t = time_median(o, [&] {
#pragma omp parallel num_threads(threads)
    sink[omp_get_thread_num()] = celo2::bench::fma_chains<Bytes>(iters, 1.0f + omp_get_thread_num());
  });
  for (float s : sink)
    if (!std::isfinite(s)) fail("FMA loop produced a non-finite value");
  return celo2::bench::fma_chains_flop<Bytes>(iters) * threads / t.median_s / 1e9;
}

// FMA throughput: machine_rates.h's loop on every thread, at the rule copy's vector width.
double measure_fma_gflops(const Options& o, int threads) {
  set_threads(threads);
  switch (rule_vec_bytes()) {
#if CELO2_VEC_BYTES >= 64
    case 64: return fma_gflops_at<64>(o, threads);
#endif
#if CELO2_VEC_BYTES >= 32
    case 32: return fma_gflops_at<32>(o, threads);
#endif
    default: return fma_gflops_at<16>(o, threads);
  }
}

double measure_sgemm_gflops(const Options& o, int m, int n, int k, int threads) {
  set_threads(threads);
  std::vector<float> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(k) * n),
      c(static_cast<size_t>(m) * n);
  fill_uniform(a, 1, 1.0f);
  fill_uniform(b, 2, 1.0f);
  const Timing t = time_median(o, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k, b.data(),
                n, 0.0f, c.data(), n);
  });
  if (!std::isfinite(c[c.size() / 2])) fail("sgemm produced a non-finite value");
  return 2.0 * m * n * static_cast<double>(k) / t.median_s / 1e9;
}

// ---------------------------------------------------------------------------------------
// 2. AdamW.
// ---------------------------------------------------------------------------------------

double measure_adamw_ns(const Options& o, int64_t n, int threads) {
  set_threads(threads);
  // On huge pages as the rule's arrays are (RuleBench), so the ratio compares like with like.
  std::vector<float> p, g, mu, nu;
  for (std::vector<float>* v : {&p, &g, &mu, &nu}) celo2::assign_huge(*v, n);
  fill_uniform(p, 3, 0.05f);
  fill_uniform(g, 4, 0.01f);
  celo2::AdamWParams a;
  a.lr = 1e-4f;
  a.wd = 0.01f;
  const Timing t = time_median(o, [&] {
    celo2::adamw_update(a, n, p.data(), g.data(), mu.data(), nu.data());
    ++a.count;
  });
  if (!all_finite(p.data(), n)) fail("AdamW produced a non-finite parameter");
  return t.median_s / n * 1e9;
}

// ---------------------------------------------------------------------------------------
// 3. The Celo2 rule.
// ---------------------------------------------------------------------------------------

// One tensor with its state, gradient and parameters; celo2_update on it is one call. The
// state planes are skewed apart as the engine's host backends keep them (state_plane).
struct RuleBench {
  celo2::Geometry geo;
  celo2::RuleState state;
  std::vector<float> g, p, u;
  celo2::Workspace ws;

  explicit RuleBench(const std::vector<int64_t>& shape)
      : geo(celo2::Geometry::of(shape)), state(celo2::RuleState::zeros(geo, false)) {
    // On huge pages, as the engine's host backend allocates its flat buffers and as a
    // trainer's tensors are with PyTorch's THP_MEM_ALLOC_ENABLE=1 or glibc's
    // GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (docs/PERF.md "A fourth CPU"); the state too
    // (RuleState::zeros).
    celo2::assign_huge(g, geo.numel);
    celo2::assign_huge(p, geo.numel);
    celo2::assign_huge(u, geo.numel);
    fill_uniform(g, 5, 0.01f);
    fill_uniform(p, 6, 0.05f);
  }
  // The same arrays copied into plain std::vector storage: 4 KiB pages where the system's THP
  // mode is "madvise" (--huge-ab's other side).
  struct Plain {};
  RuleBench(const RuleBench& src, Plain) : geo(src.geo), state(src.state), g(src.g), p(src.p), u(src.u) {}
  void step(const celo2::RuleConfig& cfg, const celo2::Theta& theta) {
    celo2::celo2_update(cfg, theta, geo, state, g.data(), p.data(), u.data(), ws);
  }
};

// ---------------------------------------------------------------------------------------
// 5. Roofline: operations and bytes per element, counted from kernels/src/rule_cpu.cc and
// kernels/src/adamw.cc for the default configuration (normalize_input, normalize_output, no
// bias correction, exp_mult 0, relu, hidden 8, two hidden layers). FLOP: add/mul/min/max = 1,
// fma = 2; sqrt and divide are counted apart (they go to the divider, not the FMA pipes).
// Bytes: main-memory traffic of the per-element arrays (g, p, m×3, rms, v_diag×3, u) per
// pass; the row/col tables of a matrix are small and stay in cache. Writes are counted once
// (STREAM convention, no write-allocate), so the bound compares with the triad rate.
//
// Celo2-base, matrix (30 features), per element:
//   phase_accumulate  loop 1: clip 2, m: 3 EMAs × 3, rms: g² 1 + EMA 3             = 15
//                      loop 2: clip 2, q = g²+ε 2, row-segment and column sums 2     =  6
//                      bytes: g 4, m 3×(4+4), rms 4+4; g again 4                     = 40 B
//   phase_feature_sumsq features 25 (clip 2, bias corr. 4, fac_g 6, clamp 2, m̂ρ 3,
//                      gρ 1, m̂R̂Ĉ 6, ρ: add 1) + 1 sqrt + 1 div; Σf² 30 × 2 = 60    = 85
//                      bytes: g, p, m×3, rms                                         = 24 B
//   phase_mlp          features 25 (+ sqrt + div); layer 0: 30·8 fma = 480, relu 8;
//                      layer 1: 8·8 fma = 128, relu 8; output: 8·3 fma = 48          = 697
//                      bytes: g, p, m×3, rms, write u                                = 28 B
//   phase_output_sumsq + phase_finish: u² fma 2, u·scale 1                           =  3
//                      bytes: read u, read u, write u                                = 12 B
//                      (since 2026-12-03 the MLP pass sums u² from registers, so the code
//                      reads u once here, 8 B; the model keeps the 12 B, so the
//                      targets are read against the same bound as before)
//   total: 806 FLOP + 2 sqrt + 2 div, 104 B.
// Celo2-base, vector (15 features):
//   phase_accumulate  15 + (clip 2, q 2, v_diag 3 EMAs × 3) = 28; bytes 36 + g 4 + v_diag 24 = 64 B
//   phase_feature_sumsq features 22 (clip 2, bias corr. 4, fac_g 3×3, clamp 2, m̂ρ 3,
//                      gρ 1, ρ 1) + 4 sqrt + 4 div; Σf² 15 × 2 = 30 → 52; bytes 24 + v_diag 12 = 36 B
//   phase_mlp          features 22; layer 0: 15·8 fma = 240, relu 8; 128 + 8; 48 → 454;
//                      bytes 36 + u 4 = 40 B
//   phase 5            3; 12 B
//   total: 537 FLOP + 8 sqrt + 8 div, 152 B.
// AdamW: m EMA 3, v: g² 1 + EMA 3, m̂ 1, v̂ 1, +ε 1, wd·p fma 2, ·lr 1, p −= 1 → 14 FLOP
//   + 1 sqrt + 1 div; bytes: read g, p, μ, ν, write p, μ, ν = 28 B.
// Per phase too (FLOP, bytes: accumulate, feature_sumsq, mlp, output_sumsq + finish): the
// phases are separate passes with global sums between them, so on one tensor a phase's
// memory traffic cannot hide under another's arithmetic. The phase-sum bound Σ max(FLOP_i /
// FMA rate, bytes_i / triad) is what this structure can reach; the roofline's max(Σ FLOP,
// Σ bytes) assumes they overlap.
struct ElementCost {
  const char* name;
  double flop, sqrt_div, bytes;
  double phase_flop[4], phase_bytes[4];
};
constexpr ElementCost kCostAdamW = {"adamw", 14, 2, 28, {14, 0, 0, 0}, {28, 0, 0, 0}};
constexpr ElementCost kCostBase2d = {"celo2-base 2-D", 806, 4, 104, {21, 85, 697, 3}, {40, 24, 28, 12}};
constexpr ElementCost kCostBase1d = {"celo2-base 1-D", 537, 16, 152, {28, 52, 454, 3}, {64, 36, 40, 12}};
constexpr bool phases_add_up(const ElementCost& c) {
  double f = 0, b = 0;
  for (int k = 0; k < 4; ++k) {
    f += c.phase_flop[k];
    b += c.phase_bytes[k];
  }
  return f == c.flop && b == c.bytes;
}
static_assert(phases_add_up(kCostAdamW) && phases_add_up(kCostBase2d) && phases_add_up(kCostBase1d),
              "the phases add up to the totals");

double phase_sum_bound(const ElementCost& c, double fma_gflops, double triad_gbs) {
  double t = 0;
  for (int k = 0; k < 4; ++k) t += std::max(c.phase_flop[k] / fma_gflops, c.phase_bytes[k] / triad_gbs);
  return t;
}

const ElementCost& cost_of(bool factored) { return factored ? kCostBase2d : kCostBase1d; }

// ---------------------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------------------

void print_rule(char ch = '-') {
  std::string s(100, ch);
  std::printf("%s\n", s.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"celo2-bench: Celo2 rule, Newton–Schulz and AdamW throughput against the "
               "machine's measured FMA rate, memory bandwidth and sgemm rate"};
  app.add_flag("--quick", o.quick, "small sizes, 3 repetitions (the CTest smoke test)");
  app.add_option("--threads", o.threads, "thread count of the 'all threads' runs (default: all)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--reps", o.reps, "timed repetitions per case (median; default 5, quick 3)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--budget", o.case_budget_s,
                 "seconds per case before repetitions are cut (never below 3)");
  app.add_flag("--phases", o.phases, "also time the fast path's phases one by one (1 thread)");
  app.add_flag("--no-ns", o.no_ns,
               "skip Newton-Schulz (section 4, the orthogonalized rule, the NS-shaped sgemm)");
  app.add_option("--json", o.json_path, "write every number to this JSON file");
  bool no_prefetch = false, prefetch_ab = false, huge_ab = false;
  app.add_flag("--no-prefetch", no_prefetch,
               "the rule's passes without software prefetch (celo2/isa.h cpu_prefetch), to measure what it gives");
  app.add_flag("--huge-ab", huge_ab,
               "also time every Celo2-base case with its arrays on 4 KiB pages (plain std::vector) and on advised huge pages (celo2::assign_huge), call by call alternated, and print the ratio (section 3)");
  app.add_flag("--prefetch-ab", prefetch_ab,
               "also time every Celo2-base case with the software prefetch off and on, call by call "
               "alternated, and print the ratio (section 3)");
  std::string isa_name = "auto";
  app.add_option("--isa", isa_name,
                 "copy of the rule's hot loops: auto (the best this CPU runs), avx512, avx2, base")
      ->capture_default_str();
  // The sharded engine's step on a GPT-shaped tensor set (bench/engine_bench.h); run it
  // under mpirun -np W for the multi-rank numbers.
  celo2::bench::EngineBenchOptions eb;
  bool engine_mode = false;
  app.add_flag("--engine", engine_mode,
               "time the sharded engine's step on a GPT-shaped tensor set (~51M parameters), "
               "per phase; run under mpirun -np W");
  app.add_option("--engine-layers", eb.layers, "GPT layers of --engine")->capture_default_str();
  app.add_option("--engine-d", eb.d, "GPT width of --engine")->capture_default_str();
  app.add_option("--engine-steps", eb.steps, "timed steps of --engine")->capture_default_str();
  app.add_flag("--engine-base", eb.base, "Celo2-base in --engine");
  app.add_option("--engine-overlap", eb.backward_ms,
                 "with --engine: time overlap_grad_reduce off and on behind a backward pass emulated as this "
                 "many ms of host sleep per step (a device computing)");
  app.add_option("--engine-bucket", eb.bucket_elements, "gradient bucket (floats) of --engine-overlap")
      ->capture_default_str();
  celo2::bench::NsGramOptions ng;
  bool ns_gram_mode = false;
  app.add_flag("--ns-gram", ns_gram_mode,
               "Gram vs standard Newton-Schulz at the GPT-3 XL shapes: FLOPs, time, error vs float64");
  app.add_option("--ns-gram-reps", ng.reps, "timed repetitions of --ns-gram")->capture_default_str();
  std::vector<std::string> ng_shapes;
  app.add_option("--ns-gram-shapes", ng_shapes, "shapes of --ns-gram, RxC (default: the GPT-3 XL ones)");
  std::vector<std::string> split_ns_shapes;
  app.add_option("--split-ns", split_ns_shapes,
                 "time one RxC matrix's Newton-Schulz split over every rank, per way of applying the "
                 "polynomial (B on every member, two products with A, B split by rows); run under mpirun")
      ->expected(1, 16);
  std::vector<std::string> phase_shapes;
  app.add_option("--phase-shapes", phase_shapes,
                 "shapes of --phases, N or RxC (default: the largest 1-D size and matrix; a small "
                 "one such as 128x512 times the phases with the data in cache)");
  CLI11_PARSE(app, argc, argv);
  try {
    celo2::set_cpu_isa(celo2::parse_cpu_isa(isa_name));
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "celo2-bench: --isa: %s\n", e.what());
    return 2;
  }
  celo2::set_cpu_prefetch(!no_prefetch);
  if (ns_gram_mode) {
    ng.json_path = o.json_path;
    if (!ng_shapes.empty()) ng.shapes.clear();
    for (const std::string& t : ng_shapes) {
      const size_t x = t.find('x');
      if (x == std::string::npos) fail("--ns-gram-shapes: expected RxC, got " + t);
      else ng.shapes.emplace_back(std::stoll(t.substr(0, x)), std::stoll(t.substr(x + 1)));
    }
    if (g_failed) return 1;
    return celo2::bench::run_ns_gram_bench(ng);
  }
  if (!split_ns_shapes.empty()) {
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (const std::string& t : split_ns_shapes) {
      const size_t x = t.find('x');
      if (x == std::string::npos) {
        std::fprintf(stderr, "celo2-bench: --split-ns: expected RxC, got %s\n", t.c_str());
        return 2;
      }
      shapes.emplace_back(std::stoll(t.substr(0, x)), std::stoll(t.substr(x + 1)));
    }
    return celo2::bench::run_split_ns_bench(shapes, std::max(1, std::min(o.reps, 5)));
  }
  if (engine_mode) {
    eb.ffn = 4 * eb.d;
    return eb.backward_ms > 0 ? celo2::bench::run_overlap_bench(eb) : celo2::bench::run_engine_bench(eb);
  }
  // Line-buffered even into a file, so a run cut short by a timeout keeps what it printed.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (o.quick && app.count("--reps") == 0) o.reps = 3;
  if (o.quick && app.count("--budget") == 0) o.case_budget_s = 2.0;

  const int all = o.threads > 0 ? o.threads : omp_get_max_threads();
  std::vector<int> thread_counts = {1};
  if (all > 1) thread_counts.push_back(all);

  // Sizes. Full: what the issue asks (1M–16M elements; NS at 1024² and 2048×8192). Quick:
  // small enough for a < 30 s smoke test on a loaded 2-core machine.
  const int64_t stream_n = o.quick ? (1 << 20) : (1 << 25);  // 4 MiB / 128 MiB per array
  const std::vector<int64_t> sizes_1d =
      o.quick ? std::vector<int64_t>{1 << 16} : std::vector<int64_t>{1 << 20, 1 << 22, 1 << 24};
  const std::vector<std::vector<int64_t>> shapes_2d =
      o.quick ? std::vector<std::vector<int64_t>>{{256, 256}}
              : std::vector<std::vector<int64_t>>{{1024, 1024}, {2048, 2048}, {2048, 8192}};
  const std::vector<std::pair<int64_t, int64_t>> ns_shapes =
      o.quick ? std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {128, 512}}
              : std::vector<std::pair<int64_t, int64_t>>{{1024, 1024}, {2048, 8192}};

  Json out;
  const std::string corename = celo2::blas_core(), thp = celo2::thp_mode();
  out["config"] = {{"quick", o.quick}, {"reps", o.reps}, {"budget_s", o.case_budget_s},
                   {"threads_all", all}, {"vector_bytes", rule_vec_bytes()},
                   {"openblas_core", corename}, {"thp_mode", thp}, {"blas_threading", celo2::blas_threading()},
                   {"openblas_coretype_env", celo2::blas_coretype_env()},
                   {"statistic", "median"},
                   {"rule_isa", celo2::cpu_isa_name(celo2::cpu_isa())},
                   {"rule_prefetch", celo2::cpu_prefetch()}};
  std::printf("celo2-bench: %s, threads 1 and %d, median of %d (warm-up 1), OpenBLAS core %s "
              "(%s threads), %d-byte vectors (FMA rate and rule copy), rule copy %s%s\n",
              o.quick ? "quick" : "full", all, o.reps, corename.c_str(), celo2::blas_threading(),
              rule_vec_bytes(),
              celo2::cpu_isa_name(celo2::cpu_isa()), celo2::cpu_prefetch() ? "" : ", no prefetch");

  if (const std::string note = celo2::blas_core_note(); !note.empty())
    std::printf("  note: %s\n", note.c_str());

  // ----- 1. Machine rates -----------------------------------------------------------------
  print_rule('=');
  std::printf("1. machine rates\n");
  std::map<int, StreamRates> stream;
  std::map<int, double> fma;
  std::map<std::pair<int, std::string>, double> sgemm;  // (threads, "MxNxK")
  auto gemm_key = [](int64_t r, int64_t c) {
    const int64_t rr = std::min(r, c), cc = std::max(r, c);
    return std::to_string(rr) + "x" + std::to_string(cc) + "x" + std::to_string(rr);
  };
  for (int t : thread_counts) {
    stream[t] = measure_stream(o, stream_n, t);
    fma[t] = measure_fma_gflops(o, t);
    std::printf("  threads %-3d stream copy %7.1f GB/s  triad %7.1f GB/s  FMA %7.1f GFLOP/s\n",
                t, stream[t].copy_gbs, stream[t].triad_gbs, fma[t]);
    out["machine"].push_back({{"threads", t}, {"stream_copy_gbs", stream[t].copy_gbs},
                              {"stream_triad_gbs", stream[t].triad_gbs},
                              {"stream_elements", stream_n}, {"fma_gflops", fma[t]}});
    if (stream[t].triad_gbs <= 0 || fma[t] <= 0) fail("machine rate not positive");
    // The largest product of one NS iteration: B (r×r) · X (r×c), an r×c×r sgemm.
    for (auto [r, c] : ns_shapes) {
      if (o.no_ns) break;
      const int64_t rr = std::min(r, c), cc = std::max(r, c);
      const double gf = measure_sgemm_gflops(o, static_cast<int>(rr), static_cast<int>(cc),
                                             static_cast<int>(rr), t);
      sgemm[{t, gemm_key(r, c)}] = gf;
      std::printf("  threads %-3d sgemm M=%lld N=%lld K=%lld  %7.1f GFLOP/s\n", t,
                  static_cast<long long>(rr), static_cast<long long>(cc),
                  static_cast<long long>(rr), gf);
      out["sgemm"].push_back({{"threads", t}, {"m", rr}, {"n", cc}, {"k", rr}, {"gflops", gf}});
      if (gf <= 0) fail("sgemm rate not positive");
    }
  }

  // ----- 2. AdamW ---------------------------------------------------------------------------
  print_rule('=');
  std::printf("2. fused AdamW (celo2::adamw_update)\n");
  std::map<std::pair<int64_t, int>, double> adamw_ns;  // (n, threads) -> ns/element
  for (int64_t n : sizes_1d) {
    for (int t : thread_counts) {
      const double ns = measure_adamw_ns(o, n, t);
      adamw_ns[{n, t}] = ns;
      const double gbs = kCostAdamW.bytes / ns;
      std::printf("  n=%-5s threads %-3d %7.3f ns/element  %8.1f Melem/s  %6.1f GB/s (%3.0f %% of "
                  "triad)\n",
                  human_count(n).c_str(), t, ns, 1e3 / ns, gbs, 100 * gbs / stream[t].triad_gbs);
      out["adamw"].push_back({{"n", n}, {"threads", t}, {"ns_per_element", ns},
                              {"melem_per_s", 1e3 / ns}, {"gbs", gbs}});
    }
  }
  // 2-D Celo2 cases compare with AdamW at the same element count: make sure it was measured.
  for (const auto& shape : shapes_2d) {
    const int64_t n = shape[0] * shape[1];
    for (int t : thread_counts)
      if (!adamw_ns.count({n, t})) adamw_ns[{n, t}] = measure_adamw_ns(o, n, t);
  }

  // ----- 3. Celo2 rule ----------------------------------------------------------------------
  print_rule('=');
  std::printf("3. Celo2 rule (celo2::celo2_update, Theta::random; orthogonalize has no effect "
              "on 1-D tensors)\n");
  struct RuleRow {
    std::string variant, shape;
    int threads;
    int64_t n;
    bool factored;
    double ns, ratio;
  };
  std::vector<RuleRow> rule_rows;
  {
    std::vector<std::vector<int64_t>> shapes;
    for (int64_t n : sizes_1d) shapes.push_back({n});
    for (const auto& s : shapes_2d) shapes.push_back(s);
    const celo2::RuleConfig base = celo2::RuleConfig::celo2_base();
    const celo2::RuleConfig full;
    const celo2::Theta theta = celo2::Theta::random(full, 42);
    for (const auto& shape : shapes) {
      RuleBench rb(shape);
      for (int variant = 0; variant < 2; ++variant) {
        const bool ortho = variant == 1;
        if (ortho && (!rb.geo.factored || o.no_ns)) continue;
        const celo2::RuleConfig& cfg = ortho ? full : base;
        for (int t : thread_counts) {
          set_threads(t);
          const Timing tm = time_median(o, [&] { rb.step(cfg, theta); });
          if (!all_finite(rb.u.data(), rb.geo.numel)) fail("Celo2 step is not finite");
          RuleRow row{ortho ? "celo2" : "celo2-base", shape_name(shape), t, rb.geo.numel,
                      rb.geo.factored, tm.median_s / rb.geo.numel * 1e9, 0};
          row.ratio = row.ns / adamw_ns.at({row.n, t});
          std::printf("  %-10s %-10s threads %-3d %9.3f ns/element  %8.2f Melem/s  %6.2fx AdamW"
                      "  (%d reps)\n",
                      row.variant.c_str(), row.shape.c_str(), t, row.ns, 1e3 / row.ns, row.ratio,
                      tm.reps);
          out["celo2"].push_back({{"variant", row.variant}, {"shape", shape}, {"threads", t},
                                  {"numel", row.n}, {"ns_per_element", row.ns},
                                  {"melem_per_s", 1e3 / row.ns}, {"ratio_to_adamw", row.ratio},
                                  {"reps", tm.reps}});
          rule_rows.push_back(row);
          if (huge_ab && !ortho) {
            // Plain pages and huge pages alternated call by call, so that both see the same
            // machine; each side steps its own copy of the same state.
            RuleBench plain(rb, RuleBench::Plain{});
            std::vector<double> small_s, huge_s;
            for (int k = 0; k <= std::max(3, o.reps); ++k)  // k = 0 warms both up
              for (RuleBench* b : {&plain, &rb}) {
                const double s = seconds_of([&] { b->step(cfg, theta); });
                if (k > 0) (b == &rb ? huge_s : small_s).push_back(s);
              }
            const double small_ns = median_of(small_s) / rb.geo.numel * 1e9, huge_ns = median_of(huge_s) / rb.geo.numel * 1e9;
            std::printf("  %-10s %-10s threads %-3d 4 KiB pages %9.3f ns, huge pages %9.3f ns: 4k/huge %.2f (THP %s)\n",
                        row.variant.c_str(), row.shape.c_str(), t, small_ns, huge_ns, small_ns / huge_ns, thp.c_str());
            out["huge_ab"].push_back({{"variant", row.variant}, {"shape", shape}, {"threads", t},
                                      {"small_pages_ns_per_element", small_ns}, {"huge_pages_ns_per_element", huge_ns},
                                      {"small_over_huge", small_ns / huge_ns}, {"pairs", huge_s.size()},
                                      {"thp_mode", thp}});
          }
          if (prefetch_ab && !ortho) {
            // Off and on alternated call by call, so that both see the same machine.
            std::vector<double> off_s, on_s;
            for (int k = 0; k <= std::max(3, o.reps); ++k)  // k = 0 warms both up
              for (bool pf : {false, true}) {
                celo2::set_cpu_prefetch(pf);
                const double s = seconds_of([&] { rb.step(cfg, theta); });
                if (k > 0) (pf ? on_s : off_s).push_back(s);
              }
            celo2::set_cpu_prefetch(!no_prefetch);
            const double off_ns = median_of(off_s) / rb.geo.numel * 1e9, on_ns = median_of(on_s) / rb.geo.numel * 1e9;
            std::printf("  %-10s %-10s threads %-3d prefetch off %9.3f ns, on %9.3f ns: off/on %.2f\n",
                        row.variant.c_str(), row.shape.c_str(), t, off_ns, on_ns, off_ns / on_ns);
            out["prefetch_ab"].push_back({{"variant", row.variant}, {"shape", shape}, {"threads", t},
                                          {"off_ns_per_element", off_ns}, {"on_ns_per_element", on_ns},
                                          {"off_over_on", off_ns / on_ns}, {"pairs", on_s.size()}});
          }
        }
      }
    }
  }

  // ----- 4. Newton–Schulz -------------------------------------------------------------------
  print_rule('=');
  std::printf("4. Newton-Schulz (celo2::newton_schulz; GFLOP/s from newton_schulz_flops, which "
              "counts X Xt as a full GEMM)\n");
  struct NsRow {
    std::string shape;
    int threads;
    double gflops, executed_gflops, sgemm_gflops, ratio;
  };
  std::vector<NsRow> ns_rows;
  {
    const celo2::RuleConfig cfg;
    for (auto [r, c] : ns_shapes) {
      if (o.no_ns) break;
      std::vector<float> x(static_cast<size_t>(r * c)), scratch;
      fill_uniform(x, 7, 1.0f);
      const double flops = celo2::newton_schulz_flops(cfg, r, c, celo2::NsMethod::kStandard);
      // What the BLAS calls execute: ssyrk does half of X Xt.
      const double rr = static_cast<double>(std::min(r, c)), cc = static_cast<double>(std::max(r, c));
      const double executed = cfg.ns_iters * (3.0 * rr * rr * cc + 2.0 * rr * rr * rr);
      for (int t : thread_counts) {
        set_threads(t);
        const Timing tm = time_median(o, [&] {
          celo2::newton_schulz(cfg, r, c, x.data(), scratch, celo2::NsMethod::kStandard);
        });
        if (!all_finite(x.data(), r * c)) fail("Newton-Schulz output is not finite");
        NsRow row{std::to_string(r) + "x" + std::to_string(c), t, flops / tm.median_s / 1e9,
                  executed / tm.median_s / 1e9, sgemm.at({t, gemm_key(r, c)}), 0};
        row.ratio = row.gflops / row.sgemm_gflops;
        std::printf("  %-10s threads %-3d %8.3f s  %7.1f GFLOP/s (executed %7.1f)  sgemm %7.1f  "
                    "-> %5.1f %% of sgemm (executed %5.1f %%)\n",
                    row.shape.c_str(), t, tm.median_s, row.gflops, row.executed_gflops,
                    row.sgemm_gflops, 100 * row.ratio, 100 * row.executed_gflops / row.sgemm_gflops);
        out["newton_schulz"].push_back(
            {{"rows", r}, {"cols", c}, {"threads", t}, {"seconds", tm.median_s},
             {"flops", flops}, {"gflops", row.gflops}, {"executed_flops", executed},
             {"executed_gflops", row.executed_gflops}, {"sgemm_gflops", row.sgemm_gflops},
             {"ratio_to_sgemm", row.ratio}, {"reps", tm.reps}});
        ns_rows.push_back(row);
      }
    }
  }

  // ----- 5. Roofline ------------------------------------------------------------------------
  print_rule('=');
  std::printf("5. roofline (bound = max(FLOP / FMA rate, bytes / triad bandwidth); counts in "
              "bench/celo2_bench.cc)\n");
  for (const ElementCost* c : {&kCostAdamW, &kCostBase1d, &kCostBase2d}) {
    std::printf("  %-15s %5.0f FLOP + %2.0f sqrt/div, %4.0f B per element, %5.1f FLOP/B\n",
                c->name, c->flop, c->sqrt_div, c->bytes, c->flop / c->bytes);
    out["roofline"]["costs"].push_back({{"name", c->name}, {"flop", c->flop},
                                        {"sqrt_div", c->sqrt_div}, {"bytes", c->bytes}});
  }
  for (int t : thread_counts)
    std::printf("  threads %-3d machine balance %.1f FLOP/B (FMA %.1f GFLOP/s / triad %.1f GB/s)\n",
                t, fma[t] / stream[t].triad_gbs, fma[t], stream[t].triad_gbs);
  auto roof_line = [&](const std::string& what, const ElementCost& c, int64_t n, int t,
                       double measured_ns) {
    const double fl = c.flop / fma[t], by = c.bytes / stream[t].triad_gbs;
    const double bound = std::max(fl, by), phased = phase_sum_bound(c, fma[t], stream[t].triad_gbs);
    std::printf("  %-26s threads %-3d compute %7.3f ns, memory %7.3f ns -> %s-bound %7.3f ns; "
                "measured %8.3f ns = %5.1f %% of bound (phase-sum bound %6.3f ns: %5.1f %% of it)\n",
                what.c_str(), t, fl, by, fl > by ? "compute" : "memory", bound, measured_ns,
                100 * bound / measured_ns, phased, 100 * phased / measured_ns);
    out["roofline"]["rows"].push_back(
        {{"case", what}, {"numel", n}, {"threads", t}, {"compute_ns", fl}, {"memory_ns", by},
         {"bound_ns", bound}, {"measured_ns", measured_ns},
         {"fraction_of_bound", bound / measured_ns}, {"phase_bound_ns", phased},
         {"fraction_of_phase_bound", phased / measured_ns}});
  };
  for (const auto& [key, ns] : adamw_ns)
    roof_line("adamw n=" + human_count(key.first), kCostAdamW, key.first, key.second, ns);
  double worst_roof = 1e30;
  for (const RuleRow& r : rule_rows)
    if (r.variant == "celo2-base") {
      roof_line("celo2-base " + r.shape, cost_of(r.factored), r.n, r.threads, r.ns);
      const ElementCost& c = cost_of(r.factored);
      const double bound = std::max(c.flop / fma[r.threads], c.bytes / stream[r.threads].triad_gbs);
      worst_roof = std::min(worst_roof, bound / r.ns);
    }

  // ----- 6. Phases --------------------------------------------------------------------------
  if (o.phases) {
    print_rule('=');
    std::printf("6. phases of celo2-base, 1 thread, whole-tensor Slice (ns/element)\n");
    set_threads(1);
    const celo2::RuleConfig cfg = celo2::RuleConfig::celo2_base();
    const celo2::Theta theta = celo2::Theta::random(cfg, 42);
    std::vector<std::vector<int64_t>> shapes;
    for (const std::string& t : phase_shapes) {
      const size_t x = t.find('x');
      if (x == std::string::npos)
        shapes.push_back({std::stoll(t)});
      else
        shapes.push_back({std::stoll(t.substr(0, x)), std::stoll(t.substr(x + 1))});
    }
    if (shapes.empty()) {
      shapes.push_back({sizes_1d.back()});
      shapes.push_back(shapes_2d.back());
    }
    // Celo2-base has no Newton–Schulz, so the MLP pass also sums the output's squares (as
    // celo2_update and the engine run it: phase_mlp's out_sumsq); "output_sumsq" is timed
    // only for the record of the separate pass it replaced, and not added to the total.
    const char* names[] = {"accumulate", "update_factored", "feature_sumsq", "mlp+output_sumsq",
                           "finish"};
    constexpr int kPhases = 5;
    constexpr int kRecord = kPhases + 1;  // and the separate pass, last
    for (const auto& shape : shapes) {
      RuleBench rb(shape);
      const celo2::Geometry& geo = rb.geo;
      const int64_t n = geo.numel;
      celo2::Slice s;
      s.lo = 0;
      s.hi = n;
      s.g = rb.g.data();
      s.p = rb.p.data();
      s.m = rb.state.m.data();
      s.rms = rb.state.rms.data();
      s.v_diag = geo.factored ? nullptr : rb.state.v_diag.data();
      s.plane = rb.state.stride(n);
      s.u = rb.u.data();
      std::vector<double> row_sum, col_sum, sumsq, out_sumsq;
      celo2::FacTables tables;
      std::vector<std::vector<double>> times(kRecord);
      const int reps = std::max(3, o.reps);
      for (int rep = 0; rep <= reps; ++rep) {  // rep 0 is the warm-up
        rb.state.iteration += 1;
        const celo2::StepConstants sc = celo2::StepConstants::of(cfg, rb.state.iteration);
        double p2 = 0.0, mag = 0.0;
        double t[kRecord];
        // As celo2_update and the engine run them: phase 1 squares the element-local
        // channels where it can (rule.h local_sumsq_fits), phase 3 the rest.
        const bool local = celo2::local_sumsq_fits(cfg, geo);
        t[0] = seconds_of([&] {
          row_sum.assign(geo.row_count, 0.0);
          col_sum.assign(geo.col_count, 0.0);
          sumsq.assign(geo.norm_groups * geo.channels(), 0.0);
          celo2::phase_accumulate(cfg, geo, sc, s, row_sum.data(), col_sum.data(), &p2,
                                  local ? sumsq.data() : nullptr);
        });
        t[1] = seconds_of([&] {
          celo2::phase_update_factored(cfg, geo, sc, row_sum.data(), col_sum.data(),
                                       rb.state.v_row.data(), rb.state.v_col.data(), tables);
        });
        t[2] = seconds_of([&] {
          celo2::phase_feature_sumsq(cfg, geo, sc, s, tables, sumsq.data(), 0, local);
        });
        t[3] = seconds_of([&] {
          out_sumsq.assign(geo.norm_groups, 0.0);
          celo2::phase_mlp(cfg, theta, geo, sc, s, tables, sumsq.data(), &mag, out_sumsq.data());
        });
        t[4] = seconds_of([&] { celo2::phase_finish(cfg, geo, sc, s, out_sumsq.data()); });
        std::vector<double> separate(geo.norm_groups, 0.0);
        t[5] = seconds_of([&] { celo2::phase_output_sumsq(geo, s, separate.data()); });
        if (rep > 0)
          for (int ph = 0; ph < kRecord; ++ph) times[ph].push_back(t[ph]);
      }
      if (!all_finite(rb.u.data(), n)) fail("phase-by-phase step is not finite");
      Json prow = {{"shape", shape}, {"numel", n}};
      double total = 0.0;
      std::printf("  %-10s", shape_name(shape).c_str());
      for (int ph = 0; ph < kPhases; ++ph) {
        const double ns = median_of(times[ph]) / n * 1e9;
        total += ns;
        prow[names[ph]] = ns;
        std::printf("  %s %.3f", names[ph], ns);
      }
      prow["total"] = total;
      const double sep = median_of(times[kPhases]) / n * 1e9;
      prow["output_sumsq_separate"] = sep;
      std::printf("  | total %.3f ns/element (the separate output_sumsq pass: %.3f)\n", total, sep);
      out["phases"].push_back(prow);
    }
  }

  // ----- Summary ----------------------------------------------------------------------------
  print_rule('=');
  std::printf("summary (median; ratio = time per element / AdamW's at the same size and "
              "threads)\n");
  std::printf("  %-30s", "case");
  for (int t : thread_counts) std::printf(" | %-26s", (std::to_string(t) + " thread(s)").c_str());
  std::printf("\n");
  print_rule();
  auto row_for = [&](const std::string& label, const std::function<std::string(int)>& cell) {
    std::printf("  %-30s", label.c_str());
    for (int t : thread_counts) std::printf(" | %-26s", cell(t).c_str());
    std::printf("\n");
  };
  char buf[128];
  row_for("stream triad / FMA", [&](int t) {
    std::snprintf(buf, sizeof buf, "%.1f GB/s, %.1f GFLOP/s", stream[t].triad_gbs, fma[t]);
    return std::string(buf);
  });
  for (int64_t n : sizes_1d)
    row_for("adamw n=" + human_count(n), [&](int t) {
      std::snprintf(buf, sizeof buf, "%.3f ns/el", adamw_ns.at({n, t}));
      return std::string(buf);
    });
  std::vector<std::string> seen;
  for (const RuleRow& r : rule_rows) {
    const std::string label = r.variant + " " + r.shape;
    if (std::find(seen.begin(), seen.end(), label) != seen.end()) continue;
    seen.push_back(label);
    row_for(label, [&](int t) {
      for (const RuleRow& x : rule_rows)
        if (x.variant == r.variant && x.shape == r.shape && x.threads == t) {
          std::snprintf(buf, sizeof buf, "%.2f ns/el %5.2fx", x.ns, x.ratio);
          return std::string(buf);
        }
      return std::string("-");
    });
  }
  for (const NsRow& r : ns_rows) {
    if (r.threads != 1) continue;
    row_for("newton-schulz " + r.shape, [&](int t) {
      for (const NsRow& x : ns_rows)
        if (x.shape == r.shape && x.threads == t) {
          std::snprintf(buf, sizeof buf, "%.1f GF/s %4.0f%% sgemm", x.gflops, 100 * x.ratio);
          return std::string(buf);
        }
      return std::string("-");
    });
  }
  print_rule();
  // Targets.
  double worst_base_ratio = 0.0;
  for (const RuleRow& r : rule_rows)
    if (r.variant == "celo2-base" && r.threads == 1)
      worst_base_ratio = std::max(worst_base_ratio, r.ratio);
  double worst_ns = 1e30;
  for (const NsRow& r : ns_rows) worst_ns = std::min(worst_ns, r.ratio);
  const bool base_ok = worst_base_ratio <= 4.0, ns_ok = worst_ns >= 0.70;
  std::printf("  target celo2-base <= 4x AdamW, 1 thread: worst %.2fx -> %s\n", worst_base_ratio,
              base_ok ? "met" : "NOT met");
  const bool roof_ok = worst_roof >= 0.60;
  std::printf("  target celo2-base >= 60%% of roofline:  worst %.1f %% -> %s\n", 100 * worst_roof,
              roof_ok ? "met" : "NOT met");
  if (ns_rows.empty())
    std::printf("  target Newton-Schulz >= 70%% of sgemm:   not measured (--no-ns)\n");
  else
    std::printf("  target Newton-Schulz >= 70%% of sgemm:   worst %.1f %% -> %s\n", 100 * worst_ns,
                ns_ok ? "met" : "NOT met");
  out["targets"] = {{"celo2_base_over_adamw_1thread_worst", worst_base_ratio},
                    {"celo2_base_target", 4.0},
                    {"celo2_base_met", base_ok},
                    {"celo2_base_roofline_worst", worst_roof},
                    {"celo2_base_roofline_target", 0.60},
                    {"celo2_base_roofline_met", roof_ok},
                    {"ns_over_sgemm_worst", ns_rows.empty() ? Json() : Json(worst_ns)},
                    {"ns_target", 0.70},
                    {"ns_met", ns_rows.empty() ? Json() : Json(ns_ok)}};
  out["ok"] = !g_failed;

  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", o.json_path.c_str());
      return 1;
    }
  }
  return g_failed ? 1 : 0;
}
