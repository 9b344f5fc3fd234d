// Host emulation (tests/gpu_host): the NCCL communicator's interface over an ordinary
// Communicator (MPI under mpirun, or local). Collectives run at once on host memory, in the
// order they are issued — the order NCCL requires to be the same on every rank, which the
// test therefore checks by running under several ranks.
#pragma once

#include <cstring>
#include <memory>
#include <vector>

#include "celo2/nccl_communicator.h"

namespace celo2::test {

class HostNccl final : public NcclCommunicator {
 public:
  explicit HostNccl(std::shared_ptr<Communicator> base) : base_(std::move(base)) {}
  int rank() const override { return base_->rank(); }
  int size() const override { return base_->size(); }
  std::string backend() const override { return "host-nccl(" + base_->backend() + ")"; }
  int device() const override { return 0; }
  CUstream_st* stream() const override { return reinterpret_cast<CUstream_st*>(stream_token_.get()); }
  void all_reduce_sum(double* d, int64_t n) override { base_->all_reduce_sum(d, n); }
  void all_reduce_sum(float* d, int64_t n) override { base_->all_reduce_sum(d, n); }
  void broadcast(void* d, int64_t bytes, int root) override { base_->broadcast(d, bytes, root); }
  void barrier() override { base_->barrier(); }
  CUevent_st* all_reduce_sum_async(float*, int64_t, CUstream_st*) override {
    throw UnsupportedError("host emulation: all_reduce_sum_async");
  }
  void group_start() override { ++groups_; }
  void group_end() override { --groups_; }
  void reduce_async(const void* send, void* recv, int64_t n, bool bf16, int root) override {
    count("reduce", n * (bf16 ? 2 : 4));
    std::vector<int64_t> counts(size(), 0);
    counts[root] = n;
    std::vector<float> in(n), out(rank() == root ? n : 0);
    if (bf16) {
      const uint16_t* s = static_cast<const uint16_t*>(send);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
        std::memcpy(&in[i], &u, 4);
      }
    } else {
      std::memcpy(in.data(), send, n * 4);
    }
    base_->reduce_scatter_sum(in.data(), out.data(), counts);
    if (rank() != root) return;
    if (bf16) {
      uint16_t* r = static_cast<uint16_t*>(recv);
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, &out[i], 4);
        u += 0x7fffu + ((u >> 16) & 1u);
        r[i] = static_cast<uint16_t>(u >> 16);
      }
    } else {
      std::memcpy(recv, out.data(), n * 4);
    }
  }
  void broadcast_async(void* buf, int64_t n, bool bf16, int root) override {
    count("broadcast", rank() == root ? n * (bf16 ? 2 : 4) : 0);
    base_->broadcast(buf, n * (bf16 ? 2 : 4), root);
  }
  void stream_wait(CUevent_st* ev) override {
    if (!ev) throw CommError("host emulation: stream_wait on a null event");
  }
  void synchronize() override {
    if (groups_ != 0) throw CommError("host emulation: synchronize() inside an open group");
  }
  int open_groups() const { return groups_; }

 private:
  std::shared_ptr<Communicator> base_;
  std::unique_ptr<char> stream_token_ = std::make_unique<char>(0);
  int groups_ = 0;
};

}  // namespace celo2::test
