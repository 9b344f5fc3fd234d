// The GPU engine (celo2/gpu_engine.h): host orchestration of the CUDA rule kernels and the
// NCCL communicator's asynchronous collectives. No kernels of its own.
#include "celo2/gpu_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "celo2/cuda/check.h"
#include "celo2/cuda/rule_cuda.h"
#include "celo2/flax_msgpack.h"
#include "celo2/state_file.h"
#include "celo2/theta_io.h"

namespace celo2 {

DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32") return DType::kFloat32;
  if (s == "bfloat16" || s == "bf16") return DType::kBFloat16;
  throw std::invalid_argument("unknown dtype '" + s + "' (float32 | bfloat16)");
}

const char* dtype_name(DType d) { return d == DType::kFloat32 ? "float32" : "bfloat16"; }

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

size_t dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <class T>
T* dalloc(int64_t n) {
  T* p = nullptr;
  if (n > 0) CELO2_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(n) * sizeof(T)));
  return p;
}

bool is_device_pointer(const void* p, int device) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) && a.device == device;
}

}  // namespace

struct GpuEngine::Entry {
  std::string name;
  Geometry geo;
  DType pdt = DType::kFloat32, gdt = DType::kFloat32;
  void* params = nullptr;
  const void* grads = nullptr;
  Label label = Label::kCelo2;
  int64_t iteration = 0;  // celo2 updates of this tensor's state
  int64_t count = 0;      // adamw updates
  // Host copy of an owned tensor's state while the groups are rebuilt (or from a file).
  bool has_snapshot = false;
  RuleState rule;
  std::vector<float> mu, nu, master;
  bool master_valid = false;  // bf16 parameters: the device master holds the tensor
  int set_index = -1;         // index inside its group's RuleSet / AdamW bucket

  void reset_branch() {
    iteration = 0;
    count = 0;
    has_snapshot = false;
    rule = RuleState{};
    mu.clear();
    nu.clear();
  }
};

struct GpuEngine::Group {
  std::unique_ptr<cuda::RuleSet> rule;  // celo2 buckets
  float* mu = nullptr;                  // adamw buckets
  float* nu = nullptr;
  cudaEvent_t reduced = nullptr, done = nullptr;
  Group() {
    CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&reduced, cudaEventDisableTiming));
    CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  }
  ~Group() {
    cudaFree(mu);
    cudaFree(nu);
    if (reduced) cudaEventDestroy(reduced);
    if (done) cudaEventDestroy(done);
  }
};

struct GpuEngine::Device {
  int device = 0;
  cudaStream_t compute = nullptr;
  // Flat buffers over the tensors this rank owns (plan_.flat_offset): reduced gradients,
  // float32 parameters (the master of bf16 ones), Celo2 directions; bf16 reduce landing.
  float *g = nullptr, *p = nullptr, *u = nullptr;
  uint16_t* gstage = nullptr;
  int64_t flat = 0;
  unsigned long long* counters = nullptr;  // [0] local non-finite, [1] zeroed after the sum
  double* stats = nullptr;                 // gradient squares [3], update squares [3]
  double* partials = nullptr;              // sumsq scratch
  unsigned long long* h_counters = nullptr;
  double* h_stats = nullptr;
  cudaEvent_t start = nullptr, compute_end = nullptr, comm_end = nullptr;

