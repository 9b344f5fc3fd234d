// The per-device half of the one engine (celo2/engine.h): the work on one rank's own data,
// with no communication. The engine's step (the plan, the collectives, the recipe) is
// written once and calls a Backend for the rule and the AdamW branch. Private to server/.
//
// Backends: "cpu" (the fused, vectorized, OpenMP kernels of kernels/, which also run the
// rule in phases on slices for Plan::kFlat) and "reference" (the plain double-precision
// transcription of the spec, whole tensors only): tests compare the two through the same
// engine. A backend that lacks an operation says so by name (UnsupportedError), never by
// doing something else.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "celo2/adamw.h"
#include "celo2/config.h"
#include "celo2/rule.h"

namespace celo2 {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Whether it runs the rule's phases on slices of tensors (Plan::kFlat). A backend that
  // does not runs the rule on whole tensors only (Plan::kWholeTensors).
  virtual bool slice_phases() const = 0;
  // The rule on one whole tensor: updates `st` (iteration += 1) and writes the raw Celo2
  // step into u (numel floats).
  virtual void rule_whole(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                          RuleState& st, const float* g, const float* p, float* u) = 0;
  // The AdamW branch on n elements; returns Σ (applied update)² in double.
  virtual double adamw(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu,
                       float* nu) = 0;
};

// "cpu" (reference = false) or "reference".
std::unique_ptr<Backend> make_cpu_backend(bool reference);

}  // namespace celo2
