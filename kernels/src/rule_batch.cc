// celo2_update_batch (celo2/rule_batch.h): the phase kernels of celo2/rule.h over many small
// tensors, in celo2_update()'s order with one lane per tensor, no OpenMP, one scratch.
#include "celo2/rule_batch.h"

#include <algorithm>

#include "celo2/newton_schulz.h"

namespace celo2 {
namespace {

Slice whole_slice(const Geometry& geo, RuleState& st, const float* g, const float* p, float* u) {
  Slice s;
  s.lo = 0;
  s.hi = geo.numel;
  s.g = g;
  s.p = p;
  s.m = st.m.data();
  s.rms = st.rms.data();
  s.v_diag = geo.factored ? nullptr : st.v_diag.data();
  s.plane = st.stride(geo.numel);
  s.u = u;
  return s;
}

bool takes_ns(const RuleConfig& cfg, const Geometry& geo) { return cfg.orthogonalize && geo.factored; }

// The per-group sums of squares of the output, as celo2_update's output_sumsq (zeros when
// the output is not normalized).
void output_sumsq(const RuleConfig& cfg, const Geometry& geo, const Slice& s, std::vector<double>& out) {
  out.assign(static_cast<size_t>(geo.norm_groups), 0.0);
  if (cfg.normalize_output) phase_output_sumsq(geo, s, out.data(), 0);
}

}  // namespace

void celo2_update_batch(const RuleConfig& cfg, std::span<const RuleBatchItem> items,
                        RuleBatchWorkspace& ws, NsBatch ns) {
  // Phases 1–4 per tensor (and 5 for those without Newton–Schulz).
  for (size_t k = 0; k < items.size(); ++k) {
    const RuleBatchItem& it = items[k];
    const Geometry& geo = *it.geo;
    RuleState& st = *it.state;
    st.iteration += 1;
    const int64_t n = geo.numel;
    if (n == 0) continue;
    const StepConstants sc = StepConstants::of(cfg, st.iteration);
    const Slice s = whole_slice(geo, st, it.g, it.p, it.u);
    const int C = geo.channels();

    const int64_t stat_w = geo.factored ? geo.row_count + geo.col_count : 0;
    ws.stats.assign(static_cast<size_t>(stat_w + 1), 0.0);
    // As celo2_update: phase 1 squares the element-local channels where it can.
    const bool local = local_sumsq_fits(cfg, geo);
    ws.sumsq.assign(static_cast<size_t>(geo.norm_groups * C), 0.0);
    phase_accumulate(cfg, geo, sc, s, ws.stats.data() + 1, ws.stats.data() + 1 + geo.row_count,
                     ws.stats.data(), local ? ws.sumsq.data() : nullptr);
    const double p2_sum = ws.stats[0];
    if (geo.factored)
      phase_update_factored(cfg, geo, sc, ws.stats.data() + 1, ws.stats.data() + 1 + geo.row_count,
                            st.v_row.data(), st.v_col.data(), ws.tables);

    if (cfg.normalize_input) phase_feature_sumsq(cfg, geo, sc, s, ws.tables, ws.sumsq.data(), 0, local);

    double mag_sum = 0.0;
    const bool ns = takes_ns(cfg, geo);
    // Without Newton–Schulz the MLP pass also sums the output's squares (as celo2_update).
    ws.out_sumsq.assign(static_cast<size_t>(geo.norm_groups), 0.0);
    phase_mlp(cfg, *it.theta, geo, sc, s, ws.tables, ws.sumsq.data(), &mag_sum,
              !ns && cfg.normalize_output ? ws.out_sumsq.data() : nullptr);
    const float factor = magnitude_factor(cfg, mag_sum, p2_sum, n);
    if (ns) {
      phase_scale(s, factor);  // Newton–Schulz and the finish below
      continue;
    }
    // Without Newton–Schulz the factor only scales the sums of squares.
    for (double& v : ws.out_sumsq) v *= static_cast<double>(factor) * factor;
    phase_scale(s, factor);
    phase_finish(cfg, geo, sc, s, ws.out_sumsq.data());
  }

  // Newton–Schulz of every matrix: per matrix with BLAS, or all matrices of one shape in one
  // newton_schulz_batch call (shapes in order of first appearance).
  if (ns == NsBatch::kPerMatrix) {
    for (const RuleBatchItem& it : items) {
      const Geometry& geo = *it.geo;
      if (geo.numel == 0 || !takes_ns(cfg, geo)) continue;
      for (int64_t grp = 0; grp < geo.norm_groups; ++grp)
        newton_schulz(cfg, geo.mat_rows, geo.mat_cols, it.u + grp * geo.norm_size, ws.ns_buf);
    }
  } else {
    for (size_t k = 0; k < items.size(); ++k) {
      const Geometry& first = *items[k].geo;
      if (first.numel == 0 || !takes_ns(cfg, first)) continue;
      bool seen = false;  // this shape was done with an earlier item's
      for (size_t q = 0; q < k && !seen; ++q)
        seen = items[q].geo->numel > 0 && takes_ns(cfg, *items[q].geo) &&
               items[q].geo->mat_rows == first.mat_rows && items[q].geo->mat_cols == first.mat_cols;
      if (seen) continue;
      ws.ns_ptrs.clear();
      for (size_t q = k; q < items.size(); ++q) {
        const Geometry& geo = *items[q].geo;
        if (geo.numel == 0 || !takes_ns(cfg, geo) || geo.mat_rows != first.mat_rows ||
            geo.mat_cols != first.mat_cols)
          continue;
        for (int64_t grp = 0; grp < geo.norm_groups; ++grp)
          ws.ns_ptrs.push_back(items[q].u + grp * geo.norm_size);
      }
      newton_schulz_batch(cfg, first.mat_rows, first.mat_cols, ws.ns_ptrs, ws.ns_buf);
    }
  }

  // Phase 5 of the orthogonalized tensors: the output normalization.
  for (const RuleBatchItem& it : items) {
    const Geometry& geo = *it.geo;
    if (geo.numel == 0 || !takes_ns(cfg, geo)) continue;
    RuleState& st = *it.state;
    const StepConstants sc = StepConstants::of(cfg, st.iteration);
    const Slice s = whole_slice(geo, st, it.g, it.p, it.u);
    output_sumsq(cfg, geo, s, ws.out_sumsq);
    phase_finish(cfg, geo, sc, s, ws.out_sumsq.data());
  }
}

}  // namespace celo2
