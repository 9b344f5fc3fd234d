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
  // Host copy of the state while the device groups are rebuilt (or from a file): for the
  // pieces this rank owns next (whole-tensor-sized arrays; other pieces' parts unused).
  bool has_snapshot = false;
  RuleState rule;
  std::vector<float> mu, nu;
  bool has_master = false;  // bf16: `master` holds the float32 master of the next pieces
  std::vector<float> master;
  bool master_valid = false;  // bf16: the device master of this rank's pieces is current

  void reset_branch() {
    iteration = 0;
    count = 0;
    has_snapshot = false;
    rule = RuleState{};
    mu.clear();
    nu.clear();
  }
  void drop_host() {
    has_snapshot = has_master = false;
    rule = RuleState{};
    for (auto* v : {&mu, &nu, &master}) {
      v->clear();
      v->shrink_to_fit();
    }
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
  // One Newton–Schulz runner (cuBLAS handle, workspaces) for every bucket: they run one
  // after another on `compute`.
  std::shared_ptr<cuda::NewtonSchulzCuda> ns;

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
  prepare_options(opts_.opt);
  if (opts_.opt.use_reference) throw std::invalid_argument("GpuEngine: use_reference is a CPU option");
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
                              static_cast<const float*>(grads),
                              [&](const std::string& n) { return name_taken(entries_, n); });
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

std::vector<GpuPlanTensor> GpuEngine::plan_inputs() const {
  std::vector<GpuPlanTensor> pt;
  for (const auto& e : entries_)
    pt.push_back({e->geo.shape, e->label, e->label == Label::kAdamW ? e->count : e->iteration});
  return pt;
}

// The state of every piece this rank owns in plan_ (and the bf16 masters) to the host.
void GpuEngine::snapshot_states(bool states) {
  if (!plan_ready_ || !groups_valid_) return;
  CELO2_CUDA_CHECK(cudaStreamSynchronize(dev_->compute));
  const int me = comm_->rank();
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    const GpuBucket& bk = plan_.buckets[b];
    if (bk.owner != me) continue;
    Group& g = *groups_[b];
    for (size_t k = 0; k < bk.pieces.size(); ++k) {
      const GpuPiece& pc = plan_.pieces[bk.pieces[k]];
      Entry& e = *entries_[pc.tensor];
      const int64_t at = pc.flat_offset - bk.flat_offset;  // within the bucket
      if (e.pdt == DType::kBFloat16 && e.master_valid) {
        e.master.resize(e.geo.numel);
        CELO2_CUDA_CHECK(cudaMemcpy(e.master.data() + pc.lo, dev_->p + pc.flat_offset, pc.n * 4,
                                    cudaMemcpyDeviceToHost));
        e.has_master = true;
      }
      if (!states || e.label != bk.label) continue;  // relabelled since: state dropped
      if (bk.label == Label::kCelo2) {
        e.rule = g.rule->download_state(k);
      } else {
        e.mu.resize(e.geo.numel);
        e.nu.resize(e.geo.numel);
        CELO2_CUDA_CHECK(cudaMemcpy(e.mu.data() + pc.lo, g.mu + at, pc.n * 4, cudaMemcpyDeviceToHost));
        CELO2_CUDA_CHECK(cudaMemcpy(e.nu.data() + pc.lo, g.nu + at, pc.n * 4, cudaMemcpyDeviceToHost));
      }
      e.has_snapshot = true;
    }
  }
}

