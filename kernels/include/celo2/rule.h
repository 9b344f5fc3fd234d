// The Celo2 update rule on one tensor (spec/celo2.md §2–§3), on the CPU.
//
// Two implementations of the same function live here:
//  - celo2_reference(): a literal transcription of the spec, in double precision, with
//    explicit multi-indices. Slow and obviously correct; the fast path is tested against it.
//  - the phase kernels (accumulate / update_factored / feature_sumsq / mlp / finish):
//    the fast path. Each works on a contiguous slice [lo, hi) of the tensor's flat,
//    row-major elements, so a sharded engine can run them on the slice it owns and sum the
//    small per-tensor statistics between phases; celo2_update() runs them over the whole
//    tensor with OpenMP.
// Determinism: every reduction is split into a fixed number of lanes (kLanes), independent of
// the thread count, and partial sums are combined in lane order, so results do not depend
// on OMP_NUM_THREADS.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/host_memory.h"
#include "celo2/elementwise.h"

namespace celo2 {

inline constexpr int kMaxDims = 8;

// Everything about a tensor's shape that the rule needs (factored axes, normalization
// groups, Newton–Schulz matrices), computed once at registration.
struct Geometry {
  std::vector<int64_t> shape;  // as registered; empty for a 0-d tensor
  int ndim = 0;
  int64_t numel = 1;
  bool factored = false;   // ndim >= 2
  int d0 = -1, d1 = -1;    // spec §2: d0 = largest axis, d1 = the one before it in sorted order
  int64_t row_count = 0;   // elements of v_row per decay: numel / shape[d0]
  int64_t col_count = 0;   // elements of v_col per decay: numel / shape[d1]
  int64_t rest_count = 0;  // numel / (shape[d0] * shape[d1]): groups of mean(v_row over d1')
  int64_t norm_size = 1;   // elements per normalization group (last min(n,2) axes)
  int64_t norm_groups = 1; // numel / norm_size
  int64_t mat_rows = 0, mat_cols = 0;  // the matrices of the last two axes (Newton–Schulz)
  // Per axis: how the row index (without d0), col index (without d1) and rest index move
  // when that axis' index grows by one. Used by IndexWalker.
  int64_t row_step[kMaxDims] = {}, col_step[kMaxDims] = {};
  int64_t rest_of_row_div = 1, rest_of_row_mod = 1, rest_of_row_len = 1;

