#include "py_communicator.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <numeric>

namespace py = pybind11;

namespace celo2::python {
namespace {

// A NumPy view of engine memory: the capsule is a no-op owner, so NumPy never frees it.
template <class T>
py::array view(const T* data, int64_t n) {
  py::capsule no_owner(data, [](void*) {});
  return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))},
                        const_cast<T*>(data), no_owner);
}

py::list counts_list(const std::vector<int64_t>& c) {
  py::list l;
  for (int64_t x : c) l.append(x);
  return l;
}

int64_t sum(const std::vector<int64_t>& c) { return std::accumulate(c.begin(), c.end(), int64_t{0}); }

}  // namespace

PyCommunicator::PyCommunicator(py::object impl) : impl_(std::move(impl)) {
  for (const char* m : {"rank", "size", "all_reduce_sum", "reduce_scatter_sum", "all_gather",
                        "all_to_all_v", "broadcast", "barrier"})
    if (!py::hasattr(impl_, m))
      throw std::invalid_argument(std::string("communicator object has no method '") + m + "'");
  rank_ = impl_.attr("rank")().cast<int>();
  size_ = impl_.attr("size")().cast<int>();
  backend_ = py::hasattr(impl_, "backend") ? "python:" + impl_.attr("backend")().cast<std::string>()
                                           : std::string("python");
  if (size_ < 1 || rank_ < 0 || rank_ >= size_)
    throw std::invalid_argument("communicator object reports rank " + std::to_string(rank_) +
                                " of " + std::to_string(size_));
}

PyCommunicator::~PyCommunicator() {
  // The last reference may go away on a thread without the GIL (the engine's destructor).
  py::gil_scoped_acquire gil;
  impl_ = py::object();
}

template <class F>
void PyCommunicator::call(const char* op, F&& body) {
  py::gil_scoped_acquire gil;
  try {
    body();
  } catch (py::error_already_set& e) {
    // A celo2.CommError raised by the Python side (TorchCommunicator) already says which
    // collective, which rank, what happened and what to do: passed on as it is, without
    // pybind11's traceback.
    if (e.matches(py::module_::import("celo2._celo2").attr("CommError")))
      throw CommError(py::str(e.value()).cast<std::string>());
    throw CommError(std::string("communicator ") + backend_ + ": " + op + " failed: " + e.what());
  } catch (const py::cast_error& e) {
    throw CommError(std::string("communicator ") + backend_ + ": " + op + ": " + e.what());
  }
}

void PyCommunicator::all_reduce_sum(double* data, int64_t n) {
  count("all_reduce", n * static_cast<int64_t>(sizeof(double)));
  if (size_ == 1 || n == 0) return;
  call("all_reduce_sum", [&] { impl_.attr("all_reduce_sum")(view(data, n)); });
}

void PyCommunicator::all_reduce_sum(float* data, int64_t n) {
  count("all_reduce", n * static_cast<int64_t>(sizeof(float)));
  if (size_ == 1 || n == 0) return;
  call("all_reduce_sum", [&] { impl_.attr("all_reduce_sum")(view(data, n)); });
}

void PyCommunicator::reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) {
  if (static_cast<int>(counts.size()) != size_) throw CommError("reduce_scatter_sum: counts per rank != size");
  count("reduce_scatter", sum(counts) * static_cast<int64_t>(sizeof(float)));
  call("reduce_scatter_sum", [&] {
    impl_.attr("reduce_scatter_sum")(view(send, sum(counts)), view(recv, counts[rank_]), counts_list(counts));
  });
}

void PyCommunicator::all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) {
  if (static_cast<int>(counts.size()) != size_) throw CommError("all_gather: counts per rank != size");
  count("all_gather", counts[rank_] * static_cast<int64_t>(sizeof(float)));
  call("all_gather", [&] {
    impl_.attr("all_gather")(view(send, counts[rank_]), view(recv, sum(counts)), counts_list(counts));
  });
}

void PyCommunicator::all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                                  const std::vector<int64_t>& recv_counts) {
  if (static_cast<int>(send_counts.size()) != size_ || static_cast<int>(recv_counts.size()) != size_)
    throw CommError("all_to_all_v: counts per rank != size");
  count("all_to_all", sum(send_counts) * static_cast<int64_t>(sizeof(float)));
  call("all_to_all_v", [&] {
    impl_.attr("all_to_all_v")(view(send, sum(send_counts)), counts_list(send_counts), view(recv, sum(recv_counts)),
                               counts_list(recv_counts));
  });
}

std::unique_ptr<Communicator> PyCommunicator::split(int color, int key) {
  py::object sub;
  {
    py::gil_scoped_acquire gil;
    if (!py::hasattr(impl_, "split")) return Communicator::split(color, key);  // UnsupportedError
  }
  count("split", 0);
  call("split", [&] { sub = impl_.attr("split")(color, key); });
  py::gil_scoped_acquire gil;
  auto out = std::make_unique<PyCommunicator>(sub);
  sub = py::object();
  return out;
}

void PyCommunicator::broadcast(void* data, int64_t bytes, int root) {
  count("broadcast", rank_ == root ? bytes : 0);
  if (size_ == 1 || bytes == 0) return;
  call("broadcast", [&] { impl_.attr("broadcast")(view(static_cast<uint8_t*>(data), bytes), root); });
}

void PyCommunicator::barrier() {
  count("barrier", 0);
  if (size_ == 1) return;
  call("barrier", [&] { impl_.attr("barrier")(); });
}

}  // namespace celo2::python