// Collective. Tensors whose pieces move between plan_ and `next`: every old piece's host
// snapshot is broadcast from its old owner, so the new owners have it. Relabelled tensors
// (state reset) move only their bf16 master.
void GpuEngine::migrate(const GpuPlan& next) {
  if (!plan_ready_) return;
  const int me = comm_->rank();
  std::vector<float> buf;
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    if (next.pieces_of[t].empty() || plan_.pieces_of[t].empty() || plan_.same_placement(next, t)) continue;
    const bool keep = plan_labels_[t] == e.label && e.label != Label::kFrozen;
    const bool bf16 = e.pdt == DType::kBFloat16;
    bool all_master = bf16;
    bool any_state = false;
    for (int k : plan_.pieces_of[t]) {
      const GpuPiece& pc = plan_.pieces[k];
      const bool sender = pc.owner == me;
      // Layout: [state][master][flags: has_snapshot, has_master].
      int64_t state_n = 0;
      RuleState z;
      if (keep && e.label == Label::kCelo2) {
        z = RuleState::zeros(e.geo);
        state_n = static_cast<int64_t>(z.m.size() + z.rms.size() + z.v_row.size() + z.v_col.size() + z.v_diag.size());
      } else if (keep) {
        state_n = 2 * pc.n;
      }
      const int64_t master_n = bf16 ? pc.n : 0;
      buf.assign(state_n + master_n + 2, 0.0f);
      if (sender) {
        if (keep && e.has_snapshot) {
          if (e.label == Label::kCelo2) {
            int64_t at = 0;
            for (auto* v : {&e.rule.m, &e.rule.rms, &e.rule.v_row, &e.rule.v_col, &e.rule.v_diag}) {
              std::copy(v->begin(), v->end(), buf.begin() + at);
              at += static_cast<int64_t>(v->size());
            }
          } else {
            std::copy(e.mu.begin() + pc.lo, e.mu.begin() + pc.lo + pc.n, buf.begin());
            std::copy(e.nu.begin() + pc.lo, e.nu.begin() + pc.lo + pc.n, buf.begin() + pc.n);
          }
          buf[state_n + master_n] = 1.0f;
        }
        if (bf16 && e.has_master) {
          std::copy(e.master.begin() + pc.lo, e.master.begin() + pc.lo + pc.n, buf.begin() + state_n);
          buf[state_n + master_n + 1] = 1.0f;
        }
      }
      comm_->broadcast(buf.data(), static_cast<int64_t>(buf.size()) * 4, pc.owner);
      const bool got_state = buf[state_n + master_n] != 0.0f, got_master = buf[state_n + master_n + 1] != 0.0f;
      all_master = all_master && got_master;
      if (keep && got_state) {
        any_state = true;
        if (e.label == Label::kCelo2) {
          e.rule = std::move(z);
          int64_t at = 0;
          for (auto* v : {&e.rule.m, &e.rule.rms, &e.rule.v_row, &e.rule.v_col, &e.rule.v_diag}) {
            std::copy(buf.begin() + at, buf.begin() + at + static_cast<int64_t>(v->size()), v->begin());
            at += static_cast<int64_t>(v->size());
          }
        } else {
          e.mu.resize(e.geo.numel);
          e.nu.resize(e.geo.numel);
          std::copy(buf.begin(), buf.begin() + pc.n, e.mu.begin() + pc.lo);
          std::copy(buf.begin() + pc.n, buf.begin() + 2 * pc.n, e.nu.begin() + pc.lo);
        }
      }
      if (bf16 && got_master) {
        e.master.resize(e.geo.numel);
        std::copy(buf.begin() + state_n, buf.begin() + state_n + pc.n, e.master.begin() + pc.lo);
      }
    }
    e.has_snapshot = any_state;
    e.has_master = all_master;
  }
}

