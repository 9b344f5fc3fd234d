// The one place a communicator backend is chosen (make_communicator, celo2/communicator.h).
// Its own file so that a program using only the local communicator (the single-process
// Optimizer) does not link the MPI and NCCL backends.
#include <stdexcept>

#include "celo2/communicator.h"
#include "celo2/launch.h"

namespace celo2 {

#if !defined(CELO2_WITH_NCCL)
std::unique_ptr<Communicator> make_nccl_communicator() {
  throw CommError("the NCCL communicator was not built (configure with a CUDA toolkit and NCCL: "
                  "-DCELO2_CUDA=ON)");
}
#endif

std::unique_ptr<Communicator> make_communicator(const std::string& kind) {
  if (kind == "local") return make_local_communicator();
  if (kind == "mpi") return make_mpi_communicator();
  if (kind == "nccl") return make_nccl_communicator();
  // auto: MPI when an MPI launcher (mpirun, srun) started more than one rank.
  if (kind == "auto") return detect_launch().mpi_size > 1 ? make_mpi_communicator() : make_local_communicator();
  throw std::invalid_argument("unknown communicator '" + kind + "' (expected auto, local, mpi or nccl)");
}

}  // namespace celo2
