// The sharded Celo2 engine on GPUs: tensors in device memory, the rule on the CUDA kernels
// (celo2/cuda/rule_cuda.h), collectives on NCCL (celo2/nccl_communicator.h). Built in CUDA
// builds that find NCCL (library celo2_gpu_engine).
//
// Sharding (celo2/gpu_plan.h): every Celo2 tensor has one owner rank (large AdamW tensors
// are split into pieces with their own owners), which keeps its optimizer state (float32)
// and, for bfloat16 parameters, its float32 master copy. One step:
//   0. every rank counts the non-finite entries of the gradients it holds (GradMode::kLocal:
//      its own; kReduced: those it owns); one 8-byte all-reduce; the NaN policy decides
//      (skip / error / zero) before any state changes;
//   1. per bucket, in the plan's global order, on the communicator's stream: the bucket's
//      gradients are reduced (summed) to its owner (kLocal with W > 1; ncclReduce, grouped);
//   2. on the engine's compute stream, as soon as a bucket it owns has arrived: average
//      (×1/W), zero what overflowed in the sum (counted), gradient norms, the Celo2 rule of
//      the bucket (one RuleSet: multi-tensor phases + batched Newton–Schulz) or one fused
//      AdamW, the update applied to the float32 parameters (master copy), parameters written
//      back (bf16: rounded from the master);
//   3. per bucket, on the communicator's stream after the owner's compute: parameters
//      broadcast from the owner (gather_params), grouped.
// So reducing bucket k+1 overlaps computing bucket k, and broadcasting bucket k overlaps
// computing bucket k+1. step() returns after both streams finish (the StepReport needs the
// norms); the trainer's stream waits on events first, so work it enqueued before step() is
// seen and work it enqueues after sees the new parameters.
//
// Results equal the single-process Optimizer's up to the CUDA rule's float32 tolerance
// (tests/gpu/gpu_engine_test.cc) and checkpoints are the same world-size-independent files
// (celo2/state_file.h): a state saved by the GPU engine loads into the CPU Optimizer or
// Engine, and back.
//
// Differences from the CPU Engine, by design: the NaN decision is taken on the ranks' local
// gradients before they travel (so a skipped step costs no communication and overlaps
// nothing); StepReport::nonfinite counts entries over the ranks' local gradients (kLocal)
// rather than after the sum; an overflow to Inf in the sum of finite local gradients is
// zeroed and counted (reported in nonfinite), not skipped; a skipped step reports no
// gradient norms; bf16 gradients are summed in bf16 by NCCL (as PyTorch DDP does for bf16
// gradients) and averaged in float32. With gather_params = false, set_rules expects the
// trainer to have gathered the parameters (a piece that moves reads them on its new owner).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "celo2/engine.h"  // GradMode, PhaseStats, agree_on_error, EngineControl
#include "celo2/gpu_plan.h"
#include "celo2/nccl_communicator.h"
#include "celo2/optimizer.h"

struct CUstream_st;

namespace celo2 {

enum class DType { kFloat32, kBFloat16 };
DType parse_dtype(const std::string& s);  // float32 | bfloat16 (also fp32, bf16)
const char* dtype_name(DType d);

struct GpuEngineOptions {
  OptimizerOptions opt;
  GradMode grad_mode = GradMode::kLocal;
  bool gather_params = true;             // broadcast parameters from their owners
  int64_t bucket_bytes = 64ll << 20;     // float32 gradient bytes per bucket
  std::string ns_precision = "float32";  // float32 | tf32 | bf16 (Newton–Schulz GEMMs)
};

class GpuEngine : public EngineControl {
 public:
  // Uses comm's device (cudaSetDevice) and creates its own compute stream there.
  GpuEngine(GpuEngineOptions options, std::shared_ptr<NcclCommunicator> comm);
  ~GpuEngine() override;
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  // Same order on every rank. params / grads: device pointers to the whole tensor on every
  // rank (grads read, params updated in place). Registration closes at the first step.
  void add_tensor(const std::string& name, std::vector<int64_t> shape, DType param_dtype,
                  void* params, DType grad_dtype, const void* grads);
  // float32 shorthand.
  void add_tensor(const std::string& name, std::vector<int64_t> shape, float* params,
                  const float* grads) {
    add_tensor(name, std::move(shape), DType::kFloat32, params, DType::kFloat32, grads);
  }

  // `stream`: the trainer's stream that produced the gradients (null: the legacy default).
  StepReport step(CUstream_st* stream = nullptr);
  StepReport step_with_lr(double lr, CUstream_st* stream = nullptr);

  // Collective. The files of state_file.h; rank 0 writes; load validates every record on
  // every rank before anything changes.
  void save_state(const std::string& path) override;
  void load_state(const std::string& path);

  // Control (collective, at a step boundary). State is kept; a tensor whose label changes
  // starts that branch from zero (as in Optimizer::set_rules). A theta the CUDA rule cannot
  // run is refused with the state unchanged.
  void set_theta(Theta theta) override;
  void set_schedule(const Schedule& s) override;
  void set_rules(const LabelRules& rules) override;
  void set_weight_decay(double wd) override { opts_.opt.weight_decay = require_finite("weight_decay", wd); }
  void set_mult_1d(double m) override { opts_.opt.mult_1d = require_finite("mult_1d", m); }
  // Re-read the float32 masters of bf16 parameters from the parameters (after the trainer
  // changed them itself, e.g. loaded a model checkpoint).
  void refresh_masters();

  const GpuPlan& plan();  // builds it if needed (closes registration)
  int owner_of(size_t i);  // owner of tensor i's first piece (-1: frozen or empty)
  std::string routing_table() const;
  int rank() const override;
  int world_size() const override;
  Communicator& comm() override { return *comm_; }
  int64_t step_count() const override { return step_; }
  int64_t skipped_steps() const override { return skipped_; }
  size_t num_tensors() const override;
  Label label_of(size_t i) const override;
  const GpuEngineOptions& options() const { return opts_; }
  const OptimizerOptions& optimizer_options() const override { return opts_.opt; }
  // Seconds of the last step: "check" (non-finite pre-pass and decision), "pipeline"
  // (reduce / compute / broadcast until both streams finished), "report" (norms all-reduce).
  const PhaseStats& last_phase_stats() const override { return stats_; }
  // Optimizer-state bytes this rank holds on its device (state + flat buffers).
  int64_t device_bytes() const;

 private:
  struct Entry;
  struct Group;
  struct Device;
  std::vector<GpuPlanTensor> plan_inputs() const;
  void rebuild();                       // collective: plan, move state, groups
  void snapshot_states(bool states);    // owned pieces' state (and masters) to the host
  void migrate(const GpuPlan& next);    // collective: host state to the next plan's owners
  void build_groups(GpuPlan next);      // device groups from the host snapshots
  void relabel();

  GpuEngineOptions opts_;
  std::shared_ptr<NcclCommunicator> comm_;
  std::vector<std::unique_ptr<Entry>> entries_;
  GpuPlan plan_;
  bool plan_ready_ = false;
  std::vector<Label> plan_labels_;              // labels the plan was built with
  std::vector<std::unique_ptr<Group>> groups_;  // per bucket (null: another rank's)
  bool groups_valid_ = false;                   // groups_ hold the state of plan_
  std::unique_ptr<Device> dev_;
  int64_t step_ = 0, skipped_ = 0;
  PhaseStats stats_;
};

}  // namespace celo2