// This rank's device groups for `next` from the host snapshots (zeros where there are none).
// On failure (a theta the CUDA rule cannot run, out of memory) the snapshots are kept, so
// the caller can build again with the previous options.
void GpuEngine::build_groups(GpuPlan next) {
  const int me = comm_->rank();
  groups_.clear();
  groups_valid_ = false;
  bool bf16_grads = false;
  for (const auto& e : entries_) bf16_grads |= e->gdt == DType::kBFloat16;
  dev_->alloc_flat(next.owned_elements[me], bf16_grads);
  std::vector<std::unique_ptr<Group>> groups(next.buckets.size());
  const cuda::NsPrecision nsp = cuda::parse_ns_precision(opts_.ns_precision);
  if (!dev_->ns || dev_->ns->precision() != nsp) dev_->ns = std::make_shared<cuda::NewtonSchulzCuda>(nsp);
  for (size_t b = 0; b < next.buckets.size(); ++b) {
    const GpuBucket& bk = next.buckets[b];
    if (bk.owner != me) continue;
    auto g = std::make_unique<Group>();
    if (bk.label == Label::kCelo2) {
      std::vector<std::vector<int64_t>> shapes;
      for (int k : bk.pieces) shapes.push_back(entries_[next.pieces[k].tensor]->geo.shape);
      g->rule = std::make_unique<cuda::RuleSet>(opts_.opt.rule, opts_.opt.theta, shapes, dev_->ns);
      g->rule->set_iteration(bk.counter);
      for (size_t k = 0; k < bk.pieces.size(); ++k) {
        const Entry& e = *entries_[next.pieces[bk.pieces[k]].tensor];
        if (e.has_snapshot) g->rule->upload_state(k, e.rule);
      }
    } else {
      g->mu = dalloc<float>(bk.elements);
      g->nu = dalloc<float>(bk.elements);
      CELO2_CUDA_CHECK(cudaMemset(g->mu, 0, bk.elements * 4));
      CELO2_CUDA_CHECK(cudaMemset(g->nu, 0, bk.elements * 4));
      for (int k : bk.pieces) {
        const GpuPiece& pc = next.pieces[k];
        const Entry& e = *entries_[pc.tensor];
        const int64_t at = pc.flat_offset - bk.flat_offset;
        if (e.has_snapshot && static_cast<int64_t>(e.mu.size()) == e.geo.numel) {
          CELO2_CUDA_CHECK(cudaMemcpy(g->mu + at, e.mu.data() + pc.lo, pc.n * 4, cudaMemcpyHostToDevice));
          CELO2_CUDA_CHECK(cudaMemcpy(g->nu + at, e.nu.data() + pc.lo, pc.n * 4, cudaMemcpyHostToDevice));
        }
      }
    }
    groups[b] = std::move(g);
  }
  for (auto& ep : entries_) ep->master_valid = false;
  for (const GpuPiece& pc : next.pieces) {
    Entry& e = *entries_[pc.tensor];
    if (pc.owner != me || e.pdt != DType::kBFloat16 || !e.has_master ||
        static_cast<int64_t>(e.master.size()) != e.geo.numel)
      continue;
    CELO2_CUDA_CHECK(cudaMemcpy(dev_->p + pc.flat_offset, e.master.data() + pc.lo, pc.n * 4,
                                cudaMemcpyHostToDevice));
    e.master_valid = true;  // tensors with several pieces here: all come from the same snapshot
  }
  // Everything above was written on the legacy stream (cudaMemset, pageable copies), which
  // the non-blocking compute stream does not wait for.
  CELO2_CUDA_CHECK(cudaDeviceSynchronize());
  // Success: the device holds everything; drop the host copies.
  for (auto& e : entries_) e->drop_host();
  groups_ = std::move(groups);
  plan_ = std::move(next);
  plan_labels_.clear();
  for (const auto& e : entries_) plan_labels_.push_back(e->label);
  plan_ready_ = true;
  groups_valid_ = true;
}

void GpuEngine::rebuild() {
  GpuPlan next = GpuPlan::build(plan_inputs(), comm_->size(), opts_.bucket_bytes);
  snapshot_states(true);
  migrate(next);
  build_groups(std::move(next));
}

const GpuPlan& GpuEngine::plan() {
  if (!plan_ready_) rebuild();
  return plan_;
}

int GpuEngine::owner_of(size_t i) { return plan().owner_of(i); }