  explicit Device(int dev) : device(dev) {
    CELO2_CUDA_CHECK(cudaSetDevice(dev));
    CELO2_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    counters = dalloc<unsigned long long>(2);
    stats = dalloc<double>(6);
    partials = dalloc<double>(cuda::kSumsqBlocks);
    CELO2_CUDA_CHECK(cudaMallocHost(&h_counters, 2 * sizeof(unsigned long long)));
    CELO2_CUDA_CHECK(cudaMallocHost(&h_stats, 6 * sizeof(double)));
    for (cudaEvent_t* e : {&start, &compute_end, &comm_end})
      CELO2_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  }
  ~Device() {
    if (compute) cudaStreamSynchronize(compute);
    free_flat();
    cudaFree(counters);
    cudaFree(stats);
    cudaFree(partials);
    cudaFreeHost(h_counters);
    cudaFreeHost(h_stats);
    for (cudaEvent_t e : {start, compute_end, comm_end})
      if (e) cudaEventDestroy(e);
    if (compute) cudaStreamDestroy(compute);
  }
  void free_flat() {
    cudaFree(g);
    cudaFree(p);
    cudaFree(u);
    cudaFree(gstage);
    g = p = u = nullptr;
    gstage = nullptr;
    flat = 0;
  }
  void alloc_flat(int64_t n, bool bf16_grads) {
    free_flat();
    flat = n;
    g = dalloc<float>(n);
    p = dalloc<float>(n);
    u = dalloc<float>(n);
    if (bf16_grads) gstage = dalloc<uint16_t>(n);
  }
};

GpuEngine::GpuEngine(GpuEngineOptions options, std::shared_ptr<NcclCommunicator> comm)
    : opts_(std::move(options)), comm_(std::move(comm)) {
  if (!comm_) throw std::invalid_argument("GpuEngine: null communicator");
  OptimizerOptions& o = opts_.opt;
  o.rule.validate();
  if (o.theta.layers.empty()) o.theta = Theta::project_default(o.rule);
  o.theta.check_fits(o.rule);
  o.schedule.validate();
  require_finite("weight_decay", o.weight_decay);
  require_finite("mult_1d", o.mult_1d);
  if (o.use_reference) throw std::invalid_argument("GpuEngine: use_reference is a CPU option");
  if (opts_.bucket_bytes < 4) throw std::invalid_argument("GpuEngine: bucket_bytes must be >= 4");
  cuda::parse_ns_precision(opts_.ns_precision);  // throws on an unknown name
  dev_ = std::make_unique<Device>(comm_->device());
}

GpuEngine::~GpuEngine() {
  // Destructors must not throw; a failed communicator has been reported already.
  if (dev_ && dev_->compute) cudaStreamSynchronize(dev_->compute);
  groups_.clear();
}

int GpuEngine::rank() const { return comm_->rank(); }
int GpuEngine::world_size() const { return comm_->size(); }
size_t GpuEngine::num_tensors() const { return entries_.size(); }
Label GpuEngine::label_of(size_t i) const { return entries_.at(i)->label; }

void GpuEngine::add_tensor(const std::string& name, std::vector<int64_t> shape, DType param_dtype,
                           void* params, DType grad_dtype, const void* grads) {
  auto e = std::make_unique<Entry>();
  e->geo = check_registration(plan_ready_, name, shape, static_cast<const float*>(params),
                              static_cast<const float*>(grads), [&](const std::string& n) {
                                for (const auto& x : entries_)
                                  if (x->name == n) return true;
                                return false;
                              });
  if (e->geo.numel > 0) {
    if (!is_device_pointer(params, dev_->device))
      throw std::invalid_argument("add_tensor('" + name + "'): params are not memory of CUDA device " +
                                  std::to_string(dev_->device));
    if (!is_device_pointer(grads, dev_->device))
      throw std::invalid_argument("add_tensor('" + name + "'): grads are not memory of CUDA device " +
                                  std::to_string(dev_->device));
  }
  e->name = name;
  e->pdt = param_dtype;
  e->gdt = grad_dtype;
  e->params = params;
  e->grads = grads;
  entries_.push_back(std::move(e));
  relabel();
}

void GpuEngine::relabel() {
  std::vector<TensorDesc> descs;
  for (const auto& e : entries_) descs.push_back({e->name, e->geo.shape});
  const std::vector<Label> labels = opts_.opt.rules.assign(descs);
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    if (e.label != labels[i]) {
      e.label = labels[i];
      e.reset_branch();
    }
  }
}

