// A Communicator whose collectives are Python callables: how the engine runs under torchrun
// (or any launcher without MPI), where the ranks already share a torch.distributed process
// group. celo2/distributed.py implements the callables over torch.distributed (gloo); this
// class only moves buffers across: each call wraps the engine's memory as NumPy arrays
// (no copy), takes the GIL, calls the Python method, and turns a Python exception into a
// CommError naming the operation (a celo2.CommError raised in Python keeps its message:
// TorchCommunicator's already names the collective, the rank, the cause and the fix). The
// engine calls these from the thread that called
// step(), which released the GIL first.
//
// The Python object provides: rank(), size(), backend() -> str and
//   all_reduce_sum(a)                        a: float32 or float64, in place
//   reduce_scatter_sum(send, recv, counts)   counts: list of ints, one per rank
//   all_gather(send, recv, counts)
//   all_to_all_v(send, send_counts, recv, recv_counts)
//   broadcast(a, root)                       a: uint8, in place
//   barrier()
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "celo2/communicator.h"

namespace celo2::python {

class PyCommunicator : public Communicator {
 public:
  explicit PyCommunicator(pybind11::object impl);
  ~PyCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return backend_; }

  void all_reduce_sum(double* data, int64_t n) override;
  void all_reduce_sum(float* data, int64_t n) override;
  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) override;
  void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) override;
  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override;
  // The Python object's split(color, key), when it has one (TorchCommunicator does).
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  template <class F>
  void call(const char* op, F&& body);
  pybind11::object impl_;
  int rank_ = 0, size_ = 1;
  std::string backend_;
};

// Adds detect_launch(), launcher_table() and param_table() to `m` (launch.cc; the same
// functions are the module celo2._launch, which celo2/distributed.py uses).
void register_launch(pybind11::module_& m);

}  // namespace celo2::python
