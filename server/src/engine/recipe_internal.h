// The recipe's pieces that only the engine calls (not user API; the public part is
// celo2/recipe.h): the checks of a registration and of the options at construction.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/recipe.h"

namespace celo2 {

// The checks of a tensor registration: registration still open, a non-empty unique name
// (`taken(name)` says whether it is already registered), a valid shape, non-null pointers for
// a non-empty tensor. Returns the tensor's geometry; throws std::logic_error /
// std::invalid_argument naming the tensor otherwise.
Geometry check_registration(bool closed, const std::string& name,
                            const std::vector<int64_t>& shape, const float* params,
                            const float* grads, const std::function<bool(const std::string&)>& taken);

// The checks every engine makes of its options at construction (rule, theta, schedule, finite
// recipe numbers), filling in the default theta (Theta::project_default) when none is given.
void prepare_options(OptimizerOptions& o);

// Whether `name` is already registered among `entries` (anything with a `name` member): the
// `taken` predicate of check_registration.
template <class Entries>
bool name_taken(const Entries& entries, const std::string& name) {
  for (const auto& e : entries)
    if (e->name == name) return true;
  return false;
}

}  // namespace celo2
