// The sharded Celo2 engine (DESIGN.md "One step, sharded"): ZeRO-style optimizer state over
// W ranks of a Communicator.
//
// Tensors are registered in a fixed order and laid out in one flat index space of N
// elements. Rank r owns the contiguous slice [N·r/W, N·(r+1)/W) and keeps optimizer state
// (m, rms, v_diag, AdamW moments) only for it; the factored vectors v_row/v_col are small
// and replicated. One step:
//   1. gradients reduce-scattered and averaged (GradMode::kLocal) or taken as already
//      reduced (kReduced); non-finite entries counted and the NaN decision made globally;
//   2. local accumulators; 3. summed row/col statistics (one all-reduce);
//   4. local features; 5. summed per-channel squares (one all-reduce); 6. local MLP;
//   7. one small all-reduce (tensor-wide magnitude, output sums of squares of tensors
//      without Newton–Schulz); every matrix goes to one owner (chosen by Newton–Schulz cost,
//      largest first onto the least-loaded rank), or in column blocks to a group of ranks
//      where the largest matrices bound the step (celo2/plan.h plan_ns; the group runs
//      celo2/split_ns.h), in one all-to-all; owners orthogonalize; a reverse all-to-all
//      returns the slices, one small all-reduce of the matrices' sums of squares (or, with
//      parameters gathered, owners apply the update themselves); 8. update applied
//      locally; 9. parameters all-gathered (or left to the trainer).
// Reductions are done in double over exact float squares, so the result is the same as
// the single-process Optimizer's for any W (to the last bit in practice; tests bound it).
//
// Two plans, one step (celo2/plan.h chooses the cuts and owners). kFlat is the above.
// kWholeTensors puts the cuts only at Celo2 tensor boundaries (AdamW and frozen tensors are
// still cut anywhere), balanced by modelled cost, so every Celo2 tensor lies on one rank and
// the rule runs whole there (phases 2–7 need no collective): what a backend without slice
// kernels runs (the reference; "cuda", whose multi-tensor rule keeps a tensor's statistics
// inside its launches). Either way the backend (server/src/engine/backend.h) does the work on the
// rank's memory and the engine does the rest once. The gradient, NaN, AdamW, apply, report and gather phases are the same code.
// Memory: the engine's own buffers are its slice (gradient, step, state) plus buckets of at
// most `bucket_elements` floats for the reduce-scatter and the all-gather; it never holds
// a full-size copy of the gradients or the parameters.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/engine_control.h"
#include "celo2/lowp.h"
#include "celo2/plan.h"
#include "celo2/recipe.h"
#include "celo2/state_file.h"

namespace celo2 {

enum class GradMode {
  kLocal,    // each rank passes its own full gradients; the engine averages them
  kReduced,  // every rank passes the same, already averaged, full gradients
};

struct EngineOptions {
  OptimizerOptions opt;
  GradMode grad_mode = GradMode::kLocal;
  bool gather_params = true;  // all-gather parameters after the update (else: the trainer does)
  Plan plan = Plan::kFlat;    // use_reference implies kWholeTensors
  // Where the tensors live and what runs on them: "cpu", "reference" (= opt.use_reference)
  // or, in CUDA builds, "cuda" (device pointers; whole-tensor plan).
  std::string backend = "cpu";
  // Floats per bucket of the gradient reduce-scatter and of the parameter all-gather (the
  // engine's only buffers not proportional to its slice).
  int64_t bucket_elements = int64_t{1} << 24;  // 64 MiB of float32
  // Newton–Schulz groups of the flat plan (celo2/plan.h plan_ns): -1, the CELO2_NS_SPLIT
  // tunable (unset: 0); 0, chosen by cost; 1, one owner per matrix; g >= 2, every matrix
  // split over groups of g ranks. The whole-tensor plan (cuda, reference) has no groups:
  // g >= 2 there, from either source, makes the constructor throw UnsupportedError.
  int ns_split = -1;
  // How a group forms the polynomial B = bA + cA² (celo2/split_ns.h split_poly): -1, the
  // CELO2_NS_SPLIT_POLY tunable (auto: where the cost model says it pays); 0, every member
  // all of it; 1, split by rows and all-gathered.
  int ns_split_poly = -1;
  // Overlap the gradient reduce-scatter with the trainer's backward pass (GradMode::kLocal,
  // W > 1; Megatron's overlap_grad_reduce): the trainer calls grad_ready(i) as each tensor's
  // gradient becomes final, and every bucket whose tensors are all final is reduce-scattered
  // on the engine's communication thread while backward goes on. Needs a transport that
  // allows it (Communicator::background_ok: MPI, NCCL); otherwise grad_ready() does nothing
  // and step() reduces every bucket, as without this option. On the cuda backend the
  // worker's copies run on the legacy default stream (torch's default stream: the gradient
  // a hook reports was queued there before it) and wait for it. The gradients are
  // read when their bucket starts: in-place changes after backward (torch's
  // clip_grad_norm_, GradScaler.unscale_) are not seen; use max_grad_norm instead.
  bool overlap_grad_reduce = false;
};

class Backend;
class BackendBuffer;
namespace detail {
class SerialWorker;
}

// Seconds and bytes (sent by this rank) of each phase of the last step.
struct PhaseStats {
  std::map<std::string, double> seconds;
  std::map<std::string, int64_t> bytes;
};

class Engine : public EngineControl {
 public:
  Engine(EngineOptions options, std::shared_ptr<Communicator> comm);
  ~Engine() override;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Same order on every rank. params/grads: the full tensor on every rank.
  // (grads = kReduced: only this rank's slice of `grads` is read.)
  void add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                  const float* grads);
  // bf16/fp16 parameters (celo2/lowp.h): `params` holds `dtype` values, the gradients stay
  // float32. The engine keeps float32 masters of this rank's slice (its memory: 4 B per
  // element / W), updates them, stores round(master) into the parameters and all-gathers
  // those. Elements the trainer writes between steps (model.load_state_dict, an EMA swap)
  // differ from round(master) and re-seed their masters at the next step
  // (StepReport::masters_reseeded). Checkpoints hold the masters; loading a checkpoint
  // without them re-seeds them from the parameters.
  void add_tensor(const std::string& name, std::vector<int64_t> shape, void* params, DType dtype,
                  const float* grads);

