// Private to server/src/comm: the one owner of MPI's initialization in this process, for the
// MPI communicator and for the NCCL communicator's bootstrap (which only carries the NCCL id
// over MPI). Initializes MPI (MPI_THREAD_SERIALIZED) unless the trainer or mpi4py already did,
// sets MPI_COMM_WORLD to return errors (the communicators turn them into CommError), and
// finalizes at exit only what it initialized. Throws CommError if MPI_Init_thread fails.
#pragma once

namespace celo2::detail {

void ensure_mpi();

}  // namespace celo2::detail
