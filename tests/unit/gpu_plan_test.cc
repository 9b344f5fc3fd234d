// The GPU engine's ownership and bucket plan (celo2/gpu_plan.h), host code: every tensor with
// state lands in exactly one bucket of its owner, buckets never mix labels or counters and
// respect the byte cap (a single larger tensor gets its own bucket), flat offsets tile each
// owner's buffers, the global order interleaves owners, the plan is a function of its inputs
// and of shapes only for ownership, and GPT-3 XL's load spreads over 8 ranks.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "celo2/comm_model.h"
#include "celo2/gpu_plan.h"
#include "celo2/rule.h"

namespace {

using celo2::GpuPlan;
using celo2::GpuPlanTensor;
using celo2::Label;

int64_t numel(const std::vector<int64_t>& s) { return celo2::Geometry::of(s).numel; }

void check_invariants(const std::vector<GpuPlanTensor>& ts, const GpuPlan& p, int64_t bucket_bytes) {
  const int W = p.world;
  ASSERT_EQ(p.pieces_of.size(), ts.size());
  std::vector<int> seen(p.pieces.size(), 0);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(W);
  for (size_t b = 0; b < p.buckets.size(); ++b) {
    const auto& bk = p.buckets[b];
    ASSERT_FALSE(bk.pieces.empty());
    int64_t sum = 0, off = bk.flat_offset;
    for (int k : bk.pieces) {
      const celo2::GpuPiece& pc = p.pieces[k];
      seen[k] += 1;
      EXPECT_EQ(pc.owner, bk.owner);
      EXPECT_EQ(ts[pc.tensor].label, bk.label);
      EXPECT_EQ(ts[pc.tensor].counter, bk.counter);
      EXPECT_EQ(pc.bucket, static_cast<int>(b));
      EXPECT_EQ(pc.flat_offset, off) << "pieces of a bucket are contiguous, in order";
      off += pc.n;
      sum += pc.n;
    }
    EXPECT_EQ(sum, bk.elements);
    if (bk.pieces.size() > 1) {
      EXPECT_LE(bk.elements * 4, bucket_bytes);
    }
    for (size_t k = 1; k < bk.pieces.size(); ++k) EXPECT_LT(bk.pieces[k - 1], bk.pieces[k]);
    ranges[bk.owner].push_back({bk.flat_offset, bk.flat_offset + bk.elements});
  }
  for (size_t k = 0; k < p.pieces.size(); ++k) EXPECT_EQ(seen[k], 1) << "piece " << k;
  for (size_t t = 0; t < ts.size(); ++t) {
    const bool has_state = ts[t].label != Label::kFrozen && numel(ts[t].shape) > 0;
    const auto& ps = p.pieces_of[t];
    if (!has_state) {
      EXPECT_TRUE(ps.empty());
      EXPECT_EQ(p.owner_of(t), -1);
      continue;
    }
    ASSERT_FALSE(ps.empty());
    if (ts[t].label == Label::kCelo2) {
      EXPECT_EQ(ps.size(), 1u) << "celo2 tensors stay whole";
    }
    int64_t at = 0;  // the pieces tile the tensor
    for (int k : ps) {
      EXPECT_EQ(p.pieces[k].tensor, static_cast<int>(t));
      EXPECT_EQ(p.pieces[k].lo, at);
      EXPECT_GT(p.pieces[k].n, 0);
      at += p.pieces[k].n;
    }
    EXPECT_EQ(at, numel(ts[t].shape));
  }
  for (int r = 0; r < W; ++r) {  // each owner's buffers tiled exactly
    std::sort(ranges[r].begin(), ranges[r].end());
    int64_t at = 0;
    for (auto [lo, hi] : ranges[r]) {
      EXPECT_EQ(lo, at);
      at = hi;
    }
    EXPECT_EQ(at, p.owned_elements[r]);
  }
}

std::vector<GpuPlanTensor> gpt(int layers, int64_t d) {
  std::vector<GpuPlanTensor> ts;
  for (const auto& t : celo2::gpt_tensors(layers, d, 4 * d, 1000, 128)) ts.push_back({t.shape, t.label, 0});
  return ts;
}

TEST(GpuPlan, InvariantsOnAGptModel) {
  const auto ts = gpt(4, 64);
  for (int W : {1, 2, 3, 4, 7, 16, 100}) {
    for (int64_t bb : {int64_t{4}, int64_t{4 * 5000}, int64_t{64} << 20}) {
      const GpuPlan p = GpuPlan::build(ts, W, bb);
      SCOPED_TRACE("W=" + std::to_string(W) + " bucket_bytes=" + std::to_string(bb));
      check_invariants(ts, p, bb);
    }
  }
}

TEST(GpuPlan, BucketsSplitByLabelAndCounter) {
  std::vector<GpuPlanTensor> ts = {{{8, 8}, Label::kCelo2, 3}, {{8, 8}, Label::kCelo2, 3},
                                   {{8}, Label::kAdamW, 3},    {{8, 8}, Label::kCelo2, 0},
                                   {{8, 8}, Label::kFrozen, 0}, {{0, 8}, Label::kCelo2, 3},
                                   {{8, 8}, Label::kCelo2, 3}};
  const GpuPlan p = GpuPlan::build(ts, 1, 64 << 20);
  check_invariants(ts, p, 64 << 20);
  // [0,1] | [2] adamw | [3] counter 0 | [6] (after a different group): 4 buckets.
  ASSERT_EQ(p.buckets.size(), 4u);
  auto tensors_of = [&](const celo2::GpuBucket& b) {
    std::vector<int> v;
    for (int k : b.pieces) v.push_back(p.pieces[k].tensor);
    return v;
  };
  EXPECT_EQ(tensors_of(p.buckets[0]), (std::vector<int>{0, 1}));
  EXPECT_EQ(tensors_of(p.buckets[1]), (std::vector<int>{2}));
  EXPECT_EQ(tensors_of(p.buckets[2]), (std::vector<int>{3}));
  EXPECT_EQ(tensors_of(p.buckets[3]), (std::vector<int>{6}));
  EXPECT_EQ(p.owned_elements[0], 64 * 4 + 8);
}

TEST(GpuPlan, OrderInterleavesOwnersAndIsDeterministic) {
  const auto ts = gpt(6, 64);
  const GpuPlan a = GpuPlan::build(ts, 4, 4 * 6000), b = GpuPlan::build(ts, 4, 4 * 6000);
  ASSERT_EQ(a.pieces.size(), b.pieces.size());
  for (size_t k = 0; k < a.pieces.size(); ++k) EXPECT_TRUE(a.pieces[k] == b.pieces[k]);
  ASSERT_EQ(a.buckets.size(), b.buckets.size());
  for (size_t k = 0; k < a.buckets.size(); ++k) EXPECT_EQ(a.buckets[k].pieces, b.buckets[k].pieces);
  // The k-th bucket of every owner comes before the (k+1)-th of any owner.
  std::map<int, int> nth;
  int last_round = 0;
  for (const auto& bk : a.buckets) {
    const int round = nth[bk.owner]++;
    EXPECT_GE(round, last_round);
    last_round = round;
  }
  // The first W buckets belong to W different owners (each rank gets work at once).
  std::set<int> first;
  for (size_t k = 0; k < 4 && k < a.buckets.size(); ++k) first.insert(a.buckets[k].owner);
  EXPECT_EQ(first.size(), 4u);
}

TEST(GpuPlan, PlacementIgnoresCountersAndSplitsLargeAdamWTensors) {
  auto ts = gpt(3, 64);
  const GpuPlan a = GpuPlan::build(ts, 4, 64 << 20);
  for (size_t i = 0; i < ts.size(); ++i) ts[i].counter = static_cast<int64_t>(i % 3);
  const GpuPlan b = GpuPlan::build(ts, 4, 64 << 20);
  for (size_t t = 0; t < ts.size(); ++t)
    EXPECT_TRUE(a.same_placement(b, t)) << "update counters must never move state (tensor " << t << ")";
  check_invariants(ts, b, 64 << 20);
  // One large AdamW tensor among small matrices is spread over the ranks.
  std::vector<GpuPlanTensor> big = {{{4000000}, Label::kAdamW, 0}};
  for (int i = 0; i < 8; ++i) big.push_back({{64, 64}, Label::kCelo2, 0});
  const GpuPlan c = GpuPlan::build(big, 4, 64 << 20);
  check_invariants(big, c, 64 << 20);
  std::set<int> owners;
  for (int k : c.pieces_of[0]) owners.insert(c.pieces[k].owner);
  EXPECT_EQ(owners.size(), 4u);
  EXPECT_LT(c.imbalance, 1.10) << c.describe();
  // A relabel can move pieces; same_placement says so.
  big[0].label = Label::kCelo2;
  const GpuPlan d = GpuPlan::build(big, 4, 64 << 20);
  EXPECT_FALSE(c.same_placement(d, 0));
}

TEST(GpuPlan, Gpt3XlBalancesOver8And64Ranks) {
  std::vector<GpuPlanTensor> ts;
  for (const auto& t : celo2::gpt_tensors(24, 2048, 8192, 50257, 2048)) ts.push_back({t.shape, t.label, 0});
  for (int W : {8, 64}) {
    const GpuPlan p = GpuPlan::build(ts, W, 64ll << 20);
    check_invariants(ts, p, 64ll << 20);
    // 8 ranks: many tensors per rank; 64: the largest whole matrix (fc1/fc2, 16.8 M
    // elements with Newton–Schulz) is ~1.5x the balanced share of 20.6 M elements' work.
    EXPECT_LT(p.imbalance, W == 8 ? 1.05 : 1.6) << p.describe();
  }
}

TEST(GpuPlan, RejectsBadArguments) {
  EXPECT_THROW(GpuPlan::build({}, 0, 1024), std::invalid_argument);
  EXPECT_THROW(GpuPlan::build({}, 1, 0), std::invalid_argument);
  EXPECT_THROW(GpuPlan::build({{{-1, 2}, Label::kCelo2, 0}}, 1, 1024), std::invalid_argument);
  EXPECT_THROW(GpuPlan::build({}, 1, 1024).owner_of(0), std::out_of_range);
  const GpuPlan p = GpuPlan::build({}, 3, 1024);
  EXPECT_TRUE(p.buckets.empty());
  EXPECT_EQ(p.owned_elements, (std::vector<int64_t>{0, 0, 0}));
}

}  // namespace
