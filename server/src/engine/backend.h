// The per-device half of the one engine (celo2/engine.h): memory, element-wise work, the
// rule and the optimizer state of one rank's slice, with no communication. The engine's step
// (the plan, the collectives, the recipe of celo2/recipe.h) is written once and calls a
// Backend for everything that touches tensor memory. Private to server/.
//
// Backends (make_backend(), one list in backend.cc): "cpu" (the fused, vectorized OpenMP
// kernels of kernels/; it also runs the rule in phases on slices, Plan::kFlat),
// "reference" (the plain double-precision transcription of the spec, whole tensors only) and,
// in CUDA builds, "cuda" (device memory, the multi-tensor CUDA rule, whole tensors only). A
// backend that lacks an operation says so by name (UnsupportedError), never does something
// else.
//
// Memory: pointers given to and returned by a Backend are in its memory (the host for "cpu",
// the device for "cuda"), and so are the trainer's parameters and gradients the engine is
// given. The optimizer state of each registered tensor's slice is the backend's; the engine
// moves it only through get_state / set_state (checkpoints, resharding).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "celo2/adamw.h"
#include "celo2/config.h"
#include "celo2/labels.h"
#include "celo2/lowp.h"
#include "celo2/rule.h"

namespace celo2 {

// One tensor's optimizer state on one rank, on the host: per-element planes of the rank's
// slice (planar, as RuleState: m[k * stride + i], stride >= len) and the small replicated
// factored vectors.
struct SliceState {
  // celo2: m, rms, v_diag over the slice's len elements, `rule.plane` apart (0: len, packed),
  // and the tensor's whole v_row / v_col. Its `iteration` is not kept here (the engine
  // counts updates per tensor and hands the count to each call).
  RuleState rule;
  std::vector<float> mu, nu;  // adamw
  // Zeros for `label` on a slice of `len` elements of a tensor of geometry `geo`, the Celo2
  // planes `plane` apart (0: len).
  static SliceState zeros(Label label, const Geometry& geo, int64_t len, int64_t plane = 0);
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Whether its buffers are host memory.
  virtual bool host() const { return true; }
  // The stride of the per-element state planes it keeps for a slice of len elements
  // (SliceState::plane): len, packed, unless the backend's kernels prefer a skew.
  virtual int64_t state_plane(int64_t len) const { return len; }
  // Called first on the engine's worker thread (the gradient buckets of overlap_grad_reduce:
  // copy, scale), so that thread works on the backend's device.
  virtual void bind_thread() {}

  // ---- memory ----
  virtual float* alloc(int64_t n) = 0;  // n floats, zero-filled (n may be 0)
  virtual void release(float* p) noexcept = 0;
  virtual void copy(float* dst, const float* src, int64_t n) = 0;
  virtual void to_host(float* host, const float* src, int64_t n) = 0;
  virtual void from_host(float* dst, const float* host, int64_t n) = 0;

  // ---- element-wise ----
  virtual void scale(float* x, int64_t n, float s) = 0;
  // Adds the number of non-finite entries of g to *nonfinite and the sum of squares of the
  // finite ones to *sumsq (double).
  virtual void grad_stats(const float* g, int64_t n, double* nonfinite, double* sumsq) = 0;
  virtual void zero_nonfinite(float* x, int64_t n) = 0;
  // The celo2 branch's apply p ← p − lr·(u + wd·p); returns Σ (applied update)².
  virtual double apply(float lr, float wd, int64_t n, float* p, const float* u) = 0;
  // bf16/fp16 parameters and their float32 masters (celo2/lowp.h): dst = round(src); and
  // master re-seeded where the parameter differs from round(master), returning how many.
  virtual void store_lowp(DType d, uint16_t* dst, const float* src, int64_t n) = 0;
  virtual int64_t reseed_master(DType d, float* master, const uint16_t* lowp, int64_t n) = 0;

  // ---- the state of tensor t's slice ----
  virtual void set_state(size_t t, SliceState s) = 0;
  virtual SliceState get_state(size_t t) = 0;
  virtual int64_t state_bytes() const = 0;

  // ---- the rule and the AdamW branch ----
  // The rule on whole tensors (Plan::kWholeTensors), all of this rank's Celo2 tensors of one
  // step at once: writes each raw step into u. `iteration` is the tensor's update count after
  // this update.
  struct Whole {
    size_t t;
    const Geometry* geo;
    int64_t iteration;
    const float* g;
    const float* p;
    float* u;
  };
  virtual void rule_whole(const RuleConfig& cfg, const Theta& theta, const std::vector<Whole>& tensors) = 0;
  // AdamW on tensor t's slice (n elements, its state); returns Σ (applied update)².
  virtual double adamw(size_t t, const AdamWParams& a, int64_t n, float* p, const float* g) = 0;
  // Whether it runs the rule's phases on slices (Plan::kFlat). Those kernels need the state
  // in host memory: host_state() returns it (nullptr on backends without them).
  virtual bool slice_phases() const { return false; }
  virtual SliceState* host_state(size_t t) { (void)t; return nullptr; }
};

// The one place a backend is chosen: "cpu", "reference", or one registered by a build
// (register_backend; "cuda" in CUDA builds). Throws UnsupportedError naming the known ones.
std::unique_ptr<Backend> make_backend(const std::string& name);
void register_backend(const std::string& name, std::function<std::unique_ptr<Backend>()> factory);
std::vector<std::string> backend_names();

// Floats in a backend's memory, grown on demand (never shrunk by resize).
class BackendBuffer {
 public:
  BackendBuffer() = default;
  explicit BackendBuffer(Backend* b) : b_(b) {}
  BackendBuffer(const BackendBuffer&) = delete;
  BackendBuffer& operator=(const BackendBuffer&) = delete;
  ~BackendBuffer() { reset(); }
  void bind(Backend* b) { reset(); b_ = b; }
  // Size n. Growing reallocates (zeros; old contents are not kept); shrinking keeps the space.
  void resize(int64_t n) {
    if (n > cap_) {
      float* p = b_->alloc(n);
      if (p_) b_->release(p_);
      p_ = p;
      cap_ = n;
    }
    n_ = n;
  }
  float* data() const { return p_; }
  int64_t size() const { return n_; }
  int64_t capacity() const { return cap_; }
  void reset() {
    if (p_ && b_) b_->release(p_);
    p_ = nullptr;
    n_ = cap_ = 0;
  }

 private:
  Backend* b_ = nullptr;
  float* p_ = nullptr;
  int64_t n_ = 0, cap_ = 0;
};

}  // namespace celo2