// Copies the state of every tensor this rank owns to the host (entries' snapshots).
void GpuEngine::snapshot_states() {
  if (!plan_ready_) return;
  CELO2_CUDA_CHECK(cudaStreamSynchronize(dev_->compute));
  const int me = comm_->rank();
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    const GpuBucket& bk = plan_.buckets[b];
    if (bk.owner != me || !groups_[b]) continue;
    Group& g = *groups_[b];
    int64_t off = 0;
    for (int t : bk.tensors) {
      Entry& e = *entries_[t];
      const int64_t n = e.geo.numel;
      if (e.label != bk.label) {  // relabelled since: its old state is dropped
        off += n;
        continue;
      }
      if (bk.label == Label::kCelo2) {
        e.rule = g.rule->download_state(static_cast<size_t>(e.set_index));
      } else {
        e.mu.resize(n);
        e.nu.resize(n);
        CELO2_CUDA_CHECK(cudaMemcpy(e.mu.data(), g.mu + off, n * 4, cudaMemcpyDeviceToHost));
        CELO2_CUDA_CHECK(cudaMemcpy(e.nu.data(), g.nu + off, n * 4, cudaMemcpyDeviceToHost));
      }
      e.has_snapshot = true;
      off += n;
    }
  }
  // bf16 masters travel with their tensor's new flat offset.
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    if (e.pdt != DType::kBFloat16 || !e.master_valid || plan_.owner[t] != me || plan_.flat_offset[t] < 0)
      continue;
    e.master.resize(e.geo.numel);
    CELO2_CUDA_CHECK(cudaMemcpy(e.master.data(), dev_->p + plan_.flat_offset[t], e.geo.numel * 4,
                                cudaMemcpyDeviceToHost));
  }
}

// Builds the plan and this rank's groups from the entries (labels, counters) and their
// snapshots; on failure (a theta the CUDA rule cannot run, out of memory) the snapshots
// are kept so that the caller can rebuild with the previous options.
void GpuEngine::regroup(bool snapshot) {
  if (snapshot) snapshot_states();
  std::vector<GpuPlanTensor> pt;
  bool bf16_grads = false;
  for (const auto& e : entries_) {
    pt.push_back({e->geo.shape, e->label, e->label == Label::kAdamW ? e->count : e->iteration});
    bf16_grads |= e->gdt == DType::kBFloat16;
  }
  GpuPlan plan = GpuPlan::build(pt, comm_->size(), opts_.bucket_bytes);
  const int me = comm_->rank();
  groups_.clear();
  dev_->alloc_flat(plan.owned_elements[me], bf16_grads);
  std::vector<std::unique_ptr<Group>> groups(plan.buckets.size());
  const cuda::NsPrecision nsp = cuda::parse_ns_precision(opts_.ns_precision);
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    const GpuBucket& bk = plan.buckets[b];
    if (bk.owner != me) continue;
    auto g = std::make_unique<Group>();
    if (bk.label == Label::kCelo2) {
      std::vector<std::vector<int64_t>> shapes;
      for (int t : bk.tensors) shapes.push_back(entries_[t]->geo.shape);
      g->rule = std::make_unique<cuda::RuleSet>(opts_.opt.rule, opts_.opt.theta, shapes, nsp);
      g->rule->set_iteration(bk.counter);
      for (size_t k = 0; k < bk.tensors.size(); ++k) {
        Entry& e = *entries_[bk.tensors[k]];
        e.set_index = static_cast<int>(k);
        if (e.has_snapshot) g->rule->upload_state(k, e.rule);
      }
    } else {
      g->mu = dalloc<float>(bk.elements);
      g->nu = dalloc<float>(bk.elements);
      CELO2_CUDA_CHECK(cudaMemset(g->mu, 0, bk.elements * 4));
      CELO2_CUDA_CHECK(cudaMemset(g->nu, 0, bk.elements * 4));
      int64_t off = 0;
      for (size_t k = 0; k < bk.tensors.size(); ++k) {
        Entry& e = *entries_[bk.tensors[k]];
        e.set_index = static_cast<int>(k);
        const int64_t n = e.geo.numel;
        if (e.has_snapshot && static_cast<int64_t>(e.mu.size()) == n) {
          CELO2_CUDA_CHECK(cudaMemcpy(g->mu + off, e.mu.data(), n * 4, cudaMemcpyHostToDevice));
          CELO2_CUDA_CHECK(cudaMemcpy(g->nu + off, e.nu.data(), n * 4, cudaMemcpyHostToDevice));
        }
        off += n;
      }
    }
    groups[b] = std::move(g);
  }
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    if (e.pdt == DType::kBFloat16 && plan.owner[t] == me && plan.flat_offset[t] >= 0 &&
        e.master_valid && static_cast<int64_t>(e.master.size()) == e.geo.numel)
      CELO2_CUDA_CHECK(cudaMemcpy(dev_->p + plan.flat_offset[t], e.master.data(), e.geo.numel * 4,
                                  cudaMemcpyHostToDevice));
    else
      e.master_valid = false;  // read from the bf16 parameters at the next step
  }
  // Success: the device holds everything; drop the host copies.
  for (auto& e : entries_) {
    e->has_snapshot = false;
    e->rule = RuleState{};
    e->mu.clear();
    e->mu.shrink_to_fit();
    e->nu.clear();
    e->nu.shrink_to_fit();
    e->master.clear();
    e->master.shrink_to_fit();
  }
  groups_ = std::move(groups);
  plan_ = std::move(plan);
  plan_ready_ = true;
}

