// The sharded engine (engine.h). Each phase below is named as in DESIGN.md.
#include "celo2/engine.h"
#include "celo2/isa.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <cstring>
#include <numeric>
#include <sstream>

#include "backend.h"
#include "celo2/adamw.h"
#include "celo2/flax_msgpack.h"
#include "celo2/newton_schulz.h"
#include "celo2/params.h"
#include "celo2/rule.h"
#include "celo2/split_ns.h"
#include "celo2/state_file.h"
#include "celo2/theta_io.h"
#include "engine_internal.h"
#include "recipe_internal.h"
#include "serial_worker.h"

namespace celo2 {

struct Engine::Entry {
  std::string name;
  Geometry geo;
  float* params = nullptr;     // float32 parameters (the trainer's); null for bf16/fp16
  void* raw = nullptr;         // the trainer's parameters, of `dtype`
  DType dtype = DType::kFloat32;
  BackendBuffer master;        // bf16/fp16: the float32 master of [master_lo, master_hi)
  int64_t master_lo = -1, master_hi = -1;
  TensorGroup group;
  const float* grads = nullptr;
  Label label = Label::kCelo2;
  bool needs_reset = true;
  int64_t offset = 0;          // first flat index
  int64_t lo = 0, hi = 0;      // this rank's part, in tensor coordinates
  int64_t local_off = 0;       // where [lo, hi) sits in this rank's flat slice
  // Update counters (the state itself is the backend's: backend.h SliceState).
  int64_t iteration = 0;       // celo2
  int64_t count = 0;           // adamw
  FacTables tables;            // the flat plan's feature tables (host)
  int first_matrix = -1;       // Newton–Schulz matrices of this tensor start here
  // offsets into the step's reduction buffers
  int64_t stat_off = 0, sq_off = 0, small_off = 0;

  int64_t len() const { return hi - lo; }
  bool lowp() const { return dtype != DType::kFloat32; }
  // The float32 values the update works on at tensor index i (this rank's part for bf16/fp16:
  // i in [lo, hi)).
  float* p_at(int64_t i) { return lowp() ? master.data() + (i - lo) : params + i; }
  uint16_t* half_at(int64_t i) const { return static_cast<uint16_t*>(raw) + i; }
  bool ns(const RuleConfig& cfg) const {
    return label == Label::kCelo2 && cfg.orthogonalize && geo.factored;
  }
  // The flat plan's view of this slice (host state of a host backend).
  Slice slice(float* g_local, float* u_local, SliceState& st) {
    Slice s;
    s.lo = lo;
    s.hi = hi;
    s.g = g_local + local_off;
    s.p = p_at(lo);
    st.rule.point(s, len());
    s.u = u_local + local_off;
    return s;
  }
};

struct Engine::Matrix {
  int entry = 0;
  int64_t group = 0;       // normalization group of the tensor
  int64_t flat_lo = 0, flat_hi = 0;
  int64_t rows = 0, cols = 0;
  int owner = 0;           // the owner, or the first rank of its group
  int ranks = 1;           // ranks in its group (1: one owner)
  int nominal = 1;         // the group's nominal size (its communicator: colour rank / nominal)
  int member = -1;         // this rank's index in the group, or -1
  bool split_poly = false; // the group splits the polynomial by rows (newton_schulz_split)
  int64_t owned_off = -1;  // offset of this rank's block in mat_buf_ if it is a member
  NsBlock block(int j) const { return NsBlock{flat_lo, rows, cols, ranks, j}; }
};

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A piece of one tensor's local slice: the unit of intra-rank parallel work. Pieces have a
// fixed size (not a function of the thread count); their partial sums are combined in
// piece order, in double, so results do not depend on the number of threads.
struct WorkItem {
  size_t k;             // index into the step's Celo2 tensors
  int64_t lo, hi;       // tensor coordinates
};
constexpr int64_t kItemElems = int64_t{1} << 18;

Slice sub_slice(Slice s, int64_t lo, int64_t hi) {
  const int64_t d = lo - s.lo;
  s.g += d;
  s.p += d;
  s.m += d;
  s.rms += d;
  if (s.v_diag) s.v_diag += d;
  s.u += d;
  s.lo = lo;
  s.hi = hi;
  return s;
}

// The Newton–Schulz group request (EngineOptions::ns_split): the option, or the
// CELO2_NS_SPLIT tunable where the option is unset (-1).
int ns_split_request(const EngineOptions& o) { return o.ns_split >= 0 ? o.ns_split : param::ns_split(); }

int64_t overlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t* lo) {
  *lo = std::max(a0, b0);
  return std::max<int64_t>(0, std::min(a1, b1) - *lo);
}

}  // namespace

Engine::Engine(EngineOptions options, std::shared_ptr<Communicator> comm)
    : opts_(std::move(options)), comm_(std::move(comm)) {
  if (!comm_) throw std::invalid_argument("Engine: null communicator");
  prepare_options(opts_.opt);
  if (opts_.bucket_elements < 1) throw std::invalid_argument("Engine: bucket_elements must be positive");
  // CELO2_NS_METHOD, when set to a method, is the process's (kernels' newton_schulz.h).
  if (const std::string m = param::ns_method(); m != "auto")
    set_ns_method_default(m == "gram" ? NsMethod::kGram : NsMethod::kStandard);
  if (const std::string isa = param::cpu_isa(); isa != "auto") set_cpu_isa(parse_cpu_isa(isa));
  set_cpu_prefetch(param::cpu_prefetch());
  if (opts_.opt.use_reference) opts_.backend = "reference";
  backend_ = make_backend(opts_.backend);
  // A BLAS forced onto narrower kernels than the CPU has halves Newton–Schulz: say so, once
  // per process (meta-training builds an engine per particle).
  if (comm_->rank() == 0 && std::string(backend_->name()) == "cpu") {
    static std::once_flag said;
    std::call_once(said, [] {
      if (const std::string note = blas_core_note(); !note.empty()) std::fprintf(stderr, "celo2: %s\n", note.c_str());
    });
  }
  // Backends without slice kernels (the reference, CUDA) run whole tensors.
  if (!backend_->slice_phases()) opts_.plan = Plan::kWholeTensors;
  // Newton–Schulz groups are the flat plan's (celo2/plan.h plan_ns); on whole tensors each
  // matrix's Newton–Schulz runs inside the rule on the rank that holds it. A request for
  // groups there is refused by name rather than ignored.
  if (opts_.plan == Plan::kWholeTensors) {
    const bool option = opts_.ns_split >= 0;
    const int force = ns_split_request(opts_);
    if (force >= 2)
      throw UnsupportedError("Engine: Newton–Schulz split over groups of " + std::to_string(force) + " ranks (" +
                             (option ? "EngineOptions::ns_split" : "CELO2_NS_SPLIT") +
                             ") needs the flat plan; backend '" + backend_->name() +
                             "' runs the whole-tensor plan, where each matrix's Newton–Schulz runs on the rank "
                             "holding it (unset it, or use the cpu backend's flat plan)");
  }
  grad_local_ = std::make_unique<BackendBuffer>(backend_.get());
  u_local_ = std::make_unique<BackendBuffer>(backend_.get());
  bucket_send_ = std::make_unique<BackendBuffer>(backend_.get());
  bucket_recv_ = std::make_unique<BackendBuffer>(backend_.get());
  overlap_ = opts_.overlap_grad_reduce && opts_.grad_mode == GradMode::kLocal && comm_->size() > 1 &&
             comm_->background_ok();
}



Engine::~Engine() {
  // The worker first: a bucket in flight uses the buffers below.
  worker_.reset();
}

size_t Engine::num_tensors() const { return entries_.size(); }
Label Engine::label_of(size_t i) const { return entries_.at(i)->label; }
int64_t Engine::offset_of(size_t i) const { return entries_.at(i)->offset; }
const std::string& Engine::name_of(size_t i) const { return entries_.at(i)->name; }
const TensorGroup& Engine::group_of(size_t i) const { return entries_.at(i)->group; }
DType Engine::dtype_of(size_t i) const { return entries_.at(i)->dtype; }

void Engine::set_group(size_t i, const TensorGroup& g) {
  if (i >= entries_.size())
    throw std::invalid_argument("set_group: tensor index " + std::to_string(i) + " of " +
                                std::to_string(entries_.size()));
  check_group(g, "tensor '" + entries_[i]->name + "'");
  entries_[i]->group = g;
}

