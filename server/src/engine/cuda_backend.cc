// The "cuda" backend of the one engine (backend.h): tensors, buffers and optimizer state in
// device memory; the rule by the multi-tensor CUDA RuleSet (celo2/cuda/rule_cuda.h,
// Newton–Schulz on cuBLAS), AdamW, the apply and the gradient statistics by the device
// helpers of the same header. Whole tensors only (Plan::kWholeTensors): the RuleSet runs a
// tensor's statistics inside its launches, with no collective between them.
//
// State: AdamW slices in device arrays of their own; Celo2 tensors inside RuleSets, one per
// group of this rank's Celo2 tensors with the same update count (a RuleSet has one counter),
// built at the first step after the set of tensors, their counters or the weights change; a
// tensor's state waits on the host until its group is built (set_state) and is read back
// from the device (get_state). The RuleSet's g / p / u are packed copies of the tensors'
// slices (device to device).
//
// Ordering: every operation runs on the legacy default stream and returns when its result
// is in place (it synchronizes), as the communicator's calls do, so the engine's program
// order is the data order. That is correctness first: overlapping buckets of communication
// with computation is left to a later plan (docs/ARCHITECTURE.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <memory>
#include <stdexcept>
#include <vector>

#include "backend.h"
#include "celo2/communicator.h"
#include "celo2/cuda_backend.h"
#include "celo2/cuda/check.h"
#include "celo2/cuda/rule_cuda.h"

namespace celo2 {
namespace {

using cuda::RuleSet;

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    std::string why;
    if (!cuda::device_available(&why)) throw UnsupportedError("backend 'cuda': no CUDA device (" + why + ")");
    CELO2_CUDA_CHECK(cudaMalloc(&partials_, sizeof(double) * cuda::kSumsqBlocks));
    CELO2_CUDA_CHECK(cudaMalloc(&out_, sizeof(double)));
    CELO2_CUDA_CHECK(cudaMalloc(&counter_, sizeof(unsigned long long)));
    ns_ = std::make_shared<cuda::NewtonSchulzCuda>(cuda::NsPrecision::kFloat32);
    CELO2_CUDA_CHECK(cudaGetDevice(&device_));
  }
  ~CudaBackend() override {
    groups_.clear();
    for (auto& [t, a] : adam_) free_pair(a);
    cudaFree(partials_);
    cudaFree(out_);
    cudaFree(counter_);
    cudaFree(scratch_);
  }
  const char* name() const override { return "cuda"; }
  bool host() const override { return false; }
  void bind_thread() override { CELO2_CUDA_CHECK(cudaSetDevice(device_)); }

