// The base Communicator (defaults throw "not supported"), the local backend, and the
// backend choice.
#include "celo2/communicator.h"

#include <cstring>
#include <numeric>

#include "celo2/params.h"

namespace celo2 {

void Communicator::all_reduce_sum(double*, int64_t) { unsupported("all_reduce_sum(double)"); }
void Communicator::all_reduce_sum(float*, int64_t) { unsupported("all_reduce_sum(float)"); }
void Communicator::reduce_scatter_sum(const float*, float*, const std::vector<int64_t>&) {
  unsupported("reduce_scatter_sum");
}
void Communicator::all_gather(const float*, float*, const std::vector<int64_t>&) {
  unsupported("all_gather");
}
void Communicator::all_to_all_v(const float*, const std::vector<int64_t>&, float*,
                                const std::vector<int64_t>&) {
  unsupported("all_to_all_v");
}
void Communicator::broadcast(void*, int64_t, int) { unsupported("broadcast"); }
void Communicator::barrier() { unsupported("barrier"); }

void Communicator::check_counts(const std::vector<int64_t>& counts, const char* op) const {
  if (static_cast<int>(counts.size()) != size())
    throw CommError(backend() + " " + op + ": " + std::to_string(counts.size()) + " counts for " +
                    std::to_string(size()) + " ranks");
  for (int64_t c : counts)
    if (c < 0) throw CommError(backend() + " " + op + ": negative count");
}
std::unique_ptr<Communicator> Communicator::split(int, int) { unsupported("split"); }

namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }
  void all_reduce_sum(double*, int64_t) override {}
  void all_reduce_sum(float*, int64_t) override {}
  void reduce_scatter_sum(const float* send, float* recv,
                          const std::vector<int64_t>& counts) override {
    if (send != recv) std::memmove(recv, send, counts.at(0) * sizeof(float));
  }
  void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    if (send != recv) std::memmove(recv, send, counts.at(0) * sizeof(float));
  }
  void all_to_all_v(const float* send, const std::vector<int64_t>& sc, float* recv,
                    const std::vector<int64_t>&) override {
    if (send != recv) std::memmove(recv, send, sc.at(0) * sizeof(float));
  }
  void broadcast(void*, int64_t, int) override {}
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<LocalCommunicator>(); }
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

double comm_timeout_seconds() { return param::comm_timeout_s(); }

}  // namespace celo2
