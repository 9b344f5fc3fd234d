// What the control plane (celo2/control.h) drives: the settings, counters and collectives
// the engine (celo2/engine.h, on any backend) exposes at a step boundary; the control plane
// depends on this narrow interface rather than on the whole engine. Every setter is collective-safe: each rank applies the same change at the same
// step boundary, and a setter that throws changes nothing.
#pragma once

#include <cstdint>
#include <string>

#include "celo2/communicator.h"
#include "celo2/labels.h"
#include "celo2/recipe.h"

namespace celo2 {

struct PhaseStats;

class EngineControl {
 public:
  virtual ~EngineControl() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual Communicator& comm() = 0;
  virtual const OptimizerOptions& optimizer_options() const = 0;
  virtual int64_t step_count() const = 0;
  virtual int64_t skipped_steps() const = 0;
  virtual size_t num_tensors() const = 0;
  virtual Label label_of(size_t i) const = 0;
  virtual const PhaseStats& last_phase_stats() const = 0;

  virtual void set_theta(Theta theta) = 0;
  virtual void set_schedule(const Schedule& s) = 0;
  virtual void set_rules(const LabelRules& rules) = 0;
  virtual void set_weight_decay(double wd) = 0;
  virtual void set_mult_1d(double m) = 0;
  virtual void set_max_grad_norm(double v) = 0;
  virtual void save_state(const std::string& path) = 0;  // collective; rank 0 writes
};

}  // namespace celo2
