// How the ranks of a job find each other without MPI: the rendezvous endpoint (from the
// launch that celo2/launch.h detects), and a small TCP store that lets rank 0 hand an opaque
// byte blob (the 128-byte ncclUniqueId) to every other rank. CUDA-independent, compiled in every build;
// the NCCL communicator (celo2/nccl_communicator.h) uses it under torchrun, where there is
// no MPI to MPI_Bcast the id.
//
// Protocol (TCP, integers in network byte order), version 1:
//   peer -> rank 0   hello   magic 'C2BS' u32, version u16, reserved u16, rank u32, world u32
//   rank 0 -> peer   header  magic u32, version u16, status u16 (0 ok, 1 error), length u32;
//                    then `length` bytes: the blob (ok) or rank 0's error text (error)
//   peer -> rank 0   ack     magic u32, rank u32 (after an ok blob)
// Rank 0 answers only when world-1 valid hellos have arrived; a bad hello (wrong magic or
// version, wrong world size, a rank out of range or seen twice) fails the bootstrap on rank
// 0 and is reported to the peers already connected. Each step has a deadline
// (timeout_s; default comm_timeout_seconds(), i.e. CELO2_COMM_TIMEOUT_S) and a timeout
// names what was waited for.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/launch.h"  // LaunchInfo, detect_launch()

namespace celo2 {

// Default TCP bootstrap port when neither CELO2_BOOTSTRAP_PORT nor MASTER_PORT is set.
constexpr int kDefaultBootstrapPort = 29510;

// Where rank 0 of the TCP bootstrap listens and where the other ranks connect.
struct BootstrapEndpoint {
  std::string host;       // what peers connect to
  int port = kDefaultBootstrapPort;
  std::string bind_host;  // what rank 0 binds ("" = every address, INADDR_ANY)
  std::string source;     // which variables gave host and port, for messages
};
// From the launch (detect_launch()) and the tunables (celo2/params.h). host:
// CELO2_BOOTSTRAP_ADDR, else by launcher: torchrun MASTER_ADDR; Slurm the first host of
// SLURM_JOB_NODELIST (a plain list or one bracket range, e.g. "gpu[003-010]" -> gpu003), else
// MASTER_ADDR; Open MPI MASTER_ADDR, else 127.0.0.1 when every rank is on this node
// (OMPI_COMM_WORLD_LOCAL_SIZE == OMPI_COMM_WORLD_SIZE). port: CELO2_BOOTSTRAP_PORT, else
// MASTER_PORT+1 (torch's own store has MASTER_PORT), else kDefaultBootstrapPort. bind_host:
// CELO2_BOOTSTRAP_BIND. Throws CommError naming the variable to set when no host is known.
BootstrapEndpoint discover_bootstrap_endpoint(const LaunchInfo& launch);

// How the NCCL id travels: CELO2_NCCL_BOOTSTRAP = mpi | tcp | auto (default). auto: "mpi"
// when MPI is already initialized or an MPI launcher's variables are present
// (launch.mpi_variables(): mpirun, srun --mpi=pmix) with as many ranks as the launch has
// (launch.mpi_size; unknown counts as equal), else "tcp" (torchrun, plain srun,
// srun --mpi=pmix torchrun ...). Throws ParamError on another value.
std::string choose_nccl_bootstrap(const LaunchInfo& launch, bool mpi_initialized);

class TcpBootstrap {
 public:
  // Rank 0 binds and listens here (port 0 picks a free port: see port()); other ranks only
  // remember the endpoint. timeout_s < 0: comm_timeout_seconds(); 0: no deadline.
  TcpBootstrap(int rank, int world_size, BootstrapEndpoint endpoint, double timeout_s = -1);
  ~TcpBootstrap();
  TcpBootstrap(const TcpBootstrap&) = delete;
  TcpBootstrap& operator=(const TcpBootstrap&) = delete;

  int port() const { return endpoint_.port; }  // on rank 0 the port actually bound
  double timeout_s() const { return timeout_s_; }

  // Rank 0: sends `blob` to every other rank and returns it once all have acknowledged.
  // Others: return the blob from rank 0 (`blob` is ignored); with expected_size >= 0 a blob
  // of another length is an error. Call once. Throws CommError; the listening socket and
  // every connection are closed when it returns or throws.
  std::vector<uint8_t> broadcast(const std::vector<uint8_t>& blob, int64_t expected_size = -1);

 private:
  std::vector<uint8_t> serve(const std::vector<uint8_t>& blob);
  std::vector<uint8_t> fetch(int64_t expected_size);

  int rank_, world_;
  BootstrapEndpoint endpoint_;
  double timeout_s_;
  int listen_fd_ = -1;
  bool used_ = false;
};

}  // namespace celo2
