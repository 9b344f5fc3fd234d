// Host emulation for tests/gpu_host (see include/cuda_runtime.h): the CUDA runtime calls the
// GPU engine makes, the celo2::cuda kernels it launches — each by the CPU implementation the
// CUDA one is tested against (celo2_update, adamw_update) or by the same per-element
// arithmetic — and an NCCL communicator over an ordinary Communicator (MPI or local).
// Everything runs at once, in program order: the engine's stream/event ordering is not what
// this checks (the GPU tests do); its bookkeeping and its collectives' order are.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include "celo2/adamw.h"
#include "celo2/cuda/check.h"
#include "celo2/cuda/rule_cuda.h"
#include "celo2/lowp.h"
#include "host_nccl.h"

// ---- runtime ------------------------------------------------------------------------------
namespace {
std::mutex g_mu;
std::map<const char*, size_t>& allocations() {  // "device" blocks: start -> bytes
  static std::map<const char*, size_t> m;
  return m;
}
struct Token {};  // streams and events are distinct non-null addresses
}  // namespace

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> l(g_mu);
  allocations()[static_cast<const char*>(*p)] = bytes ? bytes : 1;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (!allocations().erase(static_cast<const char*>(p))) return cudaErrorInvalidValue;
  }
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, k);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new Token);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<Token*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned) {
  return e ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new Token);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<Token*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { return e ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.0f;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "host emulation error"; }
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  std::memset(a, 0, sizeof *a);
  std::lock_guard<std::mutex> l(g_mu);
  const char* c = static_cast<const char*>(p);
  auto it = allocations().upper_bound(c);
  if (it != allocations().begin()) {
    --it;
    if (c >= it->first && c < it->first + it->second) {
      a->type = cudaMemoryTypeDevice;
      a->device = 0;
      a->devicePointer = const_cast<void*>(p);
    }
  }
  return cudaSuccess;
}