const GpuPlan& GpuEngine::plan() {
  if (!plan_ready_) regroup(false);
  return plan_;
}

int GpuEngine::owner_of(size_t i) { return plan().owner.at(i); }

int64_t GpuEngine::device_bytes() const {
  if (!plan_ready_) return 0;
  int64_t b = dev_->flat * 12 + (dev_->gstage ? dev_->flat * 2 : 0);
  const int me = comm_->rank();
  for (const GpuBucket& bk : plan_.buckets) {
    if (bk.owner != me) continue;
    if (bk.label == Label::kAdamW) {
      b += bk.elements * 8;
    } else {
      for (int t : bk.tensors) {
        const RuleState z = RuleState::zeros(entries_[t]->geo);
        b += static_cast<int64_t>(z.m.size() + z.rms.size() + z.v_row.size() + z.v_col.size() +
                                  z.v_diag.size()) * 4;
      }
    }
  }
  return b;
}

std::string GpuEngine::routing_table() const {
  std::vector<TensorDesc> descs;
  std::vector<Label> labels;
  for (const auto& e : entries_) {
    descs.push_back({e->name, e->geo.shape});
    labels.push_back(e->label);
  }
  return format_routing_table(descs, labels);
}

StepReport GpuEngine::step(CUstream_st* stream) { return step_with_lr(opts_.opt.schedule.at(step_), stream); }