void Engine::gather_params() {
  require_no_buckets("gather_params");
  if (!plan_ready_) build_plan();
  if (comm_->size() > 1) gather_params_now();
}

int64_t Engine::reseed_masters() {
  int64_t n = 0;
  for (auto& e : entries_)
    if (e->lowp() && e->len()) n += backend_->reseed_master(e->dtype, e->master.data(), e->half_at(e->lo), e->len());
  return n;
}

void Engine::publish_masters() {
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    if (e.lowp() && e.len() && e.label != Label::kFrozen && !skip_[i])
      backend_->store_lowp(e.dtype, e.half_at(e.lo), e.master.data(), e.len());
  }
}

int64_t Engine::memory_bytes() const {
  const int64_t floats = grad_local_->capacity() + u_local_->capacity() + bucket_send_->capacity() +
                         bucket_recv_->capacity() +
                         static_cast<int64_t>(send_buf_.capacity() + recv_buf_.capacity() + mat_buf_.capacity());
  int64_t masters = 0;
  for (const auto& e : entries_) masters += e->master.capacity();
  return (floats + masters) * static_cast<int64_t>(sizeof(float)) + backend_->state_bytes();
}

void Engine::reset_state(size_t i) {
  Entry& e = *entries_[i];
  e.iteration = 0;
  e.count = 0;
  backend_->set_state(i, SliceState::zeros(e.label, e.geo, e.len(), backend_->state_plane(e.len())));
  e.needs_reset = false;
}

void Engine::add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                        const float* grads) {
  add_tensor(name, std::move(shape), params, DType::kFloat32, grads);
}

void Engine::add_tensor(const std::string& name, std::vector<int64_t> shape, void* params, DType dtype,
                        const float* grads) {
  require_no_buckets("add_tensor");
  auto e = std::make_unique<Entry>();
  e->geo = check_registration(step_ > 0 || skipped_ > 0, name, shape, static_cast<const float*>(params), grads,
                              [&](const std::string& n) { return name_taken(entries_, n); });
  if (dtype != DType::kFloat32 && reinterpret_cast<uintptr_t>(params) % 2 != 0)
    throw std::invalid_argument("add_tensor('" + name + "'): " + dtype_name(dtype) +
                                " parameters not aligned to 2 bytes");
  e->name = name;
  e->raw = params;
  e->dtype = dtype;
  e->params = dtype == DType::kFloat32 ? static_cast<float*>(params) : nullptr;
  e->master.bind(backend_.get());
  e->grads = grads;
  e->offset = total_;
  total_ += e->geo.numel;
  entries_.push_back(std::move(e));
  relabel();
}

std::vector<TensorDesc> Engine::tensors() const {
  std::vector<TensorDesc> descs;
  for (const auto& e : entries_) descs.push_back({e->name, e->geo.shape});
  return descs;
}

size_t Engine::index_of(const std::string& name) const {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i]->name == name) return i;
  throw std::invalid_argument("no tensor named '" + name + "' is registered");
}

void Engine::relabel() {
  const std::vector<Label> labels = opts_.opt.rules.assign(tensors());
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i]->label != labels[i]) {
      entries_[i]->label = labels[i];
      entries_[i]->needs_reset = true;
    }
  plan_ready_ = false;
}

void Engine::warn_unused_rules() {
  const std::vector<std::string> unused = opts_.opt.rules.unused(tensors());
  if (unused.empty() || comm_->rank() != 0) return;
  std::string msg = "celo2: label rules that route no tensor (check the routing with --dry-run / routing_table()):";
  for (const std::string& u : unused) msg += "\n  " + u;
  std::fprintf(stderr, "%s\n", msg.c_str());
}

void Engine::build_plan() {
  if (!rules_checked_) {
    warn_unused_rules();
    rules_checked_ = true;
  }
  const int W = comm_->size(), r = comm_->rank();
  std::vector<PlanTensor> pts;
  for (const auto& e : entries_)
    pts.push_back({e->geo.numel, e->label, whole() ? tensor_step_cost(e->geo.shape, e->label, opts_.opt.rule) : 0.0});
  const std::vector<int64_t> cuts = plan_cuts(pts, W, opts_.plan);
  // A plan whose cuts moved (kWholeTensors after a relabel) moves the state with them.
  const bool reshard = !cuts_.empty() && cuts != cuts_;
  StateFile snapshot;
  if (reshard) snapshot = collect_state(/*all_ranks=*/true);
  cuts_ = cuts;
  auto cut = [&](int k) { return cuts_[k]; };
  my_lo_ = cut(r);
  my_hi_ = cut(r + 1);
  slice_counts_.assign(W, 0);
  for (int k = 0; k < W; ++k) slice_counts_[k] = cut(k + 1) - cut(k);
  const int64_t mine = my_hi_ - my_lo_;
  for (auto& ep : entries_) {
    Entry& e = *ep;
    int64_t lo = 0;
    const int64_t n = overlap(e.offset, e.offset + e.geo.numel, my_lo_, my_hi_, &lo);
    e.lo = n ? lo - e.offset : 0;
    e.hi = e.lo + n;
    e.local_off = n ? lo - my_lo_ : 0;
  }
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i]->needs_reset) reset_state(i);
  // bf16/fp16 masters of this rank's part, seeded from the parameters (a reshard then
  // installs the exact ones below).
  for (auto& ep : entries_) {
    Entry& e = *ep;
    if (!e.lowp() || (e.lo == e.master_lo && e.hi == e.master_hi)) continue;
    e.master.reset();
    e.master.resize(e.len());
    e.master_lo = e.lo;
    e.master_hi = e.hi;
    if (e.len()) backend_->reseed_master(e.dtype, e.master.data(), e.half_at(e.lo), e.len());
  }
  if (reshard)
    for (size_t i = 0; i < entries_.size(); ++i)
      if (const TensorStateRecord* rec = find_record(snapshot, entries_[i]->name); rec && rec->label == entries_[i]->label)
        install_state(i, *rec);
  // Newton–Schulz matrices and their owners: largest first onto the least-loaded rank.
  const RuleConfig& cfg = opts_.opt.rule;
  matrices_.clear();
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    e.first_matrix = -1;
    // The whole-tensor plan runs Newton–Schulz inside the rule, on the tensor's rank.
    if (!e.ns(cfg) || e.geo.numel == 0 || whole()) continue;
    e.first_matrix = static_cast<int>(matrices_.size());
    for (int64_t k = 0; k < e.geo.norm_groups; ++k) {
      Matrix m;
      m.entry = static_cast<int>(i);
      m.group = k;
      m.flat_lo = e.offset + k * e.geo.norm_size;
      m.flat_hi = m.flat_lo + e.geo.norm_size;
      m.rows = e.geo.mat_rows;
      m.cols = e.geo.mat_cols;
      matrices_.push_back(m);
    }
  }
  {
    std::vector<NsMatrix> ns;
    for (const auto& m : matrices_) ns.push_back({m.flat_lo, m.rows, m.cols});
    const int force = ns_split_request(opts_);
    const int force_poly = opts_.ns_split_poly >= 0 ? opts_.ns_split_poly : parse_split_poly(param::ns_split_poly());
    owners_ = plan_ns(ns, cuts_, cfg, NsCostModel::cpu(), force, force_poly);
    ns_split_apply_ = parse_split_apply(param::ns_split_apply());
    for (size_t i = 0; i < matrices_.size(); ++i) {
      Matrix& m = matrices_[i];
      m.owner = owners_.owner[i];
      m.nominal = owners_.group[i];
      m.ranks = std::min(m.nominal, W - m.owner);
      m.member = r >= m.owner && r < m.owner + m.ranks ? r - m.owner : -1;
      m.split_poly = owners_.split_poly[i] != 0;
    }
    const auto n_split = std::count_if(matrices_.begin(), matrices_.end(), [](const Matrix& m) { return m.ranks > 1; });
    if (n_split != static_cast<std::ptrdiff_t>(owners_.split_order.size()))
      throw std::logic_error("engine: the plan's split_order names " + std::to_string(owners_.split_order.size()) +
                             " groups, its matrices " + std::to_string(n_split));
  }
  // All-to-all layout: send grouped by destination, then matrix order (each member of a
  // matrix's group gets its block, celo2/plan.h NsBlock); receive grouped by source, then
  // matrix order. The reverse exchange uses the same layouts swapped.
  a2a_send_counts_.assign(W, 0);
  a2a_recv_counts_.assign(W, 0);
  owned_floats_ = 0;
  for (auto& m : matrices_) {
    for (int j = 0; j < m.ranks; ++j) a2a_send_counts_[m.owner + j] += m.block(j).count_in(my_lo_, my_hi_);
    m.owned_off = -1;
    if (m.member >= 0) {
      const NsBlock b = m.block(m.member);
      m.owned_off = owned_floats_;
      owned_floats_ += b.numel();
      for (int s = 0; s < W; ++s) a2a_recv_counts_[s] += b.count_in(cut(s), cut(s + 1));
    }
  }
  // Parameter all-gather pieces: each rank's slice without the Newton–Schulz matrices, plus
  // the whole matrices it owns (merged path), or simply its slice.
  // (bf16/fp16 tensors: an owner holds no master outside its slice, so directions travel back.)
  const bool any_lowp = std::any_of(entries_.begin(), entries_.end(), [](const auto& e) { return e->lowp(); });
  merged_ = opts_.gather_params && !cfg.precondition_output && !any_lowp;
  gather_pieces_.assign(W, {});
  gather_counts_.assign(W, 0);
  std::vector<int> matrix_at_entry(entries_.size(), -1);
  for (int k = 0; k < W; ++k) {
    auto add_piece = [&](int entry, int64_t lo, int64_t n) {
      if (n <= 0) return;
      gather_pieces_[k].push_back({entry, lo, n});
      gather_counts_[k] += n;
    };
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = *entries_[i];
      int64_t lo = 0;
      const int64_t n = overlap(e.offset, e.offset + e.geo.numel, cut(k), cut(k + 1), &lo);
      if (!n) continue;
      if (merged_ && e.first_matrix >= 0) continue;  // matrices come from their owners
      add_piece(static_cast<int>(i), lo - e.offset, n);
    }
    if (merged_)
      for (const Matrix& m : matrices_)
        if (k >= m.owner && k < m.owner + m.ranks)
          m.block(k - m.owner).runs(m.flat_lo, m.flat_hi, [&](int64_t flat, int64_t n, int64_t) {
            add_piece(m.entry, flat - entries_[m.entry]->offset, n);
          });
  }
  grad_local_->reset();
  u_local_->reset();
  grad_local_->resize(mine);
  u_local_->resize(mine);
  send_buf_.assign(std::accumulate(a2a_send_counts_.begin(), a2a_send_counts_.end(), int64_t{0}), 0.0f);
  recv_buf_.assign(std::accumulate(a2a_recv_counts_.begin(), a2a_recv_counts_.end(), int64_t{0}), 0.0f);
  mat_buf_.assign(owned_floats_, 0.0f);
  build_buckets();
  plan_ready_ = true;
}

