// The single-process optimizer: the engine at W = 1 (celo2/optimizer.h).
#include "celo2/optimizer.h"

namespace celo2 {

namespace {
EngineOptions single_process(OptimizerOptions o) {
  EngineOptions eo;
  eo.opt = std::move(o);
  eo.plan = Plan::kWholeTensors;
  return eo;
}
}  // namespace

Optimizer::Optimizer(OptimizerOptions options)
    : Engine(single_process(std::move(options)), make_local_communicator()) {}

}  // namespace celo2