  // Per-tensor hyperparameters (torch param groups: recipe.h TensorGroup), from the next
  // step on; the same calls on every rank. Throws std::invalid_argument for bad values.
  void set_group(size_t i, const TensorGroup& g);
  const TensorGroup& group_of(size_t i) const;
  // Collective: every rank's updated slice into every rank's parameters (what step() does
  // when gather_params is true), for a trainer that runs with gather_params = false.
  void gather_params();
  DType dtype_of(size_t i) const;

  // `has_grad` (optional; one byte per tensor, registration order, same call on every rank):
  // 0 where this rank has no gradient for the tensor this step (torch: .grad is None; its
  // gradient memory must then hold zeros). A tensor without a gradient on every rank is left
  // unchanged, state and update counters included, as torch.optim does.
  StepReport step(const std::vector<uint8_t>* has_grad = nullptr);
  StepReport step_with_lr(double lr, const std::vector<uint8_t>* has_grad = nullptr);

  // Overlap (EngineOptions::overlap_grad_reduce). grad_ready(i): tensor i's gradient is final
  // for this step (torch: its post-accumulate-grad hook, after the last micro-batch). The
  // buckets (bucket_elements floats of the flat index space, the last one first, as backward
  // produces them) start in that fixed order on every rank, each once all its tensors are
  // ready. Marking a tensor twice in one step throws std::logic_error (gradient accumulation:
  // mark only after the last micro-batch). Tensors never marked are reduced at step().
  // Before the first step, and after a relabel, it does nothing (the plan is not built).
  void grad_ready(size_t i);
  // Collective: start every bucket not yet started, in order, and wait for all of them.
  // step() calls it; a caller with collectives of its own before step() (the Client's
  // control plane) calls it first. Rethrows a failed bucket's CommError.
  void finish_grads();
  // Whether grad_ready() overlaps anything (option set, transport and backend allow it).
  bool overlapping() const;

  // Collective. World-size-independent checkpoints (state_file.h); rank 0 writes. Load
  // validates everything (on every rank) before changing anything.
  void save_state(const std::string& path) override;
  void load_state(const std::string& path);

  void set_theta(Theta theta) override;
  void set_schedule(const Schedule& s) override;
  void set_rules(const LabelRules& rules) override;
  void set_weight_decay(double wd) override { opts_.opt.weight_decay = require_finite("weight_decay", wd); }
  void set_mult_1d(double m) override { opts_.opt.mult_1d = require_finite("mult_1d", m); }
  void set_max_grad_norm(double v) override;