const OwnerPlan& Engine::owner_plan() {
  if (!plan_ready_) build_plan();
  return owners_;
}

// Bytes this rank has sent, over the world and the Newton–Schulz groups.
int64_t Engine::bytes_sent() const {
  int64_t b = 0;
  for (const auto& [op, c] : comm_->counters()) b += c.bytes;
  for (const auto& [g, sub] : ns_groups_)
    for (const auto& [op, c] : sub->counters()) b += c.bytes;
  return b;
}

void Engine::phase_begin(const char* name) {
  cur_phase_ = name;
  phase_t0_ = now_s();
  phase_bytes0_ = bytes_sent();
}

void Engine::phase_end() {
  stats_.seconds[cur_phase_] += now_s() - phase_t0_;
  stats_.bytes[cur_phase_] += bytes_sent() - phase_bytes0_;
}

StepReport Engine::step(const std::vector<uint8_t>* has_grad) {
  return step_with_lr(opts_.opt.schedule.at(step_), has_grad);
}

// 1. Gradients reduce-scattered and averaged, one bucket of the flat index space at a time:
// no full-size copy of the gradients exists (the trainer's buffers are read in place into a
// bucket of at most bucket_elements floats). The buckets run last first (backward produces
// the last layers' gradients first), in the same order on every rank, either all at step()
// or, with overlap_grad_reduce, each as soon as its tensors are final (grad_ready) on the
// worker thread while the trainer's backward pass goes on. Either way the same sums land in
// the same places.
void Engine::build_buckets() {
  buckets_.clear();
  for (int64_t b0 = 0; b0 < total_; b0 += opts_.bucket_elements)
    buckets_.push_back({b0, std::min(total_, b0 + opts_.bucket_elements), 0});
  std::reverse(buckets_.begin(), buckets_.end());
  const size_t nb = buckets_.size();
  entry_buckets_.assign(entries_.size(), {0, 0});
  for (size_t t = 0; t < entries_.size(); ++t) {
    const Entry& e = *entries_[t];
    if (!e.geo.numel) continue;
    // bucket k (ascending) covers [k·B, (k+1)·B); launch index = nb - 1 - k.
    const auto first = static_cast<size_t>(e.offset / opts_.bucket_elements);
    const auto last = static_cast<size_t>((e.offset + e.geo.numel - 1) / opts_.bucket_elements);
    entry_buckets_[t] = {nb - 1 - last, nb - first};
  }
  reset_buckets();
}

void Engine::reset_buckets() {
  for (GradBucket& b : buckets_) b.pending = 0;
  for (const auto& [a, z] : entry_buckets_)
    for (size_t k = a; k < z; ++k) ++buckets_[k].pending;
  grad_marked_.assign(entries_.size(), 0);
  next_bucket_ = 0;
  grads_done_ = false;
}

void Engine::reduce_bucket(const GradBucket& b) {
  const int W = comm_->size();
  std::vector<int64_t> counts(W);
  bucket_send_->resize(b.hi - b.lo);
  for (auto& e : entries_) {
    int64_t lo = 0;
    const int64_t n = overlap(e->offset, e->offset + e->geo.numel, b.lo, b.hi, &lo);
    if (n) backend_->copy(bucket_send_->data() + (lo - b.lo), e->grads + (lo - e->offset), n);
  }
  for (int k = 0; k < W; ++k) {
    int64_t lo = 0;
    counts[k] = overlap(b.lo, b.hi, cuts_[k], cuts_[k + 1], &lo);
  }
  int64_t mlo = 0;
  const int64_t mine = overlap(b.lo, b.hi, my_lo_, my_hi_, &mlo);
  float* dst = grad_local_->data() + (mine ? mlo - my_lo_ : 0);
  comm_->reduce_scatter_sum(bucket_send_->data(), dst, counts);
  backend_->scale(dst, mine, 1.0f / static_cast<float>(W));
}

bool Engine::overlapping() const { return overlap_; }

void Engine::launch_bucket() {
  // Bytes are counted from the first bucket on (the worker is idle then: no race on the
  // communicator's counters).
  if (next_bucket_ == 0) grad_bytes0_ = bytes_sent();
  const GradBucket& b = buckets_[next_bucket_++];
  if (!worker_) {
    worker_ = std::make_unique<detail::SerialWorker>();
    worker_->post([this] { backend_->bind_thread(); });
  }
  worker_->post([this, &b] { reduce_bucket(b); });
}

void Engine::grad_ready(size_t i) {
  if (i >= entries_.size())
    throw std::out_of_range("grad_ready: tensor index " + std::to_string(i) + " of " +
                            std::to_string(entries_.size()));
  if (!overlapping() || !plan_ready_ || grads_done_) return;
  if (grad_marked_[i])
    throw std::logic_error("grad_ready: tensor '" + entries_[i]->name +
                           "' was already marked ready this step (with gradient accumulation, mark "
                           "tensors only after the last micro-batch: torch opt.no_sync())");
  grad_marked_[i] = 1;
  for (size_t k = entry_buckets_[i].first; k < entry_buckets_[i].second; ++k) --buckets_[k].pending;
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].pending == 0) launch_bucket();
}

