// Newton–Schulz methods (celo2/newton_schulz.h): the Gram iteration against the plain double
// reference, the standard BLAS path unchanged, the FLOP counts and the method choice, and
// every golden file with the Gram iteration forced on every matrix.
#include <gtest/gtest.h>

#include <filesystem>

#include "celo2/newton_schulz.h"
#include "golden.h"
#include "test_util.h"

namespace celo2 {
namespace {

using test_util::rel_err;

std::vector<float> randn(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = nd(rng);
  return v;
}

TEST(NewtonSchulz, TheLoadedBlasHasTheBuildsThreadPool) {
  // The build links OpenBLAS's OpenMP build by path (CMakeLists.txt, CELO2_BLAS); the loader
  // must find that one through the RPATH, not the system default (the pthread build).
  const std::string got = blas_threading();
  if (std::string(CELO2_BLAS_THREADING) == "openmp") {
    EXPECT_EQ(got, "openmp");
  } else {
    EXPECT_TRUE(got == "pthread" || got == "openmp" || got == "sequential") << got;
  }
}

// OPENBLAS_CORETYPE forcing AVX2 kernels on an AVX-512 CPU is named (docs/PERF.md "A fourth
// CPU": Newton–Schulz 1.6-1.8x slower); a family with AVX-512 kernels, no override, or a CPU
// without AVX-512 gives no note.
TEST(NewtonSchulz, ABlasForcedOntoNarrowerKernelsIsNamed) {
  const std::string note = blas_core_note("Haswell", "Haswell", true);
  EXPECT_NE(note.find("OPENBLAS_CORETYPE=Haswell"), std::string::npos) << note;
  EXPECT_NE(note.find("AVX-512"), std::string::npos) << note;
  EXPECT_EQ(blas_core_note("Zen", "zen", true).empty(), false);
  EXPECT_EQ(blas_core_note("SkylakeX", "SkylakeX", true), "");
  EXPECT_EQ(blas_core_note("Cooperlake", "cooperlake", true), "");
  EXPECT_EQ(blas_core_note("Haswell", nullptr, true), "");
  EXPECT_EQ(blas_core_note("Haswell", "", true), "");
  EXPECT_EQ(blas_core_note("Haswell", "Haswell", false), "");
  EXPECT_FALSE(blas_core().empty());
}

TEST(NewtonSchulz, InsideAParallelRegionEqualsOutside) {
  // The engine runs whole matrices' Newton–Schulz on OpenMP threads (one matrix each); BLAS
  // called from inside the region must give the same result as from outside. Tolerance:
  // 1e-5 max|err|/RMS (GEMM blocking may differ with the thread count; measured 0 here, with
  // OpenBLAS's OpenMP and pthread builds alike).
  const RuleConfig cfg;
  const int64_t rows = 96, cols = 200;
  std::vector<std::vector<float>> x(4), ref(4);
  std::vector<float> scratch;
  for (size_t k = 0; k < x.size(); ++k) {
    x[k] = randn(rows * cols, 40 + k);
    ref[k] = x[k];
    newton_schulz(cfg, rows, cols, ref[k].data(), scratch);
  }
#pragma omp parallel num_threads(2)
  {
    std::vector<float> s;
#pragma omp for schedule(dynamic, 1)
    for (size_t k = 0; k < x.size(); ++k) newton_schulz(cfg, rows, cols, x[k].data(), s);
  }
  for (size_t k = 0; k < x.size(); ++k) EXPECT_LE(rel_err(x[k], ref[k]), 1e-5) << k;
}

TEST(NewtonSchulz, GramEqualsTheReference) {
  // Exact in real arithmetic: only float32 rounding separates it from the double reference.
  // Tolerance: the golden files' 1e-4 (max|err| / RMS); measured 1e-5..6e-5 here.
  const RuleConfig cfg;
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{48, 160}, {160, 48}, {64, 64}, {1, 9}, {9, 1}, {33, 200}})
    for (int restart : {0, 1, 2, 3}) {
      SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols) + " restart " + std::to_string(restart));
      const std::vector<float> x0 = randn(rows * cols, rows * 1000 + cols);
      std::vector<float> want = x0, got = x0, scratch;
      newton_schulz_reference(cfg, rows, cols, want.data());
      newton_schulz(cfg, rows, cols, got.data(), scratch, NsMethod::kGram, restart);
      EXPECT_LE(rel_err(got, want), 1e-4);
    }
}

