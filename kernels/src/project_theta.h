// The project's meta-trained weights, one generated table per rule variant (written by
// `celo2-metatrain export-cpp`, docs/METATRAIN.md). Theta::project_default (config.cc) is
// the one place that chooses between them. Private to kernels/src.
#pragma once

#include <vector>

namespace celo2::detail {

// Theta::values() of each (layer by layer, weights then biases).
const std::vector<float>& project_theta_celo2();       // project_theta.cc: for RuleConfig{}
const std::vector<float>& project_theta_celo2_base();  // project_theta_base.cc: for RuleConfig::celo2_base()

}  // namespace celo2::detail
