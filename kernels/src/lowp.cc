// The CPU loops of celo2/lowp.h.
#include "celo2/lowp.h"

#include <stdexcept>

namespace celo2 {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  throw std::invalid_argument("unknown dtype '" + name + "' (expected float32, bfloat16 or float16)");
}

namespace {
void check_half(DType d, const char* what) {
  if (d == DType::kFloat32) throw std::invalid_argument(std::string(what) + ": float32 needs no master");
}
}  // namespace

void store_lowp(DType dtype, uint16_t* dst, const float* src, int64_t n) {
  check_half(dtype, "store_lowp");
  const bool bf = dtype == DType::kBFloat16;
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) dst[i] = lowp::to_half(bf, src[i]);
}

int64_t reseed_master(DType dtype, float* master, const uint16_t* lowp, int64_t n) {
  check_half(dtype, "reseed_master");
  const bool bf = dtype == DType::kBFloat16;
  int64_t changed = 0;
#pragma omp parallel for simd reduction(+ : changed) schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    if (lowp::to_half(bf, master[i]) != lowp[i]) {
      master[i] = lowp::from_half(bf, lowp[i]);
      ++changed;
    }
  }
  return changed;
}

}  // namespace celo2
