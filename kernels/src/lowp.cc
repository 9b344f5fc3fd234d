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

namespace {
// The loops, one copy per format (the format a compile-time constant, so each vectorizes).
template <bool kBf>
void store_t(uint16_t* dst, const float* src, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) dst[i] = kBf ? lowp::to_bf16(src[i]) : lowp::to_f16(src[i]);
}
// Branch-free (a select and a count): every element is written, with its own value where the
// parameter still equals round(master).
template <bool kBf>
int64_t reseed_t(float* master, const uint16_t* lowp, int64_t n) {
  int64_t changed = 0;
#pragma omp parallel for simd reduction(+ : changed) schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t r = kBf ? lowp::to_bf16(master[i]) : lowp::to_f16(master[i]);
    const bool differs = r != lowp[i];
    const float seeded = kBf ? lowp::from_bf16(lowp[i]) : lowp::from_f16(lowp[i]);
    master[i] = differs ? seeded : master[i];
    changed += differs ? 1 : 0;
  }
  return changed;
}
}  // namespace

void store_lowp(DType dtype, uint16_t* dst, const float* src, int64_t n) {
  check_half(dtype, "store_lowp");
  if (dtype == DType::kBFloat16) store_t<true>(dst, src, n);
  else store_t<false>(dst, src, n);
}

int64_t reseed_master(DType dtype, float* master, const uint16_t* lowp, int64_t n) {
  check_half(dtype, "reseed_master");
  return dtype == DType::kBFloat16 ? reseed_t<true>(master, lowp, n) : reseed_t<false>(master, lowp, n);
}

}  // namespace celo2
