// The single-process Celo2 optimizer: the one engine (celo2/engine.h) at W = 1 on the local
// communicator, with the whole-tensor plan, so every tensor's rule runs whole
// (celo2_update, or the reference kernels with use_reference). The recipe it runs is
// celo2/recipe.h's; there is no second copy of it here.
//
// A C++ trainer registers named tensors (shape, parameter pointer, gradient pointer) in a
// fixed order and calls step(); see Engine for the rest of the interface.
#pragma once

#include "celo2/engine.h"
#include "celo2/recipe.h"

namespace celo2 {

class Optimizer : public Engine {
 public:
  explicit Optimizer(OptimizerOptions options);
  const OptimizerOptions& options() const { return optimizer_options(); }
};

}  // namespace celo2
