// Newton–Schulz of one matrix split over a group of ranks: what the engine's step runs for
// the matrices its planner (celo2/plan.h plan_ns) gives a group of ranks.
//
// The matrix is taken in its wide orientation, r×c with r <= c (the engine transposes tall
// matrices, as newton_schulz does). Rank i of `group` holds the column block X_i (r × c_i,
// row-major; c_i may be 0, e.g. a group larger than the column count). Per iteration:
//   A = Σ_i X_i X_iᵀ     (each rank's ssyrk, one all-reduce of its r(r+1)/2 upper triangle,
//                        summed in double)
//   B = bA + cA²         (redundantly on every rank: 2r³ FLOPs; or, with split_poly, member
//                        j forms its block of rows [r·j/g, r·(j+1)/g) and one all-gather of
//                        the r² floats gives every member B: 2r³/g FLOPs instead of 2r³)
//   X_i ← aX_i + B X_i    (local sgemm)
// or, where the block is narrower than the matrix is tall (c_i < r: ns_split_product), the
// polynomial is never formed: X_i ← aX_i + b·(A X_i) + c·A(A X_i), two products of r² c_i
// each instead of B's 2r³ and one, so the member's work falls as 1/g with no extra bytes.
// and the Frobenius normalization before is a group sum too. In real arithmetic this is
// newton_schulz of the whole matrix; in float32 the partial Gram sums round differently
// (tests/mpi/split_ns_test.cc bounds the difference: max|err|/RMS <= 1e-5).
// Cost per rank: 2 r² c_i · 2 + 2 r³ FLOPs and about 8 r² bytes sent per iteration (ring
// all-reduce of r(r+1)/2 doubles: 2 · 8 · r(r+1)/2 · (g−1)/g); with split_poly, 2 r³ / g
// FLOPs and 4 r² (g−1)/g more bytes (the all-gather of B) per iteration.
#pragma once

#include <cstdint>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/config.h"

namespace celo2 {

// Whether a member whose block is c_local columns of an r-row matrix applies the polynomial as
// two products with A (X ← aX + b·AX + c·A(AX): 4 r² c_local FLOPs) rather than forming B
// (2 r³ + 2 r² c_local): product -1 (auto) where c_local < r, 1 always, 0 never; never for
// an empty block. With split_poly, B is formed (split) instead. The kernel and the cost
// model (split_ns_flops) both decide here.
inline bool ns_split_product(double r, double c_local, int product = -1) {
  if (c_local <= 0) return false;
  return product < 0 ? c_local < r : product > 0;
}

// FLOPs of one member's newton_schulz_split with a block of c_local columns (GEMMs counted as
// 2mnk, the Gram as a full product): what the planner's cost model (celo2/plan.h ns_time)
// charges. product: -1 by ns_split_product, 0 never, 1 always.
double split_ns_flops(const RuleConfig& cfg, double r, double c_local, int g, bool split_poly,
                      int product = -1);

// rows_block: x_local holds the transpose of the column block instead (c_local × r,
// row-major): the rows of a tall matrix, as the engine's blocks of tall matrices are laid
// out (celo2/plan.h NsBlock); A = X_iᵀX_i and X_i ← aX_i + X_iB then. product: how the
// polynomial is applied without split_poly: -1 by ns_split_product, 0 through B, 1 as two
// products with A (CELO2_NS_SPLIT_APPLY forces one, to compare them).
void newton_schulz_split(const RuleConfig& cfg, int64_t r, int64_t c_local, float* x_local, Communicator& group,
                         std::vector<float>& scratch, bool rows_block = false, bool split_poly = false,
                         int product = -1);

// Bytes each rank sends and collective calls (all-reduces, and with split_poly the
// all-gathers) of one newton_schulz_split on g ranks, as the communicators count them.
struct SplitNsCost {
  double bytes_per_rank = 0;
  int all_reduces = 0;
  int all_gathers = 0;
  int calls() const { return all_reduces + all_gathers; }
};
SplitNsCost split_ns_cost(const RuleConfig& cfg, int64_t r, int g, bool split_poly = false);

}  // namespace celo2