void Engine::finish_grads() {
  if (opts_.grad_mode != GradMode::kLocal || comm_->size() == 1 || grads_done_) return;
  if (!plan_ready_) build_plan();
  const double t0 = now_s();
  try {
    // The worker's buckets first, then the rest here, in launch order.
    if (worker_) worker_->wait();
    if (next_bucket_ == 0) grad_bytes0_ = bytes_sent();
    while (next_bucket_ < buckets_.size()) {
      const GradBucket& b = buckets_[next_bucket_++];
      reduce_bucket(b);
    }
  } catch (...) {
    reset_buckets();
    throw;
  }
  grad_background_s_ = worker_ ? worker_->take_busy_seconds() : 0.0;
  grad_bytes_ = bytes_sent() - grad_bytes0_;
  grad_wait_s_ = now_s() - t0;
  grads_done_ = true;
}

void Engine::require_no_buckets(const char* op) const {
  if (next_bucket_ > 0 && !grads_done_)
    throw std::logic_error(std::string(op) + ": this step's gradient buckets are being reduced (grad_ready "
                           "started them); call step() first");
}

// 9. Parameters all-gathered: every rank contributes its pieces (gather_pieces_), streamed
// in rounds of at most bucket_elements / W floats per rank.
void Engine::gather_params_now() {
  const int W = comm_->size(), me = comm_->rank();
  const int64_t window = std::max<int64_t>(opts_.bucket_elements / W, 4096);
  const int64_t longest = *std::max_element(gather_counts_.begin(), gather_counts_.end());
  // Walks rank k's piece stream over [s0, s1), calling fn(entry, tensor index, stream
  // position, n).
  auto walk = [&](int k, int64_t s0, int64_t s1, auto fn) {
    int64_t at = 0;
    for (const Piece& pc : gather_pieces_[k]) {
      int64_t lo = 0;
      const int64_t n = overlap(at, at + pc.n, s0, s1, &lo);
      if (n) fn(*entries_[pc.entry], pc.lo + (lo - at), lo - s0, n);
      at += pc.n;
      if (at >= s1) break;
    }
  };
  std::vector<int64_t> counts(W);
  for (int64_t s0 = 0; s0 < longest; s0 += window) {
    int64_t sum = 0;
    for (int k = 0; k < W; ++k) {
      counts[k] = std::clamp<int64_t>(gather_counts_[k] - s0, 0, window);
      sum += counts[k];
    }
    bucket_send_->resize(counts[me]);
    walk(me, s0, s0 + counts[me], [&](Entry& e, int64_t i, int64_t at, int64_t n) {
      backend_->copy(bucket_send_->data() + at, e.p_at(i), n);  // bf16/fp16: from the master
    });
    bucket_recv_->resize(sum);
    comm_->all_gather(bucket_send_->data(), bucket_recv_->data(), counts);
    int64_t base = 0;
    for (int k = 0; k < W; ++k) {
      if (k != me)
        walk(k, s0, s0 + counts[k], [&](Entry& e, int64_t i, int64_t at, int64_t n) {
          const float* src = bucket_recv_->data() + base + at;
          if (e.lowp()) backend_->store_lowp(e.dtype, e.half_at(i), src, n);
          else backend_->copy(e.params + i, src, n);
        });
      base += counts[k];
    }
  }
}

StepReport Engine::step_with_lr(double lr, const std::vector<uint8_t>* has_grad) {
  try {
    check_step_lr(lr);
    if (has_grad && has_grad->size() != entries_.size())
      throw std::invalid_argument("step: has_grad has " + std::to_string(has_grad->size()) +
                                  " entries for " + std::to_string(entries_.size()) + " tensors");
  } catch (...) {
    // Gradients reduced ahead of a refused step (finish_grads from the Client) are not kept
    // for a later one: the next step reduces the trainer's buffers again.
    if (grads_done_) reset_buckets();
    throw;
  }
  if (!plan_ready_) build_plan();
  stats_ = PhaseStats{};
  const OptimizerOptions& o = opts_.opt;
  const RuleConfig& cfg = o.rule;
  const int W = comm_->size(), me = comm_->rank();
  StepReport rep;
  rep.lr = lr;

  // 1. Gradients: reduce-scatter and average, or take this rank's part of reduced ones.
  // Buckets started by grad_ready (or all of them now) end first: the worker is then idle, so
  // reading the communicator's counters (phase_begin) cannot race with it. They count as
  // this phase's, with the seconds the step waited for them ("grads_background": the
  // worker's time on them, hidden behind backward).
  const bool reduce = opts_.grad_mode == GradMode::kLocal && W > 1;
  const bool early = grads_done_;
  const double t_grads = now_s();
  if (reduce) finish_grads();
  phase_begin("grads");
  if (reduce) {
    reset_buckets();  // consumed: the next step starts afresh
    phase_bytes0_ = bytes_sent() - grad_bytes_;
    phase_t0_ = early ? phase_t0_ - grad_wait_s_ : t_grads;
    if (grad_background_s_ > 0) stats_.seconds["grads_background"] = grad_background_s_;
  } else {
    for (auto& e : entries_)
      if (e->len()) backend_->copy(grad_local_->data() + e->local_off, e->grads + e->lo, e->len());
  }
  // Tensors without a gradient on any rank this step (torch: .grad is None) are left as they
  // are, state and counters included, as torch.optim does. One small all-reduce, only when
  // the trainer says which tensors have gradients.
  skip_.assign(entries_.size(), 0);
  if (has_grad) {
    std::vector<double> present(entries_.size());
    for (size_t t = 0; t < present.size(); ++t) present[t] = (*has_grad)[t] ? 1.0 : 0.0;
    comm_->all_reduce_sum(present.data(), static_cast<int64_t>(present.size()));
    for (size_t t = 0; t < present.size(); ++t) {
      skip_[t] = present[t] == 0.0;
      rep.no_grad_tensors += skip_[t];
    }
  }
  // Non-finite entries and gradient norms, decided globally; bf16/fp16 elements the trainer
  // wrote since the last step re-seed their masters.
  double red[5] = {0, 0, 0, 0, static_cast<double>(reseed_masters())};
  std::vector<double> bad(entries_.size(), 0.0);
  for (size_t t = 0; t < entries_.size(); ++t) {
    const Entry& e = *entries_[t];
    if (e.label == Label::kFrozen || !e.len() || skip_[t]) continue;
    double s = 0, nb = 0;
    backend_->grad_stats(grad_local_->data() + e.local_off, e.len(), &nb, &s);
    bad[t] = nb;
    red[0] += nb;
    red[1 + static_cast<int>(e.label)] += s;
  }
  comm_->all_reduce_sum(red, 5);
  phase_end();
  rep.nonfinite = static_cast<int64_t>(red[0]);
  rep.masters_reseeded = static_cast<int64_t>(red[4]);
  for (int l = 0; l < 3; ++l) rep.grad_norm[l] = std::sqrt(red[1 + l]);
  std::string where;
  if (rep.nonfinite > 0 && o.nan_policy == NanPolicy::kError) {
    // Name the tensors (rare path: one more small all-reduce).
    comm_->all_reduce_sum(bad.data(), static_cast<int64_t>(bad.size()));
    for (size_t t = 0; t < entries_.size(); ++t)
      if (bad[t] > 0)
        where += (where.empty() ? "" : ", ") + std::to_string(static_cast<int64_t>(bad[t])) + " in '" +
                 entries_[t]->name + "'";
  }
  switch (decide_nan(o.nan_policy, rep.nonfinite, step_, where)) {
    case NanAction::kProceed: break;
    case NanAction::kSkip:
      mark_skipped(rep);
      return rep;
    case NanAction::kZeroEntries:
      backend_->zero_nonfinite(grad_local_->data(), grad_local_->size());
      break;
  }
  // Global clipping of the averaged gradients (sums over finite entries, so after the NaN
  // decision the norm is finite).
  rep.grad_norm_total = std::sqrt(red[1 + static_cast<int>(Label::kCelo2)] + red[1 + static_cast<int>(Label::kAdamW)]);
  rep.clip_scale = clip_factor(o.max_grad_norm, rep.grad_norm_total);
  if (rep.clip_scale < 1.0)
    backend_->scale(grad_local_->data(), grad_local_->size(), static_cast<float>(rep.clip_scale));
  double usq[3] = {0, 0, 0};

  if (whole()) {
    // 2–8 on whole tensors: every Celo2 tensor lies on one rank (the plan's cuts).
    phase_begin("rule");
    std::vector<Backend::Whole> mine;
    for (size_t i = 0; i < entries_.size(); ++i) {
      Entry& e = *entries_[i];
      if (e.label != Label::kCelo2 || e.geo.numel == 0 || skip_[i]) continue;
      e.iteration += 1;  // on every rank, so any rank's counter is the tensor's
      if (e.len())
        mine.push_back({i, &e.geo, e.iteration, grad_local_->data() + e.local_off, e.p_at(e.lo),
                        u_local_->data() + e.local_off});
    }
    backend_->rule_whole(cfg, o.theta, mine);
    double bad = 0, sq = 0;
    for (const Backend::Whole& w : mine) backend_->grad_stats(w.u, entries_[w.t]->len(), &bad, &sq);
    const NanAction act = check_updates(bad, rep);
    if (act == NanAction::kSkip) {
      phase_end();
      return rep;
    }
    for (const Backend::Whole& w : mine) {
      Entry& e = *entries_[w.t];
      if (act == NanAction::kZeroEntries) backend_->zero_nonfinite(w.u, e.len());
      usq[0] += backend_->apply(group_lr(lr, e.group), group_wd(o, e.group), e.len(), e.p_at(e.lo), w.u);
    }
    phase_end();
  } else if (!step_phases(lr, rep, &usq[0])) {
    return rep;
  }
  phase_begin("apply");
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    if (e.label != Label::kAdamW || e.geo.numel == 0 || skip_[i]) continue;
    e.count += 1;
    if (!e.len()) continue;
    usq[1] += backend_->adamw(i, adamw_params(o, lr, e.count, e.group), e.len(), e.p_at(e.lo),
                              grad_local_->data() + e.local_off);
  }
  comm_->all_reduce_sum(usq, 3);
  int64_t cnt[3] = {0, 0, 0};
  for (size_t i = 0; i < entries_.size(); ++i)
    if (!skip_[i]) cnt[static_cast<int>(entries_[i]->label)] += entries_[i]->geo.numel;
  set_update_rms(rep, usq, cnt);
  publish_masters();
  phase_end();

  if (opts_.gather_params && W > 1) {
    phase_begin("gather");
    gather_params_now();
    phase_end();
  }
  (void)me;
  ++step_;
  rep.step = step_;
  return rep;
}

