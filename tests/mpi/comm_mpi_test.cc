// The Open MPI communicator's own collectives under mpirun -np 2..5, where they are ours and
// not a single MPI call: the ring reduce-scatter (server/src/comm/mpi_communicator.cc).
//  - the sum of each chunk in the documented order, ((x_{k+1} + x_{k+2}) + …) + x_k, bit for
//    bit, on random floats (every rank builds every rank's buffer from its seed);
//  - integer-valued data equal to MPI_Reduce_scatter's result exactly, for uneven counts,
//    empty chunks, a rank with nothing to receive, and chunks longer than the ring's window
//    (two windows and a part);
//  - the same bits on a second call (no state carried between calls).
// The same binary runs again with CELO2_MPI_REDUCE_SCATTER=mpi (the MPI_Reduce_scatter path),
// where only the integer and repeat checks apply.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "mpi_test_main.h"

namespace celo2 {
namespace {

std::shared_ptr<Communicator> g_comm;

bool ring_path() {
  const char* v = std::getenv("CELO2_MPI_REDUCE_SCATTER");
  return !v || !*v || std::string(v) == "ring";
}

// Rank k's send buffer: `total` values, random floats or small integers.
std::vector<float> send_of(int k, int64_t total, bool integers) {
  std::mt19937 rng(1234u + 77u * static_cast<unsigned>(k));
  std::vector<float> x(static_cast<size_t>(total));
  if (integers) {
    std::uniform_int_distribution<int> d(-1000, 1000);
    for (float& v : x) v = static_cast<float>(d(rng));
  } else {
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (float& v : x) v = d(rng) * std::exp2(static_cast<float>(d(rng) * 8.0f));
  }
  return x;
}

std::vector<int64_t> displs(const std::vector<int64_t>& counts) {
  std::vector<int64_t> d(counts.size(), 0);
  for (size_t k = 1; k < counts.size(); ++k) d[k] = d[k - 1] + counts[k - 1];
  return d;
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

// Count layouts every world size runs: even, uneven with empty chunks, this rank receiving
// nothing, and chunks over the ring's window of 2^20 floats.
std::vector<std::vector<int64_t>> layouts(int W) {
  std::vector<std::vector<int64_t>> out;
  out.push_back(std::vector<int64_t>(W, 1000));
  std::vector<int64_t> uneven(W);
  for (int k = 0; k < W; ++k) uneven[k] = k % 3 == 1 ? 0 : 37 * (k + 1) + 5;
  out.push_back(uneven);
  std::vector<int64_t> first_empty(W, 513);
  first_empty[0] = 0;
  out.push_back(first_empty);
  std::vector<int64_t> wide(W, 4096);
  wide[W - 1] = (int64_t{1} << 21) + 12345;  // two whole windows and a part
  wide[0] = (int64_t{1} << 20) - 1;
  out.push_back(wide);
  return out;
}

TEST(MpiCommunicator, RingReduceScatterSumsInTheDocumentedOrder) {
  if (!ring_path()) GTEST_SKIP() << "CELO2_MPI_REDUCE_SCATTER=mpi: the order is MPI's";
  const int W = g_comm->size(), r = g_comm->rank();
  for (const auto& counts : layouts(W)) {
    const int64_t total = sum(counts);
    const std::vector<int64_t> d = displs(counts);
    std::vector<std::vector<float>> all;
    for (int k = 0; k < W; ++k) all.push_back(send_of(k, total, false));
    std::vector<float> got(static_cast<size_t>(counts[r]), -1.0f);
    g_comm->reduce_scatter_sum(all[r].data(), got.data(), counts);
    int64_t mismatches = 0;
    for (int64_t i = 0; i < counts[r]; ++i) {
      float want = all[(r + 1) % W][d[r] + i];
      for (int s = 2; s <= W; ++s) want = want + all[(r + s) % W][d[r] + i];
      if (std::memcmp(&want, &got[i], sizeof(float)) != 0) ++mismatches;
    }
    EXPECT_EQ(mismatches, 0) << "rank " << r << " of " << W << ", " << counts[r] << " elements";
  }
}

TEST(MpiCommunicator, ReduceScatterEqualsMpiOnIntegers) {
  const int W = g_comm->size(), r = g_comm->rank();
  for (const auto& counts : layouts(W)) {
    const int64_t total = sum(counts);
    const std::vector<float> mine = send_of(r, total, true);
    std::vector<float> got(static_cast<size_t>(counts[r]) + 1, 0.5f), again(got), ref(got);
    g_comm->reduce_scatter_sum(mine.data(), got.data(), counts);
    g_comm->reduce_scatter_sum(mine.data(), again.data(), counts);
    std::vector<int> c(counts.begin(), counts.end());
    ASSERT_EQ(MPI_Reduce_scatter(mine.data(), ref.data(), c.data(), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD),
              MPI_SUCCESS);
    EXPECT_EQ(got, ref) << "rank " << r << " of " << W;
    EXPECT_EQ(got, again) << "a second call differs";
    EXPECT_EQ(got.back(), 0.5f) << "wrote past its chunk";
  }
}

TEST(MpiCommunicator, ReduceScatterRefusesWrongCounts) {
  std::vector<float> x(8), y(8);
  EXPECT_THROW(g_comm->reduce_scatter_sum(x.data(), y.data(), std::vector<int64_t>(g_comm->size() + 1, 1)),
               std::exception);
}

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) { return celo2::testing::run_mpi_tests(argc, argv, celo2::g_comm); }
