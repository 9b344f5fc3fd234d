// Host-side construction of everything the CUDA kernels of rule_cuda.cu index: the tensor
// descriptors with their offsets into the set's buffers, the chunk table, the axis jobs of the
// row/col statistics, the group runs, the factored spans, the Newton–Schulz classes and the
// padded, packed MLP weights. Host-only and free of CUDA headers, so that
// tests/unit/rule_layout_test.cc can build exactly what RuleSet builds and run the kernels'
// per-element functions (rule_device.h) in plain host loops.
//
// Work tables (built once, at construction):
//  - chunks: pieces of at most kChunk elements that never cross a normalization group; one
//    thread block per chunk for every element-wise phase;
//  - axis jobs: the row/col statistics of a factored tensor are sums of q along one axis;
//    each is cut into segments of kSegment along the axis (fixed, shape-dependent only),
//    partial sums per segment go to a buffer and are combined in segment order;
//  - group runs: the chunks of one normalization group, combined in chunk order;
//  - spans: a flat index over the row+col entries (or rest means) of all factored tensors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "rule_device.h"

namespace celo2::cuda {

inline constexpr int64_t kChunk = 4096;    // elements per block of the element-wise phases
inline constexpr int64_t kSegment = 1024;  // axis elements per partial sum of the row/col statistics

struct AxisJob {
  int32_t tensor;
  int32_t is_row;     // output goes to rowsum (else colsum)
  int64_t len, stride, n_out;
  int64_t segs;
  int64_t part_off;   // partial buffer offset: part[part_off + seg * n_out + o]
  int64_t item_begin; // prefix over jobs of n_out * segs (work items)
  int64_t out_begin;  // prefix over jobs of n_out (combine)
};

struct GroupRun {
  int32_t tensor;
  int32_t width;   // values per chunk (channels, or 1)
  int64_t group;
  int64_t c0, c1;  // chunks [c0, c1)
  int64_t item_begin;  // prefix of width over runs
};

struct Span {
  int32_t tensor;
  int64_t begin;  // prefix
};

// The matrices of the last two axes of orthogonalized tensors, one class per shape.
struct NsClassLayout {
  int64_t rows, cols;
  std::vector<int64_t> offsets;    // start of each matrix in the flat u buffer
  std::vector<int32_t> tensor_of;  // its tensor (index of its magnitude factor)
};

struct SetLayout {
  std::vector<Geometry> geos;
  std::vector<TensorDesc> descs;
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_begin;  // per tensor, + sentinel
  std::vector<AxisJob> contig, strided;
  std::vector<GroupRun> fruns, oruns;
  std::vector<Span> fold, rest_spans;
  int64_t fold_total = 0, rest_total = 0, contig_items = 0, strided_items = 0;
  int64_t contig_out = 0, strided_out = 0, frun_items = 0, orun_items = 0;
  std::vector<NsClassLayout> ns_classes;
  // Sizes of the set's buffers (elements): g/p/u, m, rms, v_diag, v_row, v_col (floats);
  // rest means, feature and output sums of squares, axis partials (doubles). rowsum/colsum
  // and the row/col feature tables have vrow / kFac and vcol / kFac entries.
  int64_t total = 0, m = 0, r = 0, vd = 0, vrow = 0, vcol = 0, rest = 0, sumsq = 0,
          osumsq = 0, part = 0;

