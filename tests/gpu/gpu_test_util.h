// Shared by the GPU tests: skip without a device (fail when CELO2_REQUIRE_GPU=1), device
// buffers, the spec's error measure.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../unit/test_util.h"
#include "celo2/cuda/check.h"

#define CELO2_NEED_GPU()                                                                  \
  do {                                                                                    \
    std::string celo2_why_;                                                               \
    if (!::celo2::cuda::device_available(&celo2_why_)) {                                  \
      const char* celo2_req_ = std::getenv("CELO2_REQUIRE_GPU");                          \
      if (celo2_req_ && std::strcmp(celo2_req_, "1") == 0)                                \
        FAIL() << "CELO2_REQUIRE_GPU=1 but no usable CUDA device: " << celo2_why_;        \
      GTEST_SKIP() << "no CUDA device (" << celo2_why_                                    \
                   << "); set CELO2_REQUIRE_GPU=1 to make this a failure";                \
    }                                                                                     \
  } while (0)

namespace celo2::gputest {

// A device buffer of floats (or any trivially copyable T).
template <class T = float>
struct DeviceBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuf(size_t count) : n(count) {
    CELO2_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
    CELO2_CUDA_CHECK(cudaMemset(ptr, 0, std::max<size_t>(n, 1) * sizeof(T)));
  }
  explicit DeviceBuf(const std::vector<T>& v) : DeviceBuf(v.size()) { upload(v); }
  ~DeviceBuf() { cudaFree(ptr); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
  // Synchronizes: a pageable cudaMemcpy may return before its DMA ends, and work on a
  // non-blocking stream does not wait for it.
  void upload(const std::vector<T>& v) {
    if (!v.empty()) CELO2_CUDA_CHECK(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    CELO2_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> v(n);
    CELO2_CUDA_CHECK(cudaDeviceSynchronize());
    if (n) CELO2_CUDA_CHECK(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

// The spec §8 error measure and seeded normal data: tests/unit/test_util.h's.
inline double rel_error(const float* got, const float* want, int64_t n) {
  return test_util::rel_err(got, want, static_cast<size_t>(n));
}
using test_util::randn;

}  // namespace celo2::gputest
