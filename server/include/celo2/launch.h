// Which launcher started this process and where the process sits in the job: the one
// launcher and rank detector of celo2. make_communicator("auto"), the NCCL communicator, the
// TCP bootstrap (celo2/tcp_bootstrap.h) and the Python package (celo2.distributed, through
// celo2._launch) all call detect_launch(); nothing else reads a launcher's variables.
//
// Ranks: the first launcher of launcher_table() whose rank or size variable is set:
//   torchrun  RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE
//   slurm     SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE
//   openmpi   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
// else "none" (rank 0 of 1). Rank and size must both be set; a missing local rank is the
// rank, a missing local world size is unknown (-1).
//
// MPI: whether an MPI launcher started the process, from mpi_launcher_table() (Open MPI's
// OMPI_COMM_WORLD_*, PMIx's PMIX_RANK/PMIX_SIZE, PMI's PMI_RANK/PMI_SIZE; an unknown size
// is SLURM_NTASKS under srun --mpi=pmix), else "srun" when Slurm's variables alone are
// present and CELO2_SLURM_MPI is not 0 (srun may start MPI ranks through PMI without
// variables of its own; set CELO2_SLURM_MPI=0 for srun + torchrun).
//
// A variable that is set but malformed (not a non-negative integer), an incomplete pair or a
// rank not below the size throws CommError naming the variable.
#pragma once

#include <string>
#include <vector>

#include "celo2/communicator.h"  // CommError

namespace celo2 {

// One launcher's variables, in detection order.
struct LauncherVars {
  const char* launcher;    // "torchrun", "slurm", "openmpi"
  const char* rank;        // global rank
  const char* size;        // world size
  const char* local_rank;  // rank on this node
  const char* local_size;  // ranks on this node
};
const std::vector<LauncherVars>& launcher_table();

// One MPI launcher's variables, in detection order.
struct MpiLauncherVars {
  const char* launcher;  // "openmpi", "pmix", "pmi"
  const char* rank;
  const char* size;
};
const std::vector<MpiLauncherVars>& mpi_launcher_table();

struct LaunchInfo {
  std::string launcher = "none";  // torchrun, slurm, openmpi or none
  int rank = 0, size = 1, local_rank = 0;
  int local_size = 1;  // -1: the launcher does not say
  // The variable each value came from; "" when it is a default.
  std::string rank_from, size_from, local_rank_from, local_size_from;

  // The MPI launcher: "openmpi", "pmix", "pmi" (its variables are present), "srun" (only
  // Slurm's, CELO2_SLURM_MPI not 0) or "" (none). mpi_rank/mpi_size: -1 when unknown.
  std::string mpi_launcher;
  int mpi_rank = -1, mpi_size = -1;
  std::string mpi_size_from;

  // Rendezvous hints, verbatim ("" when unset): torchrun's MASTER_ADDR and MASTER_PORT,
  // Slurm's SLURM_JOB_NODELIST (else SLURM_NODELIST).
  std::string master_addr, master_port, slurm_nodelist;

  // An MPI launcher's own variables are present (mpirun, srun --mpi=pmix / pmi2).
  bool mpi_variables() const {
    return mpi_launcher == "openmpi" || mpi_launcher == "pmix" || mpi_launcher == "pmi";
  }
  // "torchrun: rank 1 of 4 (RANK, WORLD_SIZE), local rank 1 of 2 (LOCAL_RANK, LOCAL_WORLD_SIZE);
  // MPI: none"
  std::string describe() const;
};

// Reads the launchers' variables now (every call; they are not cached).
LaunchInfo detect_launch();

// The tables of docs/OPERATIONS.md ("How ranks find each other"):
// | launcher | rank | world size | local rank | local world size |, then the MPI launchers.
std::string launch_markdown_tables();

}  // namespace celo2
