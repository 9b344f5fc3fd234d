// `celo2-tool golden`: checks the engine against the golden vectors of spec/celo2.md §8.
//  - rule files (celo2-golden-rule/1): the raw Celo2 step of every tensor at every step,
//    compared as max |error| / RMS(expected step);
//  - optimizer files (celo2-golden-optimizer/1): the full recipe through celo2::Optimizer,
//    compared on the parameter update (params_after − params_before), max |error| / RMS.
// Inputs of each step are the file's own (expected) values, so errors never compound.
#pragma once

#include <string>
#include <vector>

namespace celo2 {

// kFast: the fused CPU rule / Optimizer; kReference: the plain double-precision reference;
// kSharded: the sharded Engine over make_communicator("auto") (run it under mpirun -np N).
enum class GoldenEngine { kFast, kReference, kSharded };

struct GoldenCheck {
  std::string tensor;
  int step = 0;
  double rel_err = 0.0;  // max |error| / RMS(expected)
};

struct GoldenResult {
  std::string path, format;
  std::vector<GoldenCheck> checks;
  double worst = 0.0;
};

// Throws on unreadable or malformed files.
GoldenResult run_golden_file(const std::string& path, GoldenEngine engine);

// Runs every golden file in `files`, comparing with max |error| / RMS(expected) <= tol per
// tensor; prints one line per file (more with `verbose`). Returns the process exit code.
int run_golden_cli(const std::vector<std::string>& files, double tol, bool verbose,
                   GoldenEngine engine = GoldenEngine::kFast);

}  // namespace celo2
