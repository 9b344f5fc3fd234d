// The NCCL backend of Communicator (built only with CUDA; make_communicator("nccl")).
//
// Bootstrap: ranks are read from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), Slurm
// (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) and Open MPI (OMPI_COMM_WORLD_RANK/SIZE/
// LOCAL_RANK) variables, in that order (detect_launch(), celo2/launch.h); the device
// is the local rank (modulo the visible devices). With more than one rank, rank 0 creates the
// ncclUniqueId and hands it to the others, by MPI_Bcast or by the TCP bootstrap
// (TcpBootstrap: rank 0 listens, the others connect), as choose_nccl_bootstrap() says
// (CELO2_NCCL_BOOTSTRAP=mpi|tcp|auto; auto: MPI under mpirun / srun --mpi=pmix, TCP under
// torchrun). MPI or the TCP store carry nothing else; NCCL carries every collective.
//
// Pointers: the Communicator calls accept device pointers (used in place) and host pointers
// (staged through a device buffer), so the CPU Engine runs unchanged over NCCL. Each call
// returns when its result is in place. For overlap, all_reduce_sum_async() enqueues on the
// communicator's own stream after the producer stream's work and returns an event; a bucket
// can be reduced while the next one is computed.
//
// A collective that does not finish within comm_timeout_seconds() aborts the NCCL
// communicator and throws CommError (a dead or hung rank is reported, not waited on forever).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "celo2/communicator.h"
#include "celo2/tcp_bootstrap.h"  // LaunchInfo, detect_launch()

struct CUstream_st;
struct CUevent_st;

namespace celo2 {

class NcclCommunicator : public Communicator {
 public:
  ~NcclCommunicator() override = default;
  virtual int device() const = 0;
  virtual CUstream_st* stream() const = 0;
  // Sum n floats at `dev` (device memory) over ranks, in place, after the work enqueued so
  // far on `producer`. Returns an event recorded on the communicator's stream when the
  // reduction is done (owned by the communicator, valid until the next async call with the
  // same slot: slots cycle over 8 events).
  virtual CUevent_st* all_reduce_sum_async(float* dev, int64_t n, CUstream_st* producer) = 0;

  // Pipelines (the GPU engine): collectives enqueued on the communicator's stream and not
  // waited for. Device pointers only; elements of float32 or bfloat16 (`bf16`). The caller
  // orders them against its own streams with events (cudaEventRecord on stream(), and
  // stream_wait()), issues them in the same order on every rank, and calls synchronize().
  virtual void group_start() = 0;
  virtual void group_end() = 0;
  // Sum over ranks into `recv` at `root` (recv is only written there; may be null elsewhere).
  virtual void reduce_async(const void* send, void* recv, int64_t n, bool bf16, int root) = 0;
  // `buf` at `root` copied to `buf` on every rank.
  virtual void broadcast_async(void* buf, int64_t n, bool bf16, int root) = 0;
  // Later work on the communicator's stream waits for `ev` (recorded on another stream).
  virtual void stream_wait(CUevent_st* ev) = 0;
  // Waits for everything enqueued on the communicator's stream; a collective stuck past
  // comm_timeout_seconds() (or an asynchronous NCCL error) aborts the communicator and throws
  // CommError.
  virtual void synchronize() = 0;
};

// The NCCL communicator of this process (see above). Throws CommError on failure.
std::unique_ptr<NcclCommunicator> make_nccl_communicator_ex();

}  // namespace celo2