NanAction Engine::check_updates(double local_bad, StepReport& rep) {
  comm_->all_reduce_sum(&local_bad, 1);
  rep.nonfinite_update = static_cast<int64_t>(local_bad);
  const NanAction act = decide_nan(opts_.opt.nan_policy, rep.nonfinite_update, step_,
                                   "in the Celo2 update, from finite gradients: the MLP weights give "
                                   "non-finite output");
  // Skipped: nothing is applied. The rule's state has taken this step's (finite) gradients.
  if (act == NanAction::kSkip) mark_skipped(rep);
  return act;
}

void Engine::mark_skipped(StepReport& rep) {
  ++skipped_;
  rep.skipped = true;
  rep.step = step_;
}

// 2–8 of the flat plan: the rule in phases on this rank's slices, with the small
// statistics summed between phases and Newton–Schulz at the matrices' owners. Applies the
// celo2 branch (its applied update's sum of squares on this rank into *usq0) unless the
// updates are non-finite and the NaN policy skips the step (returns false).
bool Engine::step_phases(double lr, StepReport& rep, double* usq0_out) {
  const OptimizerOptions& o = opts_.opt;
  const RuleConfig& cfg = o.rule;
  const int W = comm_->size(), me = comm_->rank();
  // 2. Local accumulators and partial row/col statistics.
  phase_begin("accumulate");
  std::vector<Entry*> celo;
  std::vector<int> celo_of(entries_.size(), -1);  // entry index -> index in celo
  std::vector<SliceState*> hs;  // their state, on the host (a host backend's)
  float* const G = grad_local_->data();
  float* const U = u_local_->data();
  int64_t stat_w = 0, sq_w = 0, small_w = 0;
  for (auto& ep : entries_) {
    Entry& e = *ep;
    if (e.label != Label::kCelo2 || e.geo.numel == 0 || skip_[&ep - entries_.data()]) continue;
    celo_of[&ep - entries_.data()] = static_cast<int>(celo.size());
    celo.push_back(&e);
    hs.push_back(backend_->host_state(static_cast<size_t>(&ep - entries_.data())));
    e.iteration += 1;
    e.stat_off = stat_w;
    stat_w += (e.geo.factored ? e.geo.row_count + e.geo.col_count : 0) + 1;
    e.sq_off = sq_w;
    if (cfg.normalize_input) sq_w += e.geo.norm_groups * e.geo.channels();
    e.small_off = small_w;
    small_w += 1 + (e.ns(cfg) ? 0 : e.geo.norm_groups);
  }
  std::vector<double> stat(stat_w, 0.0), sq(sq_w, 0.0), small(small_w, 0.0);
  std::vector<StepConstants> sc(celo.size());
  for (size_t k = 0; k < celo.size(); ++k) sc[k] = StepConstants::of(cfg, celo[k]->iteration);
  std::vector<WorkItem> items;
  for (size_t k = 0; k < celo.size(); ++k)
    for (int64_t lo = celo[k]->lo; lo < celo[k]->hi; lo += kItemElems)
      items.push_back({k, lo, std::min(celo[k]->hi, lo + kItemElems)});
  auto stat_width = [](const Entry& e) {
    return (e.geo.factored ? e.geo.row_count + e.geo.col_count : 0) + 1;
  };
  // Tensors phase 1 can square (rule.h local_sumsq_fits: one normalization group) get their
  // element-local channels' sums of squares from it, into sq before phase 3 adds the rest.
  auto local_sq = [&](const Entry& e) { return local_sumsq_fits(cfg, e.geo); };
  {
    std::vector<std::vector<double>> part(items.size());
#pragma omp parallel for schedule(dynamic, 1) if (items.size() > 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const WorkItem& w = items[it];
      Entry& e = *celo[w.k];
      const int64_t sw = stat_width(e);
      part[it].assign(sw + (local_sq(e) ? e.geo.channels() : 0), 0.0);
      double* base = part[it].data();
      phase_accumulate(cfg, e.geo, sc[w.k],
                       sub_slice(e.slice(G, U, *hs[w.k]), w.lo, w.hi),
                       e.geo.factored ? base : nullptr,
                       e.geo.factored ? base + e.geo.row_count : nullptr,
                       base + (e.geo.factored ? e.geo.row_count + e.geo.col_count : 0),
                       local_sq(e) ? base + sw : nullptr);
    }
    for (size_t it = 0; it < items.size(); ++it) {
      const Entry& e = *celo[items[it].k];
      const int64_t sw = stat_width(e);
      double* dst = stat.data() + e.stat_off;
      for (int64_t x = 0; x < sw; ++x) dst[x] += part[it][x];
      double* dsq = sq.data() + e.sq_off;  // its one normalization group
      for (size_t x = sw; x < part[it].size(); ++x) dsq[x - sw] += part[it][x];
    }
  }
  phase_end();

  // 3. Summed row/col statistics (and sum p² for param_scale_mult): one all-reduce.
  phase_begin("stats_reduce");
  comm_->all_reduce_sum(stat.data(), stat_w);
  phase_end();

  // 4. Feature tables and local features' sums of squares; 5. summed.
  phase_begin("features");
