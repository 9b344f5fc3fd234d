#include "argcheck.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <system_error>

#include "celo2/communicator.h"
#include "celo2/flax_msgpack.h"
#include "celo2/optimizer.h"

namespace celo2::capi {
namespace {
thread_local std::string t_last_error;
}  // namespace

celo2_status_t fail(celo2_status_t status, const std::string& msg) {
  t_last_error = msg;
  return status;
}
void clear_error() { t_last_error.clear(); }
const char* last_error() { return t_last_error.c_str(); }

void check_not_null(const void* p, const char* what) {
  if (!p) throw ArgError(CELO2_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

void check_handle(const void* handle, const char* what) { check_not_null(handle, what); }

std::string check_string(const char* s, const char* what, size_t max, bool allow_empty) {
  check_not_null(s, what);
  const size_t n = strnlen(s, max + 1);
  if (n > max)
    throw ArgError(CELO2_ERR_INVALID_ARGUMENT,
                   std::string(what) + " is longer than " + std::to_string(max) + " bytes");
  if (n == 0 && !allow_empty) throw ArgError(CELO2_ERR_INVALID_ARGUMENT, std::string(what) + " is empty");
  return std::string(s, n);
}

std::string check_name(const char* name) {
  std::string s = check_string(name, "name", kMaxNameBytes);
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f)
      throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "name '" + s + "' holds a control character");
  return s;
}

std::string check_path(const char* path, const char* what) {
  return check_string(path, what, 16384);
}

int64_t check_shape(int32_t ndim, const int64_t* shape) {
  if (ndim < 0 || ndim > kMaxNdim)
    throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "ndim " + std::to_string(ndim) + " is outside [0, " +
                                                   std::to_string(kMaxNdim) + "]");
  if (ndim > 0) check_not_null(shape, "shape");
  int64_t n = 1;
  for (int32_t i = 0; i < ndim; ++i) {
    if (shape[i] < 0)
      throw ArgError(CELO2_ERR_INVALID_ARGUMENT,
                     "shape[" + std::to_string(i) + "] = " + std::to_string(shape[i]) + " is negative");
    if (shape[i] != 0 && n > std::numeric_limits<int64_t>::max() / shape[i])
      throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "shape: element count overflows int64");
    n *= shape[i];
  }
  return n;
}

DType check_dtype(celo2_dtype_t dtype) {
  switch (dtype) {
    case CELO2_FLOAT32: return DType::kFloat32;
    case CELO2_BFLOAT16: return DType::kBFloat16;
    case CELO2_FLOAT16: return DType::kFloat16;
  }
  throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "dtype " + std::to_string(static_cast<int>(dtype)) + " is unknown");
}

void check_buffers(const void* params, const void* grads, int64_t numel, DType dtype) {
  if (numel == 0) return;
  check_not_null(params, "params");
  check_not_null(grads, "grads");
  if (reinterpret_cast<uintptr_t>(params) % dtype_bytes(dtype))
    throw ArgError(CELO2_ERR_INVALID_ARGUMENT, std::string("params are not aligned for ") + dtype_name(dtype));
  if (reinterpret_cast<uintptr_t>(grads) % alignof(float))
    throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "grads are not aligned for float32 (gradients are float32)");
}

void check_out_buffer(char* buf, size_t len) {
  if (len > 0) check_not_null(buf, "buf");
}

celo2_status_t status_of_current_exception(const char* api) noexcept {
  const std::string a = std::string(api) + ": ";
  try {
    throw;
  } catch (const ArgError& e) {
    return fail(e.status(), a + e.what());
  } catch (const flax::FormatError& e) {
    return fail(CELO2_ERR_FORMAT, a + e.what());
  } catch (const flax::IoError& e) {
    return fail(CELO2_ERR_IO, a + e.what());
  } catch (const NonFiniteGradientError& e) {
    return fail(CELO2_ERR_NONFINITE, a + e.what());
  } catch (const UnsupportedError& e) {
    return fail(CELO2_ERR_UNSUPPORTED, a + e.what());
  } catch (const CommError& e) {
    return fail(CELO2_ERR_COMM, a + e.what());
  } catch (const std::invalid_argument& e) {
    return fail(CELO2_ERR_INVALID_ARGUMENT, a + e.what());
  } catch (const std::logic_error& e) {  // e.g. registration closed
    return fail(CELO2_ERR_STATE, a + e.what());
  } catch (const std::system_error& e) {
    return fail(CELO2_ERR_IO, a + e.what());
  } catch (const std::bad_alloc&) {
    return fail(CELO2_ERR_INTERNAL, a + "out of memory");
  } catch (const std::runtime_error& e) {  // the engine's file helpers ("cannot open '...'")
    return fail(CELO2_ERR_IO, a + e.what());
  } catch (const std::exception& e) {
    return fail(CELO2_ERR_INTERNAL, a + e.what());
  } catch (...) {
    return fail(CELO2_ERR_INTERNAL, a + "unknown exception");
  }
}

celo2_status_t copy_out(const std::string& s, char* buf, size_t len, size_t* needed) {
  if (needed) *needed = s.size() + 1;
  if (len < s.size() + 1)
    return fail(CELO2_ERR_BUFFER_TOO_SMALL,
                "buffer of " + std::to_string(len) + " bytes; " + std::to_string(s.size() + 1) + " needed");
  std::memcpy(buf, s.c_str(), s.size() + 1);
  return CELO2_OK;
}

}  // namespace celo2::capi
