// The base Communicator (defaults throw "not supported"), the local backend, and the
// backend choice.
#include "celo2/communicator.h"

#include <cstdlib>
#include <cstring>
#include <numeric>

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
};

bool launched_with_many_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "PMIX_SIZE"}) {
    const char* s = std::getenv(v);
    if (s && std::atoi(s) > 1) return true;
  }
  return false;
}

}  // namespace

#if !defined(CELO2_WITH_NCCL)
std::unique_ptr<Communicator> make_nccl_communicator() {
  throw CommError("the NCCL communicator was not built (configure with a CUDA toolkit and NCCL: "
                  "-DCELO2_CUDA=ON)");
}
#endif

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

std::unique_ptr<Communicator> make_communicator(const std::string& kind) {
  if (kind == "local") return make_local_communicator();
  if (kind == "mpi") return make_mpi_communicator();
  if (kind == "nccl") return make_nccl_communicator();
  if (kind == "auto") return launched_with_many_ranks() ? make_mpi_communicator() : make_local_communicator();
  throw std::invalid_argument("unknown communicator '" + kind + "' (expected auto, local, mpi or nccl)");
}

double comm_timeout_seconds() {
  const char* s = std::getenv("CELO2_COMM_TIMEOUT_S");
  if (!s || !*s) return 600.0;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (end == s || v < 0) return 600.0;
  return v;
}

}  // namespace celo2