#pragma omp parallel for schedule(dynamic, 1) if (celo.size() > 1)
  for (size_t k = 0; k < celo.size(); ++k) {
    Entry& e = *celo[k];
    if (e.geo.factored) {
      const double* base = stat.data() + e.stat_off;
      phase_update_factored(cfg, e.geo, sc[k], base, base + e.geo.row_count, hs[k]->rule.v_row.data(),
                            hs[k]->rule.v_col.data(), e.tables);
    }
  }
  // Per item: partial sums over the normalization groups the item touches.
  auto group_range = [](const Entry& e, const WorkItem& w) {
    return std::pair<int64_t, int64_t>{w.lo / e.geo.norm_size, (w.hi - 1) / e.geo.norm_size + 1};
  };
  if (cfg.normalize_input) {
    std::vector<std::vector<double>> part(items.size());
#pragma omp parallel for schedule(dynamic, 1) if (items.size() > 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const WorkItem& w = items[it];
      Entry& e = *celo[w.k];
      const auto [g0, g1] = group_range(e, w);
      part[it].assign((g1 - g0) * e.geo.channels(), 0.0);
      phase_feature_sumsq(cfg, e.geo, sc[w.k],
                          sub_slice(e.slice(G, U, *hs[w.k]), w.lo, w.hi),
                          e.tables, part[it].data(), g0, local_sq(e));
    }
    for (size_t it = 0; it < items.size(); ++it) {
      const Entry& e = *celo[items[it].k];
      double* dst = sq.data() + e.sq_off + group_range(e, items[it]).first * e.geo.channels();
      for (size_t x = 0; x < part[it].size(); ++x) dst[x] += part[it][x];
    }
  }
  if (cfg.normalize_input) comm_->all_reduce_sum(sq.data(), sq_w);
  phase_end();

  // 6. The MLP on local elements.
  phase_begin("mlp");
  {
    std::vector<std::vector<double>> part(items.size());
#pragma omp parallel for schedule(dynamic, 1) if (items.size() > 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const WorkItem& w = items[it];
      Entry& e = *celo[w.k];
      const Slice s = sub_slice(e.slice(G, U, *hs[w.k]), w.lo, w.hi);
      const auto [g0, g1] = group_range(e, w);
      const bool out = !e.ns(cfg) && cfg.normalize_output;
      part[it].assign(1 + (out ? g1 - g0 : 0), 0.0);
      phase_mlp(cfg, o.theta, e.geo, sc[w.k], s, e.tables, sq.data() + e.sq_off, &part[it][0],
                out ? &part[it][1] : nullptr, g0);
    }
    for (size_t it = 0; it < items.size(); ++it) {
      const Entry& e = *celo[items[it].k];
      small[e.small_off] += part[it][0];
      if (part[it].size() > 1) {
        double* dst = &small[e.small_off + 1 + group_range(e, items[it]).first];
        for (size_t x = 1; x < part[it].size(); ++x) dst[x - 1] += part[it][x];
      }
    }
  }
  // 7a. Tensor-wide magnitude and the output sums of squares of tensors without NS.
  comm_->all_reduce_sum(small.data(), small_w);
  std::vector<float> factor(celo.size());
  for (size_t k = 0; k < celo.size(); ++k) {
    Entry& e = *celo[k];
    const double p2 = stat[e.stat_off + (e.geo.factored ? e.geo.row_count + e.geo.col_count : 0)];
    factor[k] = magnitude_factor(cfg, small[e.small_off], p2, e.geo.numel);
    if (!e.ns(cfg))
      for (int64_t gi = 0; gi < e.geo.norm_groups; ++gi)
        small[e.small_off + 1 + gi] *= static_cast<double>(factor[k]) * factor[k];
    if (e.len()) phase_scale(e.slice(G, U, *hs[k]), factor[k]);
  }
  phase_end();

  // 7b. Newton–Schulz at the owners, or split over their groups (celo2/split_ns.h).
  std::vector<double> mat_sq(matrices_.size(), 0.0);
  // This rank's blocks: (matrix, offset in mat_buf_), in matrix order.
  std::vector<size_t> mine_idx;
  for (size_t i = 0; i < matrices_.size(); ++i)
    if (matrices_[i].member >= 0 && !skip_[matrices_[i].entry]) mine_idx.push_back(i);
  if (!matrices_.empty()) {
    phase_begin("newton_schulz");
    auto cut = [&](int k) { return cuts_[k]; };
    // This rank's pieces of the matrices, in the send layout: by destination (a member of
    // the matrix's group), then matrix order, then flat order. fn(offset in u_local_,
    // count, offset in send_buf_).
    auto walk_mine = [&](auto fn) {
      std::vector<int64_t> pos(W, 0);
      for (int d = 1; d < W; ++d) pos[d] = pos[d - 1] + a2a_send_counts_[d - 1];
      for (const Matrix& m : matrices_)
        for (int j = 0; j < m.ranks; ++j)
          m.block(j).runs(my_lo_, my_hi_, [&](int64_t flat, int64_t n, int64_t) {
            fn(flat - my_lo_, n, pos[m.owner + j]);
            pos[m.owner + j] += n;
          });
    };
    walk_mine([&](int64_t local, int64_t n, int64_t pos) {
      std::memcpy(send_buf_.data() + pos, U + local, n * sizeof(float));
    });
    comm_->all_to_all_v(send_buf_.data(), a2a_send_counts_, recv_buf_.data(), a2a_recv_counts_);
    // Unpack into this rank's blocks (by source, then matrix order), orthogonalize, pack back.
    // fn(offset in mat_buf_, count, offset in recv_buf_).
    auto walk_owned = [&](auto fn) {
      int64_t pos = 0;
      for (int s = 0; s < W; ++s)
        for (const Matrix& m : matrices_) {
          if (m.member < 0) continue;
          m.block(m.member).runs(cut(s), cut(s + 1), [&](int64_t, int64_t n, int64_t at) {
            fn(m.owned_off + at, n, pos);
            pos += n;
          });
        }
    };
    walk_owned([&](int64_t at, int64_t n, int64_t pos) {
      std::memcpy(mat_buf_.data() + at, recv_buf_.data() + pos, n * sizeof(float));
    });
    // The split matrices first, in the plan's split_order on every member (their
    // all-reduces are collectives of the group; celo2/plan.h models this order); then the
    // whole matrices on their owners (threads over matrices).
    std::vector<char> mine(matrices_.size(), 0);
    for (size_t i : mine_idx) mine[i] = 1;
    std::vector<size_t> whole_idx, split_idx;
    for (size_t i : mine_idx)
      if (matrices_[i].ranks == 1) whole_idx.push_back(i);
    for (int i : owners_.split_order)
      if (mine[i]) split_idx.push_back(static_cast<size_t>(i));
    auto block_sumsq = [&](size_t i) {
      const Matrix& m = matrices_[i];
      Slice s;
      s.lo = 0;
      s.hi = m.block(m.member).numel();
      s.u = mat_buf_.data() + m.owned_off;
      phase_output_sumsq(entries_[m.entry]->geo, s, &mat_sq[i], 0);
    };
    bool any_split = false;
    for (const Matrix& m : matrices_) any_split = any_split || m.ranks > 1;
    if (any_split) {
      // One communicator per nominal group size, made in the same order on every rank.
      for (const Matrix& m : matrices_)
        if (m.ranks > 1 && !ns_groups_.count(m.nominal)) ns_groups_[m.nominal] = comm_->split(me / m.nominal, me);
      std::vector<float> scratch;
      for (size_t i : split_idx) {
        const Matrix& m = matrices_[i];
        const NsBlock b = m.block(m.member);
        newton_schulz_split(cfg, b.wide_rows(), b.local_cols(), mat_buf_.data() + m.owned_off,
                            *ns_groups_.at(m.nominal), scratch, b.tall(), m.split_poly, ns_split_apply_);
        if (cfg.normalize_output) block_sumsq(i);
      }
    }
#pragma omp parallel if (whole_idx.size() > 1)
    {
      std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
      for (size_t t = 0; t < whole_idx.size(); ++t) {
        const Matrix& m = matrices_[whole_idx[t]];
        newton_schulz(cfg, m.rows, m.cols, mat_buf_.data() + m.owned_off, scratch);
        if (cfg.normalize_output) block_sumsq(whole_idx[t]);
      }
    }
    if (!merged_) {
      walk_owned([&](int64_t at, int64_t n, int64_t pos) {
        std::memcpy(recv_buf_.data() + pos, mat_buf_.data() + at, n * sizeof(float));
      });
      comm_->all_to_all_v(recv_buf_.data(), a2a_recv_counts_, send_buf_.data(), a2a_send_counts_);
      walk_mine([&](int64_t local, int64_t n, int64_t pos) {
        std::memcpy(U + local, send_buf_.data() + pos, n * sizeof(float));
      });
    }
    // The matrices' sums of squares: summed over ranks where the slices finish the step
    // (members' blocks are partial sums; everyone else adds zeros), and over the groups
    // where members finish their blocks.
    if (cfg.normalize_output && (!merged_ || any_split))
      comm_->all_reduce_sum(mat_sq.data(), static_cast<int64_t>(mat_sq.size()));
    // On the merged path members finish the step and update the parameters of their
    // blocks (parameters are replicated), which reach every rank through the parameter
    // all-gather.
    if (merged_) {
#pragma omp parallel for schedule(dynamic, 1) if (mine_idx.size() > 1)
      for (size_t t = 0; t < mine_idx.size(); ++t) {
        const Matrix& m = matrices_[mine_idx[t]];
        const Entry& e = *entries_[m.entry];
        const auto k = static_cast<size_t>(celo_of[m.entry]);
        Slice s;
        s.lo = 0;
        s.hi = m.block(m.member).numel();
        s.u = mat_buf_.data() + m.owned_off;
        phase_finish(cfg, e.geo, sc[k], s, &mat_sq[mine_idx[t]]);
      }
    }
    phase_end();
  }

  // 8. Output normalization, the gate on non-finite updates, and the update, locally (the
  // merged path's members update their blocks).
  phase_begin("apply");
  std::vector<size_t> owned;
  if (merged_) owned = mine_idx;
  double bad = 0;
  {
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : bad) if (items.size() > 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const WorkItem& w = items[it];
      Entry& e = *celo[w.k];
      if (merged_ && e.ns(cfg)) continue;  // owners finished those
      const Slice s = sub_slice(e.slice(G, U, *hs[w.k]), w.lo, w.hi);
      const double* gsq = e.ns(cfg) ? &mat_sq[e.first_matrix] : &small[e.small_off + 1];
      phase_finish(cfg, e.geo, sc[w.k], s, gsq);
      double sq = 0;
      backend_->grad_stats(s.u, w.hi - w.lo, &bad, &sq);
    }
  }
  for (size_t i : owned) {
    double sq = 0;
    const Matrix& m = matrices_[i];
    backend_->grad_stats(mat_buf_.data() + m.owned_off, m.block(m.member).numel(), &bad, &sq);
  }
  const NanAction act = check_updates(bad, rep);
  if (act == NanAction::kSkip) {
    phase_end();
    return false;
  }
  const bool zero = act == NanAction::kZeroEntries;
  double usq0 = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : usq0) if (owned.size() > 1)
  for (size_t t = 0; t < owned.size(); ++t) {
    const Matrix& m = matrices_[owned[t]];
    const Entry& e = *entries_[m.entry];
    const NsBlock b = m.block(m.member);
    float* x = mat_buf_.data() + m.owned_off;
    if (zero) backend_->zero_nonfinite(x, b.numel());
    b.runs(m.flat_lo, m.flat_hi, [&](int64_t flat, int64_t n, int64_t at) {
      usq0 += apply_update(group_lr(lr, e.group), group_wd(o, e.group), n, e.params + (flat - e.offset), x + at);
    });
  }
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : usq0) if (items.size() > 1)
  for (size_t it = 0; it < items.size(); ++it) {
    const WorkItem& w = items[it];
    Entry& e = *celo[w.k];
    if (merged_ && e.ns(cfg)) continue;
    float* u = U + e.local_off + (w.lo - e.lo);
    if (zero) backend_->zero_nonfinite(u, w.hi - w.lo);
    usq0 += apply_update(group_lr(lr, e.group), group_wd(o, e.group), w.hi - w.lo, e.p_at(w.lo), u);
  }
  *usq0_out = usq0;
  phase_end();
  return true;
}