TEST(NewtonSchulz, Float64BlasEqualsTheReference) {
  const RuleConfig cfg;
  const std::vector<float> x0 = randn(40 * 90, 5);
  std::vector<float> want = x0;
  std::vector<double> got(x0.begin(), x0.end());
  newton_schulz_reference(cfg, 40, 90, want.data());
  newton_schulz_f64(cfg, 40, 90, got.data());
  std::vector<float> gotf(got.begin(), got.end());
  EXPECT_LE(rel_err(gotf, want), 1e-6);
}

TEST(NewtonSchulz, MethodChoiceAndFlops) {
  const RuleConfig cfg;
  // The default is the standard iteration everywhere (Gram's error on low-rank inputs is
  // above the golden tolerance: docs/PERF.md); Gram is chosen explicitly.
  EXPECT_EQ(ns_method_for(2048, 8192), NsMethod::kStandard);
  EXPECT_EQ(ns_method_for(2048, 8192, NsMethod::kGram), NsMethod::kGram);
  // GEMM-equivalent FLOPs, r = 2048: standard 5 (4 r²c + 2 r³); Gram 4 r²c + 34 r³ without
  // restarts, + 4 r²c − 4 r³ per restart (which also drops one P·Q).
  const double r = 2048, c = 8192;
  EXPECT_DOUBLE_EQ(newton_schulz_flops(cfg, 2048, 8192, NsMethod::kStandard), 5 * (4 * r * r * c + 2 * r * r * r));
  EXPECT_DOUBLE_EQ(newton_schulz_flops(cfg, 2048, 8192, NsMethod::kGram, 0), 4 * r * r * c + 34 * r * r * r);
  EXPECT_DOUBLE_EQ(newton_schulz_flops(cfg, 2048, 8192, NsMethod::kGram, 2),
                   4 * r * r * c + 34 * r * r * r + 2 * (4 * r * r * c - 4 * r * r * r - 2 * r * r * r));
  EXPECT_LT(newton_schulz_flops(cfg, 2048, 8192, NsMethod::kGram, 0),
            0.6 * newton_schulz_flops(cfg, 2048, 8192, NsMethod::kStandard));
  EXPECT_GT(newton_schulz_flops(cfg, 2048, 2048, NsMethod::kGram, 0),
            newton_schulz_flops(cfg, 2048, 2048, NsMethod::kStandard));
  set_ns_method_default(NsMethod::kGram, 0);
  EXPECT_EQ(ns_method_for(8, 8), NsMethod::kGram);
  set_ns_method_default(NsMethod::kAuto);
  EXPECT_EQ(ns_method_for(8, 8), NsMethod::kStandard);
}

TEST(NewtonSchulz, EveryGoldenFileWithGramForced) {
  // Every matrix of every golden file through the Gram iteration (restart 2), fast path, at
  // the spec's tolerance.
  set_ns_method_default(NsMethod::kGram, 2);
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(CELO2_GOLDEN_DIR)) {
    if (e.path().extension() != ".msgpack") continue;
    const GoldenResult r = run_golden_file(e.path().string(), GoldenEngine::kFast);
    for (const auto& c : r.checks)
      EXPECT_LE(c.rel_err, 1e-4) << e.path() << " step " << c.step << " tensor " << c.tensor;
    ++files;
  }
  set_ns_method_default(NsMethod::kAuto);
  EXPECT_EQ(files, 13);
}

}  // namespace
}  // namespace celo2
