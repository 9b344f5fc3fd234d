// Every argument check of the C ABI, in one place (after NCCL's src/misc/argcheck.cc), and
// the one translation of C++ exceptions into celo2_status_t + a thread-local message.
// Entry points in capi.cc look like:
//   celo2_status_t celo2_save(celo2_t* opt, const char* path) {
//     return guarded("celo2_save", [&] { check_handle(opt); check_path(path, "path"); ... });
//   }
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "celo2/celo2.h"
#include "celo2/lowp.h"

namespace celo2::capi {

// Thrown by the checks below; mapped to its status by guarded().
class ArgError : public std::runtime_error {
 public:
  ArgError(celo2_status_t status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
  celo2_status_t status() const { return status_; }

 private:
  celo2_status_t status_;
};

inline constexpr int kMaxNdim = 8;
inline constexpr size_t kMaxNameBytes = 4096;
inline constexpr size_t kMaxTextBytes = size_t{1} << 20;  // option values, rule lists

void check_not_null(const void* p, const char* what);
void check_handle(const void* handle, const char* what = "opt");
// A NUL-terminated string of at most `max` bytes, non-empty unless allow_empty.
std::string check_string(const char* s, const char* what, size_t max = kMaxTextBytes,
                         bool allow_empty = false);
std::string check_name(const char* name);
std::string check_path(const char* path, const char* what);
// ndim in [0, kMaxNdim], sizes >= 0, element count without overflow; returns the count.
int64_t check_shape(int32_t ndim, const int64_t* shape);
// The engine dtype of a C dtype; an unknown value is CELO2_ERR_INVALID_ARGUMENT.
DType check_dtype(celo2_dtype_t dtype);
// params and grads non-null when the tensor has elements; params aligned for dtype, grads
// for float32.
void check_buffers(const void* params, const void* grads, int64_t numel, DType dtype);
void check_out_buffer(char* buf, size_t len);

// Records `msg` as this thread's last error and returns `status`.
celo2_status_t fail(celo2_status_t status, const std::string& msg);
void clear_error();
const char* last_error();

// Runs `body`, mapping every exception to a status and "<api>: <message>".
template <class F>
celo2_status_t guarded(const char* api, F&& body) noexcept;

celo2_status_t status_of_current_exception(const char* api) noexcept;

template <class F>
celo2_status_t guarded(const char* api, F&& body) noexcept {
  clear_error();
  try {
    body();
    return CELO2_OK;
  } catch (...) {
    return status_of_current_exception(api);
  }
}

// Copies `s` into a caller's buffer (the string-returning calls).
celo2_status_t copy_out(const std::string& s, char* buf, size_t len, size_t* needed);

}  // namespace celo2::capi