void Engine::set_theta(Theta theta) {
  theta.check_fits(opts_.opt.rule);
  opts_.opt.theta = std::move(theta);
}

void Engine::set_schedule(const Schedule& s) {
  s.validate();
  opts_.opt.schedule = s;
}

void Engine::set_max_grad_norm(double v) {
  if (!std::isfinite(v) || v < 0)
    throw std::invalid_argument("max_grad_norm must be a finite number >= 0 (0: no clipping), got " +
                                std::to_string(v));
  opts_.opt.max_grad_norm = v;
}

void Engine::set_rules(const LabelRules& rules) {
  require_no_buckets("set_rules");
  opts_.opt.rules = rules;
  rules_checked_ = false;
  relabel();
}

std::string Engine::routing_table() const {
  std::vector<Label> labels;
  for (const auto& e : entries_) labels.push_back(e->label);
  return format_routing_table(tensors(), labels, &opts_.opt.rules);
}

std::string Engine::plan_report() {
  if (!plan_ready_) build_plan();
  std::ostringstream s;
  const int W = comm_->size();
  s << "world size " << W << ", " << total_ << " elements, slice of rank " << comm_->rank()
    << ": [" << my_lo_ << ", " << my_hi_ << ")\n";
  int split = 0;
  for (const Matrix& m : matrices_) split += m.ranks > 1;
  s << "Newton–Schulz: " << matrices_.size() << " matrices (" << split
    << " split over groups of ranks), load imbalance (max/mean) " << owners_.imbalance << " (one owner each: "
    << owners_.imbalance_unsplit << ")\n";
  for (int r = 0; r < W; ++r) {
    int n = 0, b = 0;
    for (const Matrix& m : matrices_) {
      n += m.ranks == 1 && m.owner == r;
      b += m.ranks > 1 && r >= m.owner && r < m.owner + m.ranks;
    }
    s << "  rank " << r << ": " << n << " matrices, " << b << " blocks of split ones, modelled "
      << owners_.load[r] * 1e3 << " ms\n";
  }
  if (!stats_.seconds.empty()) {
    s << "last step, per phase (seconds, bytes sent by this rank):\n";
    for (const auto& [ph, t] : stats_.seconds)
      s << "  " << ph << ": " << t << " s, " << stats_.bytes.at(ph) << " B\n";
  }
  return s.str();
}

// ---------------------------------------------------------------------------------------
// Checkpoints: whole tensors by name, so W ranks save and W' ranks load.
// ---------------------------------------------------------------------------------------
// Rank 0's outcome, shared with every rank so all throw the same error or none does.
void agree_on_error(Communicator& comm, const std::string& local_error, bool io) {
  int64_t head[2] = {static_cast<int64_t>(local_error.size()), io ? 1 : 0};
  comm.broadcast(head, sizeof(head), 0);
  if (head[0] == 0) return;
  std::string msg(static_cast<size_t>(head[0]), '\0');
  if (comm.rank() == 0) msg = local_error;
  comm.broadcast(msg.data(), head[0], 0);
  if (head[1]) throw flax::IoError(msg);
  throw flax::FormatError(msg);
}

