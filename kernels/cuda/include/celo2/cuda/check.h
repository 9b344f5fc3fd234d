// Error checking for every CUDA runtime and cuBLAS call (STYLE.md 8): a failed call throws
// celo2::cuda::CudaError naming the call, the file and the line, so a bad launch is never a
// silent wrong answer. NCCL calls use the same error type (server/src/comm/nccl_communicator.cc).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace celo2::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_cuda(const char* what, const std::string& detail,
                                    const char* file, int line) {
  throw CudaError(std::string(what) + " failed: " + detail + " (" + file + ":" +
                  std::to_string(line) + ")");
}

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

// True when this process can use at least one CUDA device (no throw: for tests and tools).
bool device_available(std::string* why = nullptr);

}  // namespace celo2::cuda

#define CELO2_CUDA_CHECK(call)                                                        \
  do {                                                                                \
    const cudaError_t celo2_err_ = (call);                                            \
    if (celo2_err_ != cudaSuccess)                                                    \
      ::celo2::cuda::throw_cuda(#call, cudaGetErrorString(celo2_err_), __FILE__, __LINE__); \
  } while (0)

#define CELO2_CUBLAS_CHECK(call)                                                      \
  do {                                                                                \
    const cublasStatus_t celo2_st_ = (call);                                          \
    if (celo2_st_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::celo2::cuda::throw_cuda(#call, ::celo2::cuda::cublas_status_name(celo2_st_),  \
                                __FILE__, __LINE__);                                  \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, named by the kernel.
#define CELO2_CUDA_LAUNCH_CHECK(name)                                                 \
  do {                                                                                \
    const cudaError_t celo2_err_ = cudaPeekAtLastError();                             \
    if (celo2_err_ != cudaSuccess)                                                    \
      ::celo2::cuda::throw_cuda("launch of " name, cudaGetErrorString(celo2_err_),    \
                                __FILE__, __LINE__);                                  \
  } while (0)