  static Geometry of(std::span<const int64_t> shape);  // throws on bad shapes
  int channels() const { return factored ? kChannels : kChannels1d; }
  int64_t row_index(int64_t i) const;   // index into v_row of flat element i
  int64_t col_index(int64_t i) const;   // index into v_col of flat element i
  int64_t rest_index_of_row(int64_t r) const;  // which mean(v_row over d1') row r uses
  std::string shape_str() const;
};

// The stride of per-element state planes (m[k * plane + i]) for `n` elements: n below 4096,
// else n rounded up to 16 floats plus 4 KiB + 64 B. Planes exactly a large power of two
// apart (a 2048×8192 tensor: 64 MiB) contend for the same cache sets and DRAM banks while
// phase 1 streams all of them at once: on a Zen 4, phase 1 of a 16M-element matrix took
// 3.6–3.8 ns per element with planes n apart and 2.6–2.8 with this skew (docs/PERF.md).
int64_t state_plane(int64_t n);


struct Slice;

// Optimizer state of one tensor (or of a slice of it: the engine's ranks); planar layout
// (decay-major): m[k * stride + i], stride = the elements held (packed) or more.
struct RuleState {
  std::vector<float> m;       // kMom * stride
  std::vector<float> rms;     // kRms * stride
  std::vector<float> v_row;   // kFac * row_count (factored)
  std::vector<float> v_col;   // kFac * col_count (factored)
  std::vector<float> v_diag;  // kFac * stride (not factored)
  int64_t iteration = 0;
  int64_t plane = 0;          // the planes' stride, >= numel; 0: numel (packed)
  int64_t stride(int64_t numel) const { return plane > 0 ? plane : numel; }
  // packed: planes numel apart (the file and device layout); else state_plane(numel) apart.
  static RuleState zeros(const Geometry& geo, bool packed = true);
  // Zeros for `len` elements of a tensor of geometry geo (its slice; the factored tables
  // whole), the per-element planes `plane` apart (0: len, packed; else >= len).
  static RuleState zeros_for(const Geometry& geo, int64_t len, int64_t plane);
  // Points s's per-element state (m, rms, v_diag, plane) at element `at` of these planes,
  // which hold `len` elements.
  void point(Slice& s, int64_t len, int64_t at = 0);
};

// Decay-dependent constants of one update: clipped decays and bias corrections.
struct StepConstants {
  float mom[kMom], rms[kRms], fac[kFac];
  float bc_mom[kMom] = {1, 1, 1}, bc_rms[kRms] = {1}, bc_fac[kFac] = {1, 1, 1};
  static StepConstants of(const RuleConfig& cfg, int64_t iteration /* after += 1 */);
};

// The reference: a literal, double-precision transcription of spec §3 (and §9–11).
// Updates `state` and writes the raw step into u (numel floats).
void celo2_reference(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                     RuleState& state, const float* g, const float* p, float* u);

// ---------------------------------------------------------------------------------------
// Fast path, phase by phase, on a slice [lo, hi) of one tensor.
// ---------------------------------------------------------------------------------------

// A rank's (or a lane's) view of one tensor slice. Per-element state pointers point at the
// slice's first element and have plane stride `plane` (m[k * plane + (i - lo)]).
struct Slice {
  int64_t lo = 0, hi = 0;
  const float* g = nullptr;
  const float* p = nullptr;
  float* m = nullptr;
  float* rms = nullptr;
  float* v_diag = nullptr;
  int64_t plane = 0;
  float* u = nullptr;  // the step (output), slice-local
};

// Tables the features of a factored tensor read, built from the (summed) row/col statistics.
struct FacTables {
  std::vector<ew::FacEntry> rows;  // row_count
  std::vector<ew::FacEntry> cols;  // col_count
  // Structure-of-arrays copies (vectorized 2-D feature path), field-major: soa[(f * kFac + k) * count + idx],
  // f = vhat, inv_sqrt, scale, scale_hat.
  std::vector<float> rows_soa, cols_soa;
};

// Phase 1: clip g, update m, rms (and v_diag), and add q = g^2 + 1e-30 into row_sum/col_sum
// (factored; row_count and col_count doubles). Also adds sum(p^2) into *p2_sum.
// With local_sumsq (where local_sumsq_fits), the same pass also adds the sums of squares of
// the input channels that need only the element's new state into local_sumsq[c] (spec
// channel c of the tensor's one normalization group: all 15 of a 1-D tensor; 0-10 and 14 of a
// matrix), from registers; phase 3 is then called with local_done and adds only the rest.
void phase_accumulate(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                      const Slice& s, double* row_sum, double* col_sum, double* p2_sum,
                      double* local_sumsq = nullptr);

// Whether phase 1 takes the element-local sums of squares for this tensor: the input is
// normalized and the tensor is 1-D or a matrix of at least kLocalSumsqMinCols columns (its
// rows are whole vectors; narrower matrices keep phase 3's cross-row blocks). Every caller
// of the phases (celo2_update, the engine, celo2_update_batch) asks this, so they agree.
inline constexpr int64_t kLocalSumsqMinCols = 32;
inline bool local_sumsq_fits(const RuleConfig& cfg, const Geometry& geo) {
  return cfg.normalize_input && (geo.ndim == 1 || (geo.ndim == 2 && geo.shape[1] >= kLocalSumsqMinCols));
}

// Phase 2 (small, replicated): fold the summed statistics into v_row / v_col and build the
// feature tables.
void phase_update_factored(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                           const double* row_sum, const double* col_sum, float* v_row,
                           float* v_col, FacTables& tables);

// Phase 3: add each channel's sum of squares into sumsq[(group - group_base) * channels + c]
// for the normalization groups the slice touches; with local_done (phase 1 took local_sumsq),
// only the channels phase 1 did not add (none of a 1-D tensor; a matrix's table channels).
void phase_feature_sumsq(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                         const Slice& s, const FacTables& tables, double* sumsq,
                         int64_t group_base = 0, bool local_done = false);

// Phase 4: normalize features with the summed sumsq, run the MLP, write direction*mag into
// s.u (or the bare direction if aggregate_mag; mag is then added into *mag_sum). With
// out_sumsq, also phase_output_sumsq's sums of what it wrote (out_sumsq[group - group_base]
// += Σ u²), for tensors whose output is normalized as written (no Newton–Schulz): a matrix's
// or a 1-D tensor's from the MLP's registers (no pass over u), other tensors' from memory.
// Equal to the separate pass up to the order of the double additions.
void phase_mlp(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
               const StepConstants& sc, const Slice& s, const FacTables& tables,
               const double* sumsq, double* mag_sum, double* out_sumsq = nullptr,
               int64_t group_base = 0);

// The tensor-wide factor of spec §3.8: exp(mean(mag)·exp_mult) if aggregate_mag, times
// sqrt(mean(p²) + 1e-9) if param_scale_mult (mag_sum, p2_sum: sums over the whole tensor).
float magnitude_factor(const RuleConfig& cfg, double mag_sum, double p2_sum, int64_t numel);

// Phase 5 helpers: u *= factor; the per-group sum of u^2; the final normalization.
void phase_scale(const Slice& s, float factor);
void phase_output_sumsq(const Geometry& geo, const Slice& s, double* group_sumsq,
                        int64_t group_base = 0);
void phase_finish(const RuleConfig& cfg, const Geometry& geo, const StepConstants& sc,
                  const Slice& s, const double* group_sumsq);

// Scratch memory reused across steps by celo2_update.
struct Workspace {
  std::vector<double> row_sum, col_sum, sumsq, out_sumsq;
  std::vector<double> lane_buf;
  FacTables tables;
  std::vector<float> ns_buf;
};

// The whole rule on one tensor, fast path, single process (OpenMP inside).
void celo2_update(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                  RuleState& state, const float* g, const float* p, float* u, Workspace& ws);

// Number of fixed reduction lanes (see the header comment).
inline constexpr int kLanes = 16;

}  // namespace celo2