StepReport GpuEngine::step_with_lr(double lr, CUstream_st* user_stream) {
  if (!std::isfinite(lr)) throw std::invalid_argument("step: learning rate is not finite");
  if (!plan_ready_) regroup(false);
  CELO2_CUDA_CHECK(cudaSetDevice(dev_->device));
  stats_ = PhaseStats{};
  const OptimizerOptions& o = opts_.opt;
  const int W = comm_->size(), me = comm_->rank();
  const bool reduce = opts_.grad_mode == GradMode::kLocal && W > 1;
  cudaStream_t cs = dev_->compute;
  cudaStream_t ns = comm_->stream();
  StepReport rep;
  rep.lr = lr;

  // 0. Non-finite gradients, decided on every rank before any state changes.
  double t0 = now_s();
  CELO2_CUDA_CHECK(cudaEventRecord(dev_->start, user_stream));
  CELO2_CUDA_CHECK(cudaStreamWaitEvent(cs, dev_->start, 0));
  comm_->stream_wait(dev_->start);
  CELO2_CUDA_CHECK(cudaMemsetAsync(dev_->counters, 0, 2 * sizeof(unsigned long long), cs));
  CELO2_CUDA_CHECK(cudaMemsetAsync(dev_->stats, 0, 6 * sizeof(double), cs));
  for (size_t t = 0; t < entries_.size(); ++t) {
    const Entry& e = *entries_[t];
    if (e.label == Label::kFrozen || e.geo.numel == 0) continue;
    if (!reduce && plan_.owner[t] != me) continue;  // identical gradients: owners count
    if (e.gdt == DType::kFloat32)
      cuda::count_nonfinite_device(static_cast<const float*>(e.grads), e.geo.numel, dev_->counters, cs);
    else
      cuda::count_nonfinite_bf16_device(static_cast<const uint16_t*>(e.grads), e.geo.numel,
                                        dev_->counters, cs);
  }
  CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->h_counters, dev_->counters, sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, cs));
  CELO2_CUDA_CHECK(cudaStreamSynchronize(cs));
  double bad = static_cast<double>(dev_->h_counters[0]);
  comm_->all_reduce_sum(&bad, 1);
  rep.nonfinite = static_cast<int64_t>(bad);
  stats_.seconds["check"] = now_s() - t0;
  if (rep.nonfinite > 0) {
    if (o.nan_policy == NanPolicy::kError)
      throw NonFiniteGradientError("non-finite gradient: " + std::to_string(rep.nonfinite) +
                                   " entries are NaN or Inf across ranks (step " +
                                   std::to_string(step_) + ")");
    if (o.nan_policy == NanPolicy::kSkipStep) {
      ++skipped_;
      rep.skipped = true;
      rep.step = step_;
      return rep;
    }
  }

  // 1. Reduce every bucket to its owner, in the plan's order.
  t0 = now_s();
  comm_->reset_counters();
  if (reduce) {
    for (size_t b = 0; b < plan_.buckets.size(); ++b) {
      const GpuBucket& bk = plan_.buckets[b];
      const bool mine = bk.owner == me;
      comm_->group_start();
      for (int t : bk.tensors) {
        const Entry& e = *entries_[t];
        const int64_t off = plan_.flat_offset[t];
        void* recv = nullptr;
        if (mine) recv = e.gdt == DType::kFloat32 ? static_cast<void*>(dev_->g + off)
                                                  : static_cast<void*>(dev_->gstage + off);
        comm_->reduce_async(e.grads, recv, e.geo.numel, e.gdt == DType::kBFloat16, bk.owner);
      }
      comm_->group_end();
      if (mine) CELO2_CUDA_CHECK(cudaEventRecord(groups_[b]->reduced, ns));
    }
  }

  // 2. Compute the buckets this rank owns as they arrive.
  const float scale = reduce ? 1.0f / static_cast<float>(W) : 1.0f;
  const float flr = static_cast<float>(lr), wd = static_cast<float>(o.weight_decay);
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    const GpuBucket& bk = plan_.buckets[b];
    if (bk.owner != me) continue;
    Group& grp = *groups_[b];
    if (reduce) CELO2_CUDA_CHECK(cudaStreamWaitEvent(cs, grp.reduced, 0));
    float* g = dev_->g + bk.flat_offset;
    float* p = dev_->p + bk.flat_offset;
    float* u = dev_->u + bk.flat_offset;
    const int64_t n = bk.elements;
    // Gradients and parameters into the flat float32 buffers.
    for (int t : bk.tensors) {
      Entry& e = *entries_[t];
      const int64_t off = plan_.flat_offset[t], k = e.geo.numel;
      if (e.gdt == DType::kFloat32) {
        if (!reduce)
          CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->g + off, e.grads, k * 4, cudaMemcpyDeviceToDevice, cs));
      } else {
        cuda::bf16_to_float_device(reduce ? dev_->gstage + off : static_cast<const uint16_t*>(e.grads),
                                   dev_->g + off, k, cs);
      }
      if (e.pdt == DType::kFloat32) {
        CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->p + off, e.params, k * 4, cudaMemcpyDeviceToDevice, cs));
      } else if (!e.master_valid) {
        cuda::bf16_to_float_device(static_cast<const uint16_t*>(e.params), dev_->p + off, k, cs);
        e.master_valid = true;
      }
    }
    const int l = static_cast<int>(bk.label);
    cuda::scale_zero_nonfinite_device(g, n, scale, dev_->counters + 1, cs);
    cuda::sumsq_device(g, n, dev_->partials, dev_->stats + l, cs);
    if (bk.label == Label::kCelo2) {
      grp.rule->step(g, p, u, cs);
      cuda::apply_step_sumsq_device(flr, wd, n, p, u, dev_->partials, dev_->stats + 3 + l, cs);
    } else {
      CELO2_CUDA_CHECK(cudaMemcpyAsync(u, p, n * 4, cudaMemcpyDeviceToDevice, cs));
      AdamWParams a;
      a.b1 = o.adam_b1;
      a.b2 = o.adam_b2;
      a.eps = o.adam_eps;
      a.lr = static_cast<float>(lr * o.mult_1d);
      a.wd = wd;
      a.count = bk.counter + 1;
      cuda::adamw_device(a, n, p, g, grp.mu, grp.nu, cs);
      cuda::sumsq_diff_device(u, p, n, dev_->partials, dev_->stats + 3 + l, cs);
    }
    for (int t : bk.tensors) {
      Entry& e = *entries_[t];
      const int64_t off = plan_.flat_offset[t], k = e.geo.numel;
      if (e.pdt == DType::kFloat32)
        CELO2_CUDA_CHECK(cudaMemcpyAsync(e.params, dev_->p + off, k * 4, cudaMemcpyDeviceToDevice, cs));
      else
        cuda::float_to_bf16_device(dev_->p + off, static_cast<uint16_t*>(e.params), k, cs);
    }
    CELO2_CUDA_CHECK(cudaEventRecord(grp.done, cs));
  }

  // 3. Parameters from their owners.
  if (opts_.gather_params && W > 1) {
    for (size_t b = 0; b < plan_.buckets.size(); ++b) {
      const GpuBucket& bk = plan_.buckets[b];
      if (bk.owner == me) comm_->stream_wait(groups_[b]->done);
      comm_->group_start();
      for (int t : bk.tensors) {
        Entry& e = *entries_[t];
        comm_->broadcast_async(e.params, e.geo.numel, e.pdt == DType::kBFloat16, bk.owner);
      }
      comm_->group_end();
    }
  }
  CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->h_stats, dev_->stats, 6 * sizeof(double), cudaMemcpyDeviceToHost, cs));
  CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->h_counters + 1, dev_->counters + 1, sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, cs));
  // The trainer's stream continues after both of ours.
  CELO2_CUDA_CHECK(cudaEventRecord(dev_->compute_end, cs));
  CELO2_CUDA_CHECK(cudaEventRecord(dev_->comm_end, ns));
  CELO2_CUDA_CHECK(cudaStreamWaitEvent(user_stream, dev_->compute_end, 0));
  CELO2_CUDA_CHECK(cudaStreamWaitEvent(user_stream, dev_->comm_end, 0));
  comm_->synchronize();  // first: a dead rank is reported here, within the timeout
  CELO2_CUDA_CHECK(cudaStreamSynchronize(cs));
  stats_.seconds["pipeline"] = now_s() - t0;
  for (const auto& [name, c] : comm_->counters()) stats_.bytes[name] += c.bytes;

  // Counters advance on every rank (the plan's buckets are keyed by them).
  for (auto& e : entries_) {
    if (e->label == Label::kCelo2) e->iteration += 1;
    if (e->label == Label::kAdamW) e->count += 1;
  }
  for (GpuBucket& bk : plan_.buckets) bk.counter += 1;

  t0 = now_s();
  double red[7];
  std::memcpy(red, dev_->h_stats, sizeof(double) * 6);
  red[6] = static_cast<double>(dev_->h_counters[1]);
  comm_->all_reduce_sum(red, 7);
  int64_t ucount[3] = {};
  for (const auto& e : entries_) ucount[static_cast<int>(e->label)] += e->geo.numel;
  for (int l = 0; l < 3; ++l) {
    rep.grad_norm[l] = std::sqrt(red[l]);
    rep.update_rms[l] = l != 2 && ucount[l] ? std::sqrt(red[3 + l] / static_cast<double>(ucount[l])) : 0.0;
  }
  if (rep.nonfinite == 0) rep.nonfinite = static_cast<int64_t>(red[6]);  // overflow in the sum
  stats_.seconds["report"] = now_s() - t0;
  ++step_;
  rep.step = step_;
  return rep;
}

