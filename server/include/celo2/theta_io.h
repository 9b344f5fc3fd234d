// Loading and saving Celo2 MLP weights in the published theta.state layout
// ({"ff_mod_stack": {"~": {w0__0..w0__13, b0, w1.., b1.., wL, bL}}}, spec/celo2.md §7).
// Every name and shape is checked against the RuleConfig; an older Celo (v1) checkpoint,
// whose arrays carry a leading axis of 1 and hidden size 4, is refused with a message that
// names the mismatch.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/flax_msgpack.h"

namespace celo2 {

Theta theta_from_value(const flax::Value& root, const RuleConfig& cfg);
Theta theta_from_bytes(std::span<const uint8_t> bytes, const RuleConfig& cfg);
Theta load_theta(const std::string& path, const RuleConfig& cfg);

flax::Value theta_to_value(const Theta& theta);
std::vector<uint8_t> theta_to_bytes(const Theta& theta);
void save_theta(const std::string& path, const Theta& theta);  // atomic

// The MLP sizes a theta tree holds (ff_hidden_size from b0, ff_hidden_layers from the
// number of b<l> arrays); every other field keeps its default. Lenient on purpose: it only
// reads sizes, so theta_from_value(root, config_for_theta(root)) then reports every
// mismatch by name. Throws FormatError when there is no ff_mod_stack/~/b0 to read.
RuleConfig config_for_theta(const flax::Value& root);

// The RuleConfig stored in golden files (spec §8 `config` map); unknown keys are errors.
RuleConfig config_from_value(const flax::Value& v);

// Hex SHA-256 of a byte buffer (weights checksums shown by tools and the control plane).
std::string sha256_hex(std::span<const uint8_t> bytes);

}  // namespace celo2