std::vector<const TensorStateRecord*> read_state_collective(Communicator& comm, const std::string& path,
                                                            const std::vector<TensorIdentity>& tensors,
                                                            StateFile& f) {
  // Rank 0 reads; every rank parses the same bytes and so reaches the same verdict.
  std::vector<uint8_t> bytes;
  std::string err;
  bool io = false;
  if (comm.rank() == 0) {
    try {
      bytes = flax::read_file(path);
    } catch (const flax::IoError& e) {
      err = e.what();
      io = true;
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  agree_on_error(comm, err, io);
  int64_t n = static_cast<int64_t>(bytes.size());
  comm.broadcast(&n, sizeof(n), 0);
  bytes.resize(n);
  comm.broadcast(bytes.data(), n, 0);
  f = parse_state_file(bytes, path);
  if (f.tensors.size() != tensors.size())
    throw flax::FormatError("optimizer state " + path + ": holds " + std::to_string(f.tensors.size()) +
                            " tensors, the engine has " + std::to_string(tensors.size()));
  std::vector<const TensorStateRecord*> recs;
  for (const TensorIdentity& t : tensors) {
    const TensorStateRecord* r = find_record(f, *t.name);
    if (!r) throw flax::FormatError("optimizer state " + path + ": no state for tensor '" + *t.name + "'");
    check_state_record(path, *r, *t.shape, t.label);
    recs.push_back(r);
  }
  return recs;
}

// Every tensor's whole state by name, gathered over the slices (collective). With
// all_ranks = false only rank 0's records hold the per-element arrays (checkpoints: rank 0
// writes). Entries whose label changed since their state was made contribute none.
StateFile Engine::collect_state(bool all_ranks) {
  const bool keep = all_ranks || comm_->rank() == 0;
  const int W = comm_->size();
  // This rank's slices, on the host (entries whose label changed since have none).
  std::vector<SliceState> mine(entries_.size());
  std::vector<std::vector<float>> masters(entries_.size());  // bf16/fp16: this rank's part
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    if (!e.needs_reset) mine[i] = backend_->get_state(i);
    if (e.lowp()) {
      masters[i].resize(e.master.size());
      backend_->to_host(masters[i].data(), e.master.data(), e.master.size());
    }
  }
  StateFile f;
  f.step = step_;
  f.skipped = skipped_;
  f.theta_sha256 = sha256_hex(theta_to_bytes(opts_.opt.theta));
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    TensorStateRecord r;
    r.name = e.name;
    r.shape = e.geo.shape;
    r.label = e.label;
    r.iteration = e.iteration;
    r.count = e.count;
    if (e.label == Label::kCelo2 && e.geo.factored && !e.needs_reset) {
      // Replicated on every rank in the flat plan; on the tensor's rank in the whole plan.
      r.v_row = mine[i].rule.v_row;
      r.v_col = mine[i].rule.v_col;
      if (whole() && W > 1) {
        const int holder = std::min(
            W - 1, static_cast<int>(std::upper_bound(cuts_.begin(), cuts_.end(), e.offset) - cuts_.begin()) - 1);
        comm_->broadcast(r.v_row.data(), static_cast<int64_t>(r.v_row.size() * sizeof(float)), holder);
        comm_->broadcast(r.v_col.data(), static_cast<int64_t>(r.v_col.size() * sizeof(float)), holder);
      }
    }
    f.tensors.push_back(std::move(r));
  }
  // Each per-element plane gathered over the slices, one bucket of the flat index space at a
  // time (host buffers: checkpoints are written from the host).
  std::vector<float> hsend, hrecv;
  using RecField = std::vector<float> TensorStateRecord::*;
  // One plane of the state: src(i) is entry i's slice data on this rank (its planes
  // stride(i) apart), has(e) whether it has the plane.
  auto gather_plane = [&](auto has, auto src, auto stride, RecField dst, int planes) {
    if (keep)
      for (size_t i = 0; i < entries_.size(); ++i)
        if (has(*entries_[i])) (f.tensors[i].*dst).assign(static_cast<size_t>(planes) * entries_[i]->geo.numel, 0.0f);
    for (int k = 0; k < planes; ++k)
      for (int64_t b0 = 0; b0 < total_; b0 += opts_.bucket_elements) {
        const int64_t b1 = std::min(total_, b0 + opts_.bucket_elements);
        std::vector<int64_t> counts(W);
        for (int r = 0; r < W; ++r) {
          int64_t lo = 0;
          counts[r] = overlap(b0, b1, cuts_[r], cuts_[r + 1], &lo);
        }
        int64_t mlo = 0;
        const int64_t n_mine = overlap(b0, b1, my_lo_, my_hi_, &mlo);
        hsend.assign(n_mine, 0.0f);
        hrecv.resize(b1 - b0);
        for (size_t i = 0; i < entries_.size(); ++i) {
          const Entry& e = *entries_[i];
          if (!has(e) || !e.len()) continue;
          int64_t lo = 0;
          const int64_t n = overlap(e.offset + e.lo, e.offset + e.hi, mlo, mlo + n_mine, &lo);
          if (n)
            std::memcpy(hsend.data() + (lo - mlo), src(i).data() + k * stride(i) + (lo - e.offset - e.lo),
                        n * sizeof(float));
        }
        comm_->all_gather(hsend.data(), hrecv.data(), counts);
        if (!keep) continue;
        for (size_t i = 0; i < entries_.size(); ++i) {
          const Entry& e = *entries_[i];
          if (!has(e)) continue;
          int64_t lo = 0;
          const int64_t n = overlap(e.offset, e.offset + e.geo.numel, b0, b1, &lo);
          if (n)
            std::memcpy((f.tensors[i].*dst).data() + k * e.geo.numel + (lo - e.offset), hrecv.data() + (lo - b0),
                        n * sizeof(float));
        }
      }
  };
  // field(s): the plane's array in a slice's state; Celo2's planes are rule.plane apart,
  // AdamW's packed.
  auto plane = [&](Label label, auto field, RecField dst, int planes, bool factored_too) {
    gather_plane([&](const Entry& e) { return e.label == label && !e.needs_reset && (factored_too || !e.geo.factored); },
                 [&](size_t i) -> const std::vector<float>& { return field(mine[i]); },
                 [&](size_t i) {
                   const int64_t len = entries_[i]->len();
                   return label == Label::kCelo2 ? mine[i].rule.stride(len) : len;
                 },
                 dst, planes);
  };
  gather_plane([](const Entry& e) { return e.lowp() && e.master_lo == e.lo && e.master_hi == e.hi; },
               [&](size_t i) -> const std::vector<float>& { return masters[i]; },
               [&](size_t i) { return entries_[i]->len(); }, &TensorStateRecord::master, 1);
  using S = const SliceState&;
  plane(Label::kCelo2, [](S s) -> const auto& { return s.rule.m; }, &TensorStateRecord::m, kMom, true);
  plane(Label::kCelo2, [](S s) -> const auto& { return s.rule.rms; }, &TensorStateRecord::rms, kRms, true);
  plane(Label::kCelo2, [](S s) -> const auto& { return s.rule.v_diag; }, &TensorStateRecord::v_diag, kFac, false);
  plane(Label::kAdamW, [](S s) -> const auto& { return s.mu; }, &TensorStateRecord::mu, 1, true);
  plane(Label::kAdamW, [](S s) -> const auto& { return s.nu; }, &TensorStateRecord::nu, 1, true);
  return f;
}

void Engine::install_state(size_t i, const TensorStateRecord& r) {
  Entry& e = *entries_[i];
  // The slice's planes, `stride` apart (the backend's layout), from the record's packed ones.
  const int64_t stride = e.label == Label::kCelo2 ? backend_->state_plane(e.len()) : e.len();
  auto take = [&](const std::vector<float>& whole, int planes) {
    const int64_t N = e.geo.numel;
    std::vector<float> out(static_cast<size_t>(planes * stride), 0.0f);
    for (int k = 0; k < planes; ++k)
      std::copy(whole.begin() + k * N + e.lo, whole.begin() + k * N + e.hi, out.begin() + k * stride);
    return out;
  };
  SliceState s;
  if (e.label == Label::kCelo2) {
    s.rule.plane = stride;
    s.rule.m = take(r.m, kMom);
    s.rule.rms = take(r.rms, kRms);
    s.rule.v_row = r.v_row;
    s.rule.v_col = r.v_col;
    if (!e.geo.factored) s.rule.v_diag = take(r.v_diag, kFac);
  } else if (e.label == Label::kAdamW) {
    s.mu = take(r.mu, 1);
    s.nu = take(r.nu, 1);
  }
  backend_->set_state(i, std::move(s));
  if (e.lowp() && e.len()) {
    // The checkpoint's masters exactly; without them, re-seeded from the parameters.
    if (!r.master.empty()) {
      backend_->from_host(e.master.data(), r.master.data() + e.lo, e.len());
    } else {
      std::vector<float> zeros(e.len(), 0.0f);
      backend_->from_host(e.master.data(), zeros.data(), e.len());
      backend_->reseed_master(e.dtype, e.master.data(), e.half_at(e.lo), e.len());
    }
  }
  e.iteration = r.iteration;
  e.count = r.count;
  e.needs_reset = false;
}

void Engine::save_state(const std::string& path) {
  require_no_buckets("save_state");
  if (!plan_ready_) build_plan();
  const StateFile f = collect_state(/*all_ranks=*/false);
  std::string err;
  bool io = false;
  if (comm_->rank() == 0) {
    try {
      write_state_file(path, f);
    } catch (const flax::IoError& e) {
      err = std::string("saving optimizer state: ") + e.what();
      io = true;
    } catch (const std::exception& e) {
      err = std::string("saving optimizer state: ") + e.what();
    }
  }
  agree_on_error(*comm_, err, io);
}

void Engine::load_state(const std::string& path) {
  require_no_buckets("load_state");
  if (!plan_ready_) build_plan();
  std::vector<TensorIdentity> ids;
  for (const auto& e : entries_) ids.push_back({&e->name, &e->geo.shape, e->label});
  StateFile f;
  const std::vector<const TensorStateRecord*> recs = read_state_collective(*comm_, path, ids, f);
  for (size_t i = 0; i < entries_.size(); ++i) install_state(i, *recs[i]);
  step_ = f.step;
  skipped_ = f.skipped;
}

}  // namespace celo2