  // ---- memory ----
  float* alloc(int64_t n) override {
    float* p = nullptr;
    CELO2_CUDA_CHECK(cudaMalloc(&p, sizeof(float) * std::max<int64_t>(n, 1)));
    CELO2_CUDA_CHECK(cudaMemset(p, 0, sizeof(float) * std::max<int64_t>(n, 1)));
    bytes_ += sizeof(float) * std::max<int64_t>(n, 1);
    sizes_[p] = std::max<int64_t>(n, 1);
    return p;
  }
  void release(float* p) noexcept override {
    if (!p) return;
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      bytes_ -= sizeof(float) * it->second;
      sizes_.erase(it);
    }
    cudaFree(p);
  }
  void copy(float* dst, const float* src, int64_t n) override {
    if (n <= 0 || dst == src) return;
    CELO2_CUDA_CHECK(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice));
    // A device-to-device cudaMemcpy may return before the copy is done, and NCCL's stream
    // (non-blocking) does not wait for the legacy stream: the bucket a reduce-scatter reads
    // must be in place first.
    sync();
  }
  void to_host(float* host, const float* src, int64_t n) override {
    if (n > 0) CELO2_CUDA_CHECK(cudaMemcpy(host, src, n * sizeof(float), cudaMemcpyDeviceToHost));
  }
  void from_host(float* dst, const float* host, int64_t n) override {
    if (n > 0) CELO2_CUDA_CHECK(cudaMemcpy(dst, host, n * sizeof(float), cudaMemcpyHostToDevice));
  }

  // ---- element-wise ----
  void scale(float* x, int64_t n, float s) override {
    if (n <= 0) return;
    cuda::scale_device(x, s, n, nullptr);
    sync();
  }
  void grad_stats(const float* g, int64_t n, double* nonfinite, double* sumsq) override {
    if (n <= 0) return;
    CELO2_CUDA_CHECK(cudaMemset(counter_, 0, sizeof(unsigned long long)));
    cuda::count_nonfinite_device(g, n, counter_, nullptr);
    unsigned long long bad = 0;
    CELO2_CUDA_CHECK(cudaMemcpy(&bad, counter_, sizeof bad, cudaMemcpyDeviceToHost));
    const float* x = g;
    if (bad) {  // the norm of the finite entries, as the CPU reports it
      reserve_scratch(n);
      copy(scratch_, g, n);
      cuda::scale_zero_nonfinite_device(scratch_, n, 1.0f, counter_, nullptr);
      x = scratch_;
    }
    *nonfinite += static_cast<double>(bad);
    *sumsq += sum_of(x, n);
  }
  void zero_nonfinite(float* x, int64_t n) override {
    if (n <= 0) return;
    cuda::scale_zero_nonfinite_device(x, n, 1.0f, counter_, nullptr);
    sync();
  }
  double apply(float lr, float wd, int64_t n, float* p, const float* u) override {
    if (n <= 0) return 0.0;
    CELO2_CUDA_CHECK(cudaMemset(out_, 0, sizeof(double)));
    cuda::apply_step_sumsq_device(lr, wd, n, p, u, partials_, out_, nullptr);
    return read_out();
  }  void store_lowp(DType d, uint16_t* dst, const float* src, int64_t n) override {
    if (n <= 0) return;
    cuda::store_lowp_device(d == DType::kBFloat16, dst, src, n, nullptr);
    sync();
  }
  int64_t reseed_master(DType d, float* master, const uint16_t* lowp, int64_t n) override {
    if (n <= 0) return 0;
    CELO2_CUDA_CHECK(cudaMemset(counter_, 0, sizeof(unsigned long long)));
    cuda::reseed_master_device(d == DType::kBFloat16, master, lowp, n, counter_, nullptr);
    unsigned long long changed = 0;
    CELO2_CUDA_CHECK(cudaMemcpy(&changed, counter_, sizeof changed, cudaMemcpyDeviceToHost));
    return static_cast<int64_t>(changed);
  }


  // ---- state ----
  void set_state(size_t t, SliceState s) override {
    // Celo2 planes wait on the host for their group; AdamW moments go to the device now.
    if (!s.mu.empty() || !s.nu.empty()) {
      Pair& a = adam_[t];
      free_pair(a);
      a.n = static_cast<int64_t>(s.mu.size());
      a.mu = alloc(a.n);
      a.nu = alloc(a.n);
      from_host(a.mu, s.mu.data(), a.n);
      from_host(a.nu, s.nu.data(), a.n);
      s.mu.clear();
      s.nu.clear();
    } else if (auto it = adam_.find(t); it != adam_.end()) {
      free_pair(it->second);
      adam_.erase(it);
    }
    drop_from_groups(t);
    host_[t] = std::move(s);
  }
  SliceState get_state(size_t t) override {
    SliceState s;
    if (auto it = where_.find(t); it != where_.end()) {
      s.rule = groups_.at(it->second.first)->set->download_state(it->second.second);
    } else if (auto h = host_.find(t); h != host_.end()) {
      s = h->second;
    }
    if (auto a = adam_.find(t); a != adam_.end()) {
      s.mu.resize(a->second.n);
      s.nu.resize(a->second.n);
      to_host(s.mu.data(), a->second.mu, a->second.n);
      to_host(s.nu.data(), a->second.nu, a->second.n);
    }
    return s;
  }
  int64_t state_bytes() const override { return bytes_; }

  // ---- the rule and AdamW ----
  void rule_whole(const RuleConfig& cfg, const Theta& theta, const std::vector<Whole>& tensors) override {
    if (!groups_match(cfg, theta, tensors)) regroup(cfg, theta, tensors);
    for (auto& gp : groups_) {
      Group& g = *gp;
      // Pack this step's gradients and parameters into the set's flat order.
      for (size_t k = 0; k < g.members.size(); ++k) {
        const Whole& w = tensors.at(g.index_in_call[k]);
        const int64_t o = g.set->offset(k), n = w.geo->numel;
        copy(g.g + o, w.g, n);
        copy(g.p + o, w.p, n);
      }
      g.set->step(g.g, g.p, g.u, nullptr);
      g.iteration += 1;  // the engine's counters advance by one per step
      for (size_t k = 0; k < g.members.size(); ++k) {
        const Whole& w = tensors.at(g.index_in_call[k]);
        copy(w.u, g.u + g.set->offset(k), w.geo->numel);
      }
    }
    sync();
  }
  double adamw(size_t t, const AdamWParams& a, int64_t n, float* p, const float* g) override {
    if (n <= 0) return 0.0;
    Pair& s = adam_.at(t);
    if (s.n != n) throw std::logic_error("cuda backend: AdamW state of tensor " + std::to_string(t) + " has the wrong size");
    reserve_scratch(n);
    copy(scratch_, p, n);
    cuda::adamw_device(a, n, p, g, s.mu, s.nu, nullptr);
    CELO2_CUDA_CHECK(cudaMemset(out_, 0, sizeof(double)));
    cuda::sumsq_diff_device(scratch_, p, n, partials_, out_, nullptr);
    return read_out();
  }

 private:
  struct Pair {
    float *mu = nullptr, *nu = nullptr;
    int64_t n = 0;
  };
  struct Group {
    std::unique_ptr<RuleSet> set;
    std::vector<size_t> members;        // tensor indices, in the set's order
    std::vector<size_t> index_in_call;  // where each member sits in rule_whole's list
    int64_t iteration = 0;              // after the next update
    float *g = nullptr, *p = nullptr, *u = nullptr;
    CudaBackend* owner = nullptr;
    ~Group() {
      if (owner) {
        owner->release(g);
        owner->release(p);
        owner->release(u);
      }
    }
  };

  void sync() { CELO2_CUDA_CHECK(cudaStreamSynchronize(nullptr)); }
  int device_ = 0;  // the device current at construction (the worker thread binds it)
  double read_out() {
    double v = 0;
    CELO2_CUDA_CHECK(cudaMemcpy(&v, out_, sizeof v, cudaMemcpyDeviceToHost));
    return v;
  }
  double sum_of(const float* x, int64_t n) {
    CELO2_CUDA_CHECK(cudaMemset(out_, 0, sizeof(double)));
    cuda::sumsq_device(x, n, partials_, out_, nullptr);
    return read_out();
  }
  void reserve_scratch(int64_t n) {
    if (n <= scratch_n_) return;
    release(scratch_);
    scratch_ = alloc(n);
    scratch_n_ = n;
  }
  void free_pair(Pair& a) {
    release(a.mu);
    release(a.nu);
    a = Pair{};
  }
  // Moves tensor t's state out of its group to the host, and drops the groups (rebuilt at
  // the next step).
  void drop_from_groups(size_t t) {
    if (!where_.count(t)) return;
    download_all();
  }
  void download_all() {
    for (const auto& [t, at] : where_) {
      host_[t].rule = groups_.at(at.first)->set->download_state(at.second);
    }
    where_.clear();
    groups_.clear();
  }
  bool groups_match(const RuleConfig& cfg, const Theta& theta, const std::vector<Whole>& ts) {
    if (!(theta_ == theta) || !(cfg_ == cfg)) return false;
    size_t members = 0;
    for (const auto& g : groups_) members += g->members.size();
    if (members != ts.size()) return false;
    for (size_t i = 0; i < ts.size(); ++i) {
      auto it = where_.find(ts[i].t);
      if (it == where_.end()) return false;
      Group& g = *groups_[it->second.first];
      if (g.iteration != ts[i].iteration || g.index_in_call[it->second.second] != i) return false;
    }
    return true;
  }
  void regroup(const RuleConfig& cfg, const Theta& theta, const std::vector<Whole>& ts) {
    download_all();
    cfg_ = cfg;
    theta_ = theta;
    std::map<int64_t, std::vector<size_t>> by_iteration;  // -> positions in ts
    for (size_t i = 0; i < ts.size(); ++i) by_iteration[ts[i].iteration].push_back(i);
    for (auto& [it, pos] : by_iteration) {
      auto g = std::make_unique<Group>();
      g->owner = this;
      g->iteration = it;
      std::vector<std::vector<int64_t>> shapes;
      for (size_t i : pos) shapes.push_back(ts[i].geo->shape);
      g->set = std::make_unique<RuleSet>(cfg, theta, shapes, ns_);
      g->set->set_iteration(it - 1);
      const int64_t total = g->set->total();
      g->g = alloc(total);
      g->p = alloc(total);
      g->u = alloc(total);
      for (size_t k = 0; k < pos.size(); ++k) {
        const size_t t = ts[pos[k]].t;
        g->members.push_back(t);
        g->index_in_call.push_back(pos[k]);
        if (auto h = host_.find(t); h != host_.end()) {
          g->set->upload_state(k, h->second.rule);  // packed: this backend's state_plane
          host_.erase(h);
        }
        where_[t] = {groups_.size(), k};
      }
      groups_.push_back(std::move(g));
    }
  }

  std::shared_ptr<cuda::NewtonSchulzCuda> ns_;
  std::vector<std::unique_ptr<Group>> groups_;
  std::map<size_t, std::pair<size_t, size_t>> where_;  // tensor -> (group, index in set)
  std::map<size_t, SliceState> host_;                  // state not in a group yet
  std::map<size_t, Pair> adam_;
  std::map<float*, int64_t> sizes_;
  int64_t bytes_ = 0;
  RuleConfig cfg_;
  Theta theta_;
  double* partials_ = nullptr;
  double* out_ = nullptr;
  unsigned long long* counter_ = nullptr;
  float* scratch_ = nullptr;
  int64_t scratch_n_ = 0;
};

}  // namespace

void register_cuda_backend() {
  register_backend("cuda", [] { return std::unique_ptr<Backend>(new CudaBackend()); });
}

}  // namespace celo2