  static SetLayout build(const RuleConfig& cfg, const std::vector<std::vector<int64_t>>& shapes) {
    SetLayout L;
    int64_t x = 0, m = 0, r = 0, vd = 0, vrow = 0, vcol = 0, rest = 0, sumsq = 0, osumsq = 0;
    for (size_t ti = 0; ti < shapes.size(); ++ti) {
      const Geometry g = Geometry::of(shapes[ti]);
      L.geos.push_back(g);
      TensorDesc d;
      d.numel = g.numel;
      d.ndim = g.ndim;
      d.factored = g.factored;
      d.d0 = g.d0;
      d.d1 = g.d1;
      for (int a = 0; a < g.ndim; ++a) {
        d.shape[a] = g.shape[a];
        d.row_step[a] = g.row_step[a];
        d.col_step[a] = g.col_step[a];
      }
      d.row_count = g.row_count;
      d.col_count = g.col_count;
      d.rest_count = g.rest_count;
      d.rest_div = g.rest_of_row_div;
      d.rest_mod = g.rest_of_row_mod;
      d.rest_len = g.rest_of_row_len;
      d.norm_size = g.norm_size;
      d.norm_groups = g.norm_groups;
      d.ns = cfg.orthogonalize && g.factored;
      d.x_off = x;
      d.m_off = m;
      d.r_off = r;
      d.vd_off = vd;
      d.vrow_off = vrow;
      d.vcol_off = vcol;
      d.rowsum_off = vrow / kFac;  // one double per row / col entry
      d.colsum_off = vcol / kFac;
      d.rest_off = rest;
      d.rtab_off = vrow / kFac;
      d.ctab_off = vcol / kFac;
      d.sumsq_off = sumsq;
      d.osumsq_off = osumsq;
      x += g.numel;
      m += kMom * g.numel;
      r += kRms * g.numel;
      if (g.factored) {
        vrow += kFac * g.row_count;
        vcol += kFac * g.col_count;
        rest += kFac * g.rest_count;
      } else {
        vd += kFac * g.numel;
      }
      sumsq += g.norm_groups * g.channels();
      osumsq += g.norm_groups;
      L.descs.push_back(d);
    }
    L.total = x;
    L.m = m;
    L.r = r;
    L.vd = vd;
    L.vrow = vrow;
    L.vcol = vcol;
    L.rest = rest;
    L.sumsq = sumsq;
    L.osumsq = osumsq;
    const int nt = static_cast<int>(L.descs.size());

    // Chunks, group runs, tensor chunk ranges.
    L.chunk_begin.assign(nt + 1, 0);
    for (int ti = 0; ti < nt; ++ti) {
      const TensorDesc& d = L.descs[ti];
      L.chunk_begin[ti] = static_cast<int64_t>(L.chunks.size());
      for (int64_t grp = 0; grp < d.norm_groups; ++grp) {
        const int64_t glo = grp * d.norm_size, ghi = glo + d.norm_size;
        const int64_t c0 = static_cast<int64_t>(L.chunks.size());
        for (int64_t lo = glo; lo < ghi; lo += kChunk)
          L.chunks.push_back({ti, lo, std::min(ghi, lo + kChunk), grp});
        const int64_t c1 = static_cast<int64_t>(L.chunks.size());
        const int C = L.geos[ti].channels();
        L.fruns.push_back({ti, C, grp, c0, c1, L.frun_items});
        L.frun_items += C;
        L.oruns.push_back({ti, 1, grp, c0, c1, L.orun_items});
        L.orun_items += 1;
      }
    }
    L.chunk_begin[nt] = static_cast<int64_t>(L.chunks.size());

    // Axis jobs and factored spans.
    int64_t part = 0;
    for (int ti = 0; ti < nt; ++ti) {
      const TensorDesc& d = L.descs[ti];
      if (!d.factored || d.numel == 0) continue;
      for (int is_row = 1; is_row >= 0; --is_row) {
        const int ax = is_row ? d.d0 : d.d1;
        AxisJob j{};
        j.tensor = ti;
        j.is_row = is_row;
        j.len = d.shape[ax];
        j.stride = 1;
        for (int a = ax + 1; a < d.ndim; ++a) j.stride *= d.shape[a];
        j.n_out = d.numel / j.len;
        j.segs = (j.len + kSegment - 1) / kSegment;
        j.part_off = part;
        part += j.segs * j.n_out;
        std::vector<AxisJob>& list = j.stride == 1 ? L.contig : L.strided;
        int64_t& items = j.stride == 1 ? L.contig_items : L.strided_items;
        int64_t& outs = j.stride == 1 ? L.contig_out : L.strided_out;
        j.item_begin = items;
        j.out_begin = outs;
        items += j.n_out * j.segs;
        outs += j.n_out;
        list.push_back(j);
      }
      L.fold.push_back({ti, L.fold_total});
      L.fold_total += d.row_count + d.col_count;
      L.rest_spans.push_back({ti, L.rest_total});
      L.rest_total += kFac * d.rest_count;
    }
    L.part = part;

    // Newton–Schulz classes: every matrix of the last two axes of an orthogonalized tensor,
    // grouped by shape.
    std::map<std::pair<int64_t, int64_t>, size_t> cls;
    for (int ti = 0; ti < nt; ++ti) {
      const TensorDesc& d = L.descs[ti];
      if (!d.ns || d.numel == 0) continue;
      const auto key = std::make_pair(L.geos[ti].mat_rows, L.geos[ti].mat_cols);
      auto it = cls.find(key);
      if (it == cls.end()) {
        it = cls.emplace(key, L.ns_classes.size()).first;
        L.ns_classes.push_back({key.first, key.second, {}, {}});
      }
      NsClassLayout& c = L.ns_classes[it->second];
      for (int64_t grp = 0; grp < d.norm_groups; ++grp) {
        c.offsets.push_back(d.x_off + grp * d.norm_size);
        c.tensor_of.push_back(ti);
      }
    }
    return L;
  }
};

// The hidden width the MLP kernels are instantiated for (8, 16, 32 or 64).
inline int padded_hidden(int h) { return h <= 8 ? 8 : h <= 16 ? 16 : h <= 32 ? 32 : 64; }

// theta padded to width H and packed as rule_device.h's packed_theta_floats() describes.
inline std::vector<float> pack_theta(const Theta& theta, int H) {
  const int L = static_cast<int>(theta.layers.size());
  const int hl = L - 1;
  std::vector<float> out(packed_theta_floats(H, hl), 0.0f);
  float* w0 = out.data();
  float* b0 = w0 + kChannels * H;
  const DenseLayer& l0 = theta.layers[0];
  for (int c = 0; c < l0.in; ++c)
    for (int o = 0; o < l0.out; ++o) w0[c * H + o] = l0.w[c * l0.out + o];
  for (int o = 0; o < l0.out; ++o) b0[o] = l0.b[o];
  float* hidden = b0 + H;
  for (int l = 1; l < L - 1; ++l) {
    const DenseLayer& d = theta.layers[l];
    float* w = hidden + (l - 1) * (H * H + H);
    for (int c = 0; c < d.in; ++c)
      for (int o = 0; o < d.out; ++o) w[c * H + o] = d.w[c * d.out + o];
    for (int o = 0; o < d.out; ++o) w[H * H + o] = d.b[o];
  }
  float* wout = hidden + (hl - 1) * (H * H + H);
  const DenseLayer& d = theta.layers[L - 1];
  for (int c = 0; c < d.in; ++c)
    for (int o = 0; o < 2; ++o) wout[c * 2 + o] = d.w[c * d.out + o];
  wout[2 * H + 0] = d.b[0];
  wout[2 * H + 1] = d.b[1];
  return out;
}

}  // namespace celo2::cuda