  // This rank's slice [first, last) of the flat index space (tensors in registration
  // order), and where a tensor starts in it: what a trainer that gathers parameters itself
  // (gather_params = false) needs. Valid after the first step or owner_plan().
  std::pair<int64_t, int64_t> local_range() const { return {my_lo_, my_hi_}; }
  int64_t offset_of(size_t i) const;
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->size(); }
  int64_t step_count() const override { return step_; }
  int64_t skipped_steps() const override { return skipped_; }
  int64_t total_elements() const { return total_; }
  const EngineOptions& options() const { return opts_; }
  const OptimizerOptions& optimizer_options() const override { return opts_.opt; }
  const OwnerPlan& owner_plan();
  const PhaseStats& last_phase_stats() const override { return stats_; }
  std::string routing_table() const;
  std::string plan_report();
  Communicator& comm() override { return *comm_; }
  size_t num_tensors() const override;
  Label label_of(size_t i) const override;
  const std::string& name_of(size_t i) const;
  // Every registered tensor's name and shape, in registration order.
  std::vector<TensorDesc> tensors() const;
  // The index of the tensor registered as `name`; throws std::invalid_argument naming it.
  size_t index_of(const std::string& name) const;
  // Where slice k starts, for k = 0..W (valid after the first step or owner_plan()).
  const std::vector<int64_t>& cuts() const { return cuts_; }
  // Bytes this rank's engine holds: state, slice buffers and buckets (after a step).
  int64_t memory_bytes() const;

 private:
  struct Entry;
  struct Matrix;
  void relabel();
  void build_plan();
  void phase_begin(const char* name);
  void phase_end();
  void warn_unused_rules();  // rank 0, stderr: rules that route no tensor
  // Gradient buckets (the reduce-scatter of phase 1), in launch order.
  struct GradBucket {
    int64_t lo = 0, hi = 0;  // flat range
    int pending = 0;         // tensors overlapping it not yet marked ready this step
  };
  void build_buckets();
  void reduce_bucket(const GradBucket& b);
  void launch_bucket();                 // the next bucket, on the worker
  void reset_buckets();                 // for the next step: nothing marked, nothing started
  void require_no_buckets(const char* op) const;  // throws while buckets are in flight
  // Returns false when the step was skipped (non-finite updates under NanPolicy::kSkipStep).
  bool step_phases(double lr, StepReport& rep, double* usq0);
  // The gate between computing the Celo2 updates and applying them: sums this rank's count
  // of non-finite update entries over ranks and applies the NaN policy to it.
  NanAction check_updates(double local_bad, StepReport& rep);
  void mark_skipped(StepReport& rep);  // a step the NaN policy skips: counted, nothing applied
  StateFile collect_state(bool all_ranks);
  void install_state(size_t i, const TensorStateRecord& r);
  void reset_state(size_t i);
  void gather_params_now();
  int64_t reseed_masters();     // before a step: the trainer's writes into bf16/fp16 params
  void publish_masters();       // after the update: round(master) into this rank's slice
  bool whole() const { return opts_.plan == Plan::kWholeTensors; }

  EngineOptions opts_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<Communicator> comm_;
  std::vector<std::unique_ptr<Entry>> entries_;
  int64_t total_ = 0;
  int64_t my_lo_ = 0, my_hi_ = 0;  // this rank's flat slice
  std::vector<int64_t> slice_counts_, cuts_;
  bool plan_ready_ = false;
  bool rules_checked_ = false;
  std::vector<uint8_t> skip_;  // this step: tensors with no gradient on any rank
  std::vector<Matrix> matrices_;
  OwnerPlan owners_;
  int ns_split_apply_ = -1;  // newton_schulz_split's product (CELO2_NS_SPLIT_APPLY), every group
  // all-to-all layout
  std::vector<int64_t> a2a_send_counts_, a2a_recv_counts_;
  int64_t owned_floats_ = 0;
  // This rank's slice of the gradients and of the raw step, and the buckets of the
  // reduce-scatter / all-gather: the backend's memory (backend.h BackendBuffer).
  std::unique_ptr<BackendBuffer> grad_local_, u_local_, bucket_send_, bucket_recv_;
  // The flat plan's all-to-all of Newton–Schulz matrices (host backends only).
  std::vector<float> send_buf_, recv_buf_, mat_buf_;
  // The merged return path (gather_params without precondition_output): owners apply the
  // update to whole matrices and contribute them to the parameter all-gather, so directions
  // never travel back. Per rank: the (tensor, first element, count) pieces it contributes.
  struct Piece {
    int entry;
    int64_t lo, n;
  };
  bool merged_ = false;
  std::vector<std::vector<Piece>> gather_pieces_;
  std::vector<int64_t> gather_counts_;
  int64_t step_ = 0, skipped_ = 0;
  PhaseStats stats_;
  const char* cur_phase_ = nullptr;
  double phase_t0_ = 0;
  int64_t phase_bytes0_ = 0;
  // The Newton–Schulz groups' communicators, by nominal group size (made at the first step
  // that splits a matrix).
  std::map<int, std::unique_ptr<Communicator>> ns_groups_;
  int64_t bytes_sent() const;
  // Overlap of the gradient reduce-scatter (grad_ready / finish_grads).
  std::vector<GradBucket> buckets_;
  std::vector<std::pair<size_t, size_t>> entry_buckets_;  // per tensor: [first, last) in buckets_
  std::vector<uint8_t> grad_marked_;
  size_t next_bucket_ = 0;     // buckets_[0, next_bucket_) started this step
  bool grads_done_ = false;    // every bucket reduced into grad_local_, not yet consumed
  int64_t grad_bytes0_ = 0, grad_bytes_ = 0;  // bytes sent by this step's buckets
  double grad_wait_s_ = 0, grad_background_s_ = 0;
  bool overlap_ = false;       // overlapping(): decided at construction
  std::unique_ptr<detail::SerialWorker> worker_;
};

}  // namespace celo2