void GpuEngine::refresh_masters() {
  for (auto& e : entries_) e->master_valid = false;
}

void GpuEngine::set_theta(Theta theta) {
  theta.check_fits(opts_.opt.rule);
  if (!plan_ready_) {
    // Checked the way the groups will use it: a RuleSet of one tiny tensor.
    cuda::RuleSet probe(opts_.opt.rule, theta, {{2, 2}});
    opts_.opt.theta = std::move(theta);
    return;
  }
  Theta old = opts_.opt.theta;
  snapshot_states();
  opts_.opt.theta = std::move(theta);
  try {
    regroup(false);
  } catch (...) {
    opts_.opt.theta = std::move(old);
    regroup(false);  // from the same snapshots: the state is unchanged
    throw;
  }
}

void GpuEngine::set_schedule(const Schedule& s) {
  s.validate();
  opts_.opt.schedule = s;
}

void GpuEngine::set_rules(const LabelRules& rules) {
  std::vector<TensorDesc> descs;
  for (const auto& e : entries_) descs.push_back({e->name, e->geo.shape});
  rules.assign(descs);  // throws before anything changes
  if (plan_ready_) snapshot_states();
  opts_.opt.rules = rules;
  relabel();
  if (plan_ready_) regroup(false);
}

// ---------------------------------------------------------------------------------------
// Checkpoints (state_file.h): each tensor's record travels from its owner to every rank by
// one broadcast; rank 0 writes.
// ---------------------------------------------------------------------------------------
void GpuEngine::save_state(const std::string& path) {
  if (!plan_ready_) regroup(false);
  CELO2_CUDA_CHECK(cudaSetDevice(dev_->device));
  CELO2_CUDA_CHECK(cudaStreamSynchronize(dev_->compute));
  const int me = comm_->rank();
  StateFile f;
  f.step = step_;
  f.skipped = skipped_;
  f.theta_sha256 = sha256_hex(theta_to_bytes(opts_.opt.theta));
  std::vector<int64_t> pos_in_bucket(entries_.size(), 0);
  for (const GpuBucket& bk : plan_.buckets) {
    int64_t off = 0;
    for (int t : bk.tensors) {
      pos_in_bucket[t] = off;
      off += entries_[t]->geo.numel;
    }
  }
  std::vector<float> buf;
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    TensorStateRecord r;
    r.name = e.name;
    r.shape = e.geo.shape;
    r.label = e.label;
    r.iteration = e.iteration;
    r.count = e.count;
    const int64_t n = e.geo.numel;
    if (e.label == Label::kCelo2) {
      RuleState s = RuleState::zeros(e.geo);
      const int b = plan_.bucket_of[t];
      if (b >= 0 && plan_.owner[t] == me) s = groups_[b]->rule->download_state(static_cast<size_t>(e.set_index));
      // One broadcast of the concatenated arrays (sizes known on every rank).
      buf.clear();
      for (auto* v : {&s.m, &s.rms, &s.v_row, &s.v_col, &s.v_diag}) buf.insert(buf.end(), v->begin(), v->end());
      if (!buf.empty()) comm_->broadcast(buf.data(), static_cast<int64_t>(buf.size()) * 4, plan_.owner[t]);
      size_t k = 0;
      for (auto* v : {&s.m, &s.rms, &s.v_row, &s.v_col, &s.v_diag}) {
        std::copy(buf.begin() + k, buf.begin() + k + v->size(), v->begin());
        k += v->size();
      }
      r.m = std::move(s.m);
      r.rms = std::move(s.rms);
      r.v_row = std::move(s.v_row);
      r.v_col = std::move(s.v_col);
      r.v_diag = std::move(s.v_diag);
    } else if (e.label == Label::kAdamW) {
      buf.assign(2 * n, 0.0f);
      const int b = plan_.bucket_of[t];
      if (b >= 0 && plan_.owner[t] == me && n > 0) {
        CELO2_CUDA_CHECK(cudaMemcpy(buf.data(), groups_[b]->mu + pos_in_bucket[t], n * 4, cudaMemcpyDeviceToHost));
        CELO2_CUDA_CHECK(cudaMemcpy(buf.data() + n, groups_[b]->nu + pos_in_bucket[t], n * 4, cudaMemcpyDeviceToHost));
      }
      if (n > 0) comm_->broadcast(buf.data(), 2 * n * 4, plan_.owner[t]);
      r.mu.assign(buf.begin(), buf.begin() + n);
      r.nu.assign(buf.begin() + n, buf.end());
    }
    if (me == 0) f.tensors.push_back(std::move(r));
  }
  std::string err;
  if (me == 0) {
    try {
      write_state_file(path, f);
    } catch (const std::exception& ex) {
      err = ex.what();
      if (err.empty()) err = "saving optimizer state failed";
    }
  }
  agree_on_error(*comm_, err);
}