int64_t GpuEngine::device_bytes() const {
  if (!plan_ready_) return 0;
  int64_t b = dev_->flat * 12 + (dev_->gstage ? dev_->flat * 2 : 0);
  const int me = comm_->rank();
  for (const GpuBucket& bk : plan_.buckets) {
    if (bk.owner != me) continue;
    if (bk.label == Label::kAdamW) {
      b += bk.elements * 8;
    } else {
      for (int k : bk.pieces) {
        const RuleState z = RuleState::zeros(entries_[plan_.pieces[k].tensor]->geo);
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
  check_step_lr(lr);
  if (!plan_ready_) rebuild();
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
  for (const GpuPiece& pc : plan_.pieces) {
    const Entry& e = *entries_[pc.tensor];
    if (!reduce && pc.owner != me) continue;  // identical gradients: owners count
    if (e.gdt == DType::kFloat32)
      cuda::count_nonfinite_device(static_cast<const float*>(e.grads) + pc.lo, pc.n, dev_->counters, cs);
    else
      cuda::count_nonfinite_bf16_device(static_cast<const uint16_t*>(e.grads) + pc.lo, pc.n,
                                        dev_->counters, cs);
  }
  CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->h_counters, dev_->counters, sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, cs));
  CELO2_CUDA_CHECK(cudaStreamSynchronize(cs));
  double bad = static_cast<double>(dev_->h_counters[0]);
  comm_->all_reduce_sum(&bad, 1);
  rep.nonfinite = static_cast<int64_t>(bad);
  stats_.seconds["check"] = now_s() - t0;
  if (decide_nan(o.nan_policy, rep.nonfinite, step_, "across ranks") == NanAction::kSkip) {
    ++skipped_;
    rep.skipped = true;
    rep.step = step_;
    return rep;
  }

  // 1. Reduce every bucket to its owner, in the plan's order.
  t0 = now_s();
  comm_->reset_counters();
  if (reduce) {
    for (size_t b = 0; b < plan_.buckets.size(); ++b) {
      const GpuBucket& bk = plan_.buckets[b];
      const bool mine = bk.owner == me;
      comm_->group_start();
      for (int k : bk.pieces) {
        const GpuPiece& pc = plan_.pieces[k];
        const Entry& e = *entries_[pc.tensor];
        const int64_t off = pc.flat_offset;
        const bool bf16 = e.gdt == DType::kBFloat16;
        void* recv = nullptr;
        if (mine) recv = bf16 ? static_cast<void*>(dev_->gstage + off) : static_cast<void*>(dev_->g + off);
        const void* send = static_cast<const char*>(e.grads) + pc.lo * static_cast<int64_t>(dtype_bytes(e.gdt));
        comm_->reduce_async(send, recv, pc.n, bf16, bk.owner);
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
    for (int pk : bk.pieces) {
      const GpuPiece& pc = plan_.pieces[pk];
      Entry& e = *entries_[pc.tensor];
      const int64_t off = pc.flat_offset, k = pc.n;
      if (e.gdt == DType::kFloat32) {
        if (!reduce)
          CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->g + off, static_cast<const float*>(e.grads) + pc.lo, k * 4,
                                           cudaMemcpyDeviceToDevice, cs));
      } else {
        cuda::bf16_to_float_device(reduce ? dev_->gstage + off : static_cast<const uint16_t*>(e.grads) + pc.lo,
                                   dev_->g + off, k, cs);
      }
      if (e.pdt == DType::kFloat32)
        CELO2_CUDA_CHECK(cudaMemcpyAsync(dev_->p + off, static_cast<const float*>(e.params) + pc.lo, k * 4,
                                         cudaMemcpyDeviceToDevice, cs));
      else if (!e.master_valid)
        cuda::bf16_to_float_device(static_cast<const uint16_t*>(e.params) + pc.lo, dev_->p + off, k, cs);
    }
    const int l = static_cast<int>(bk.label);
    cuda::scale_zero_nonfinite_device(g, n, scale, dev_->counters + 1, cs);
    cuda::sumsq_device(g, n, dev_->partials, dev_->stats + l, cs);
    if (bk.label == Label::kCelo2) {
      grp.rule->step(g, p, u, cs);
      cuda::apply_step_sumsq_device(flr, wd, n, p, u, dev_->partials, dev_->stats + 3 + l, cs);
    } else {
      CELO2_CUDA_CHECK(cudaMemcpyAsync(u, p, n * 4, cudaMemcpyDeviceToDevice, cs));
      cuda::adamw_device(adamw_params(o, lr, bk.counter + 1), n, p, g, grp.mu, grp.nu, cs);
      cuda::sumsq_diff_device(u, p, n, dev_->partials, dev_->stats + 3 + l, cs);
    }
    for (int pk : bk.pieces) {
      const GpuPiece& pc = plan_.pieces[pk];
      Entry& e = *entries_[pc.tensor];
      if (e.pdt == DType::kFloat32)
        CELO2_CUDA_CHECK(cudaMemcpyAsync(static_cast<float*>(e.params) + pc.lo, dev_->p + pc.flat_offset,
                                         pc.n * 4, cudaMemcpyDeviceToDevice, cs));
      else
        cuda::float_to_bf16_device(dev_->p + pc.flat_offset, static_cast<uint16_t*>(e.params) + pc.lo, pc.n, cs);
    }
    CELO2_CUDA_CHECK(cudaEventRecord(grp.done, cs));
  }

  for (const GpuPiece& pc : plan_.pieces)
    if (pc.owner == me) entries_[pc.tensor]->master_valid = true;

  // 3. Parameters from their owners.
  if (opts_.gather_params && W > 1) {
    for (size_t b = 0; b < plan_.buckets.size(); ++b) {
      const GpuBucket& bk = plan_.buckets[b];
      if (bk.owner == me) comm_->stream_wait(groups_[b]->done);
      comm_->group_start();
      for (int k : bk.pieces) {
        const GpuPiece& pc = plan_.pieces[k];
        Entry& e = *entries_[pc.tensor];
        void* buf = static_cast<char*>(e.params) + pc.lo * static_cast<int64_t>(dtype_bytes(e.pdt));
        comm_->broadcast_async(buf, pc.n, e.pdt == DType::kBFloat16, bk.owner);
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
    if (e->geo.numel == 0) continue;  // as the CPU optimizer: no state, no counter
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
  for (const auto& e : entries_)
    if (e->label != Label::kFrozen) ucount[static_cast<int>(e->label)] += e->geo.numel;
  for (int l = 0; l < 3; ++l) rep.grad_norm[l] = std::sqrt(red[l]);
  set_update_rms(rep, red + 3, ucount);
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
  snapshot_states(true);
  opts_.opt.theta = std::move(theta);
  try {
    build_groups(plan_);  // the same plan: nothing moves
  } catch (...) {
    opts_.opt.theta = std::move(old);
    build_groups(plan_);  // from the same snapshots: the state is unchanged
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
  (void)rules.assign(descs);  // throws before anything changes
  if (plan_ready_) snapshot_states(true);
  opts_.opt.rules = rules;
  relabel();
  if (plan_ready_) {
    GpuPlan next = GpuPlan::build(plan_inputs(), comm_->size(), opts_.bucket_bytes);
    migrate(next);
    build_groups(std::move(next));
  }
}

// ---------------------------------------------------------------------------------------
// Checkpoints (state_file.h): each piece's state travels from its owner to every rank by one
// broadcast; rank 0 assembles whole tensors and writes.
// ---------------------------------------------------------------------------------------
void GpuEngine::save_state(const std::string& path) {
  if (!plan_ready_) rebuild();
  CELO2_CUDA_CHECK(cudaSetDevice(dev_->device));
  CELO2_CUDA_CHECK(cudaStreamSynchronize(dev_->compute));
  const int me = comm_->rank();
  StateFile f;
  f.step = step_;
  f.skipped = skipped_;
  f.theta_sha256 = sha256_hex(theta_to_bytes(opts_.opt.theta));
  std::vector<float> buf;
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    TensorStateRecord r;
    r.name = e.name;
    r.shape = e.geo.shape;
    r.label = e.label;
    r.iteration = e.iteration;
    r.count = e.count;
    if (e.label == Label::kCelo2) {
      RuleState s = RuleState::zeros(e.geo);
      for (int k : plan_.pieces_of[t]) {  // one piece: celo2 tensors are whole
        const GpuPiece& pc = plan_.pieces[k];
        const GpuBucket& bk = plan_.buckets[pc.bucket];
        if (pc.owner == me) {
          const auto it = std::find(bk.pieces.begin(), bk.pieces.end(), k);
          s = groups_[pc.bucket]->rule->download_state(static_cast<size_t>(it - bk.pieces.begin()));
        }
        buf.clear();
        for (auto* v : {&s.m, &s.rms, &s.v_row, &s.v_col, &s.v_diag}) buf.insert(buf.end(), v->begin(), v->end());
        comm_->broadcast(buf.data(), static_cast<int64_t>(buf.size()) * 4, pc.owner);
        size_t at = 0;
        for (auto* v : {&s.m, &s.rms, &s.v_row, &s.v_col, &s.v_diag}) {
          std::copy(buf.begin() + at, buf.begin() + at + v->size(), v->begin());
          at += v->size();
        }
      }
      r.m = std::move(s.m);
      r.rms = std::move(s.rms);
      r.v_row = std::move(s.v_row);
      r.v_col = std::move(s.v_col);
      r.v_diag = std::move(s.v_diag);
    } else if (e.label == Label::kAdamW) {
      r.mu.assign(e.geo.numel, 0.0f);
      r.nu.assign(e.geo.numel, 0.0f);
      for (int k : plan_.pieces_of[t]) {
        const GpuPiece& pc = plan_.pieces[k];
        const GpuBucket& bk = plan_.buckets[pc.bucket];
        buf.assign(2 * pc.n, 0.0f);
        if (pc.owner == me) {
          const Group& g = *groups_[pc.bucket];
          const int64_t at = pc.flat_offset - bk.flat_offset;
          CELO2_CUDA_CHECK(cudaMemcpy(buf.data(), g.mu + at, pc.n * 4, cudaMemcpyDeviceToHost));
          CELO2_CUDA_CHECK(cudaMemcpy(buf.data() + pc.n, g.nu + at, pc.n * 4, cudaMemcpyDeviceToHost));
        }
        comm_->broadcast(buf.data(), 2 * pc.n * 4, pc.owner);
        std::copy(buf.begin(), buf.begin() + pc.n, r.mu.begin() + pc.lo);
        std::copy(buf.begin() + pc.n, buf.end(), r.nu.begin() + pc.lo);
      }
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
  if (!plan_ready_) rebuild();
  CELO2_CUDA_CHECK(cudaSetDevice(dev_->device));
  std::vector<TensorIdentity> ids;
  for (const auto& e : entries_) ids.push_back({&e->name, &e->geo.shape, e->label});
  StateFile f;
  const std::vector<const TensorStateRecord*> recs = read_state_collective(*comm_, path, ids, f);
  // Valid: take it. Labels are those of the plan (checked), so placement stays: each rank
  // keeps the records of the tensors it owns pieces of; masters stay where they are.
  snapshot_states(false);
  const int me = comm_->rank();
  for (size_t t = 0; t < entries_.size(); ++t) {
    Entry& e = *entries_[t];
    const TensorStateRecord& r = *recs[t];
    e.reset_branch();
    e.iteration = r.iteration;
    e.count = r.count;
    bool mine = false;
    for (int k : plan_.pieces_of[t]) mine |= plan_.pieces[k].owner == me;
    if (!mine) continue;
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
  build_groups(GpuPlan::build(plan_inputs(), comm_->size(), opts_.bucket_bytes));
}

}  // namespace celo2