// ---- celo2::cuda on the host --------------------------------------------------------------
namespace celo2::cuda {

bool device_available(std::string*) { return true; }

NsPrecision parse_ns_precision(const std::string& s) {
  if (s == "float32") return NsPrecision::kFloat32;
  if (s == "tf32") return NsPrecision::kTf32;
  if (s == "bf16") return NsPrecision::kBf16;
  throw std::invalid_argument("unknown Newton-Schulz precision '" + s + "' (float32 | tf32 | bf16)");
}
const char* ns_precision_name(NsPrecision p) {
  return p == NsPrecision::kFloat32 ? "float32" : p == NsPrecision::kTf32 ? "tf32" : "bf16";
}

struct NewtonSchulzCuda::Impl {
  NsPrecision precision;
};
NewtonSchulzCuda::NewtonSchulzCuda(NsPrecision p) : impl_(std::make_unique<Impl>()) { impl_->precision = p; }
NewtonSchulzCuda::~NewtonSchulzCuda() = default;
NsPrecision NewtonSchulzCuda::precision() const { return impl_->precision; }
void NewtonSchulzCuda::reserve(int64_t, int64_t, int64_t) {}
void NewtonSchulzCuda::run_gathered(const RuleConfig&, int64_t, int64_t, int64_t, float*, const int64_t*,
                                    const float*, const int32_t*, cudaStream_t) {
  throw std::logic_error("host emulation: Newton-Schulz runs inside RuleSet::step (celo2_update)");
}
void NewtonSchulzCuda::run(const RuleConfig&, int64_t, int64_t, int64_t, float*, cudaStream_t) {
  throw std::logic_error("host emulation: Newton-Schulz runs inside RuleSet::step (celo2_update)");
}

// The set: one RuleState per tensor, updated by the CPU fast path (which the CUDA kernels are
// tested against), the set's one iteration counter as on the device.
struct RuleSet::Impl {
  RuleConfig cfg;
  Theta theta;
  std::vector<Geometry> geos;
  std::vector<int64_t> offsets;
  std::vector<RuleState> states;
  int64_t total = 0, iteration = 0;
  Workspace ws;
};

RuleSet::RuleSet(const RuleConfig& cfg, const Theta& theta, const std::vector<std::vector<int64_t>>& shapes,
                 std::shared_ptr<NewtonSchulzCuda> ns)
    : impl_(std::make_unique<Impl>()) {
  cfg.validate();
  theta.check_fits(cfg);
  if (!ns) throw std::invalid_argument("RuleSet: null Newton-Schulz runner");
  if (theta.hidden_layers() < 1) throw std::invalid_argument("the CUDA rule needs at least one hidden layer");
  impl_->cfg = cfg;
  impl_->theta = theta;
  for (const auto& s : shapes) {
    impl_->geos.push_back(Geometry::of(s));
    impl_->offsets.push_back(impl_->total);
    impl_->states.push_back(RuleState::zeros(impl_->geos.back()));
    impl_->total += impl_->geos.back().numel;
  }
}
RuleSet::RuleSet(const RuleConfig& cfg, const Theta& theta, const std::vector<std::vector<int64_t>>& shapes,
                 NsPrecision ns)
    : RuleSet(cfg, theta, shapes, std::make_shared<NewtonSchulzCuda>(ns)) {}
RuleSet::~RuleSet() = default;
size_t RuleSet::size() const { return impl_->geos.size(); }
int64_t RuleSet::total() const { return impl_->total; }
int64_t RuleSet::offset(size_t i) const { return impl_->offsets.at(i); }
const Geometry& RuleSet::geometry(size_t i) const { return impl_->geos.at(i); }
int64_t RuleSet::iteration() const { return impl_->iteration; }
void RuleSet::set_iteration(int64_t it) {
  if (it < 0) throw std::invalid_argument("RuleSet::set_iteration: negative iteration");
  impl_->iteration = it;
}
void RuleSet::step(const float* g, const float* p, float* u, cudaStream_t) {
  for (size_t i = 0; i < impl_->geos.size(); ++i) {
    if (impl_->geos[i].numel == 0) continue;
    RuleState& st = impl_->states[i];
    st.iteration = impl_->iteration;
    const int64_t o = impl_->offsets[i];
    celo2_update(impl_->cfg, impl_->theta, impl_->geos[i], st, g + o, p + o, u + o, impl_->ws);
  }
  impl_->iteration += 1;
}
RuleTiming RuleSet::step_timed(const float* g, const float* p, float* u, cudaStream_t s) {
  step(g, p, u, s);
  return {};
}
RuleState RuleSet::download_state(size_t i) const {
  RuleState s = impl_->states.at(i);
  s.iteration = impl_->iteration;
  return s;
}
void RuleSet::upload_state(size_t i, const RuleState& s) {
  const RuleState z = RuleState::zeros(impl_->geos.at(i));
  if (s.m.size() != z.m.size() || s.rms.size() != z.rms.size() || s.v_row.size() != z.v_row.size() ||
      s.v_col.size() != z.v_col.size() || s.v_diag.size() != z.v_diag.size())
    throw std::invalid_argument("RuleSet::upload_state: arrays of the wrong size");
  RuleState& d = impl_->states[i];
  d.m = s.m;
  d.rms = s.rms;
  d.v_row = s.v_row;
  d.v_col = s.v_col;
  d.v_diag = s.v_diag;
}
double RuleSet::elementwise_bytes() const { return 0.0; }
double RuleSet::newton_schulz_flops() const { return 0.0; }

void adamw_device(const AdamWParams& a, int64_t n, float* p, const float* g, float* mu, float* nu, cudaStream_t) {
  if (n > 0) adamw_update(a, n, p, g, mu, nu);
}
void apply_step_device(float lr, float wd, int64_t n, float* p, const float* u, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) p[i] -= ew::applied_step(lr, wd, p[i], u[i]);
}
void bf16_to_float_device(const uint16_t* in, float* out, int64_t n, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) out[i] = lowp::from_bf16(in[i]);
}
void float_to_bf16_device(const float* in, uint16_t* out, int64_t n, cudaStream_t s) {
  store_lowp_device(true, out, in, n, s);
}
void store_lowp_device(bool bf16, uint16_t* dst, const float* src, int64_t n, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lowp::to_half(bf16, src[i]);
}
void reseed_master_device(bool bf16, float* master, const uint16_t* lowp_in, int64_t n,
                          unsigned long long* counter, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i)
    if (lowp::to_half(bf16, master[i]) != lowp_in[i]) {
      master[i] = lowp::from_half(bf16, lowp_in[i]);
      *counter += 1;
    }
}
void scale_device(float* x, float s, int64_t n, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}
void fill_random_device(float*, int64_t, uint64_t, float, cudaStream_t) {
  throw std::logic_error("host emulation: fill_random_device is a benchmark helper");
}
void count_nonfinite_device(const float* x, int64_t n, unsigned long long* counter, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) *counter += std::isfinite(x[i]) ? 0 : 1;
}
void count_nonfinite_bf16_device(const uint16_t* x, int64_t n, unsigned long long* counter, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) *counter += (x[i] & 0x7f80u) == 0x7f80u ? 1 : 0;  // exponent all ones
}
void scale_zero_nonfinite_device(float* x, int64_t n, float scale, unsigned long long* counter, cudaStream_t) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(x[i])) {
      x[i] *= scale;
    } else {
      x[i] = 0.0f;
      *counter += 1;
    }
  }
}
void sumsq_device(const float* x, int64_t n, double*, double* out, cudaStream_t) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  *out += s;
}
void sumsq_diff_device(const float* a, const float* b, int64_t n, double*, double* out, cudaStream_t) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    s += d * d;
  }
  *out += s;
}
void apply_step_sumsq_device(float lr, float wd, int64_t n, float* p, const float* u, double*, double* out,
                             cudaStream_t) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float d = ew::applied_step(lr, wd, p[i], u[i]);
    p[i] -= d;
    s += static_cast<double>(d) * d;
  }
  *out += s;
}

}  // namespace celo2::cuda