void GpuEngine::load_state(const std::string& path) {
  if (!plan_ready_) regroup(false);
  std::vector<uint8_t> bytes;
  std::string err;
  if (comm_->rank() == 0) {
    try {
      bytes = flax::read_file(path);
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  agree_on_error(*comm_, err);
  int64_t n = static_cast<int64_t>(bytes.size());
  comm_->broadcast(&n, sizeof(n), 0);
  bytes.resize(n);
  comm_->broadcast(bytes.data(), n, 0);
  StateFile f = parse_state_file(bytes, path);
  if (f.tensors.size() != entries_.size())
    throw flax::FormatError("optimizer state " + path + ": holds " + std::to_string(f.tensors.size()) +
                            " tensors, the engine has " + std::to_string(entries_.size()));
  std::vector<const TensorStateRecord*> recs;
  for (const auto& e : entries_) {
    const TensorStateRecord* r = find_record(f, e->name);
    if (!r) throw flax::FormatError("optimizer state " + path + ": no state for tensor '" + e->name + "'");
    check_state_record(path, *r, e->geo.shape, e->label);
    recs.push_back(r);
  }
  // Valid: take it. Owners keep the arrays as snapshots; every rank the counters.
  CELO2_CUDA_CHECK(cudaStreamSynchronize(dev_->compute));
  snapshot_states();  // bf16 masters travel across the re-grouping
  const int me = comm_->rank();
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    const TensorStateRecord& r = *recs[t];
    e.reset_branch();
    e.iteration = r.iteration;
    e.count = r.count;
    if (plan_.owner[t] != me || e.label == Label::kFrozen) continue;
    if (e.label == Label::kCelo2) {
      e.rule.m = r.m;
      e.rule.rms = r.rms;
      e.rule.v_row = r.v_row;
      e.rule.v_col = r.v_col;
      e.rule.v_diag = r.v_diag;
      e.rule.iteration = r.iteration;
    } else {
      e.mu = r.mu;
      e.nu = r.nu;
    }
    e.has_snapshot = true;
  }
  step_ = f.step;
  skipped_ = f.skipped;
  regroup(false);
}

}  // namespace celo2
