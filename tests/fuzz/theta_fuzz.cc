// libFuzzer target: arbitrary bytes through the checkpoint loader.
// Contract checked: flax::decode and theta_from_value either succeed or throw FormatError /
// std::invalid_argument (anything else escapes and libFuzzer reports it); whatever decodes
// re-encodes, and that encoding is a fixed point of decode+encode.
// Build and run: tests/fuzz/run_fuzz.sh [SECONDS].
#include <cstdint>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <vector>

#include "celo2/flax_msgpack.h"
#include "celo2/theta_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using celo2::flax::FormatError;
  using celo2::flax::Value;
  const std::span<const uint8_t> bytes(data, size);
  try {
    celo2::theta_from_bytes(bytes, celo2::RuleConfig{});
  } catch (const FormatError&) {
  } catch (const std::invalid_argument&) {
  }
  try {
    const Value v = celo2::flax::decode(bytes);
    const std::vector<uint8_t> once = celo2::flax::encode(v);
    if (celo2::flax::encode(celo2::flax::decode(once)) != once) std::abort();
    // Golden-file shaped inputs: a config next to a theta.
    const Value* config = v.find("config");
    const Value* theta = v.find("theta");
    if (config && theta) celo2::theta_from_value(*theta, celo2::config_from_value(*config));
    if (v.find("ff_mod_stack")) celo2::theta_from_value(v, celo2::config_for_theta(v));
  } catch (const FormatError&) {
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
