// The launcher and rank detector (celo2/launch.h): the only code that reads the launchers'
// variables.
#include "celo2/launch.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>

#include "celo2/params.h"

namespace celo2 {
namespace {

const char* env(const char* name) {
  const char* s = std::getenv(name);
  return (s && *s) ? s : nullptr;
}

std::string env_text(const char* name) {
  const char* s = env(name);
  return s ? s : "";
}

// A rank, a count or an index: a non-negative integer (at most 2^24).
bool read_int(const char* name, int* out) {
  const char* s = env(name);
  if (!s) return false;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < 0 || v > (1 << 24))
    throw CommError(std::string("environment variable ") + name + "='" + s +
                    "' is not a valid rank count or index");
  *out = static_cast<int>(v);
  return true;
}

const LauncherVars& slurm_vars() {
  for (const LauncherVars& l : launcher_table())
    if (std::string(l.launcher) == "slurm") return l;
  throw std::logic_error("launcher_table() has no slurm row");
}

}  // namespace

const std::vector<LauncherVars>& launcher_table() {
  static const std::vector<LauncherVars> t = {
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
  };
  return t;
}

const std::vector<MpiLauncherVars>& mpi_launcher_table() {
  static const std::vector<MpiLauncherVars> t = {
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
      {"pmix", "PMIX_RANK", "PMIX_SIZE"},
      {"pmi", "PMI_RANK", "PMI_SIZE"},
  };
  return t;
}

LaunchInfo detect_launch() {
  LaunchInfo r;
  for (const LauncherVars& s : launcher_table()) {
    int rank = 0, size = 0;
    const bool has_rank = read_int(s.rank, &rank);
    const bool has_size = read_int(s.size, &size);
    if (!has_rank && !has_size) continue;
    if (!has_rank || !has_size)
      throw CommError(std::string(s.launcher) + " environment incomplete: " + s.rank + " and " +
                      s.size + " must both be set");
    if (size < 1 || rank >= size)
      throw CommError(std::string(s.launcher) + " environment: rank " + std::to_string(rank) +
                      " is not below the world size " + std::to_string(size));
    r.launcher = s.launcher;
    r.rank = rank, r.size = size;
    r.rank_from = s.rank, r.size_from = s.size;
    if (read_int(s.local_rank, &r.local_rank))
      r.local_rank_from = s.local_rank;
    else
      r.local_rank = rank;
    if (read_int(s.local_size, &r.local_size))
      r.local_size_from = s.local_size;
    else
      r.local_size = -1;
    break;
  }

  for (const MpiLauncherVars& m : mpi_launcher_table()) {
    int rank = -1, size = -1;
    const bool has_rank = read_int(m.rank, &rank);
    const bool has_size = read_int(m.size, &size);
    if (!has_rank && !has_size) continue;
    r.mpi_launcher = m.launcher;
    r.mpi_rank = has_rank ? rank : -1;
    r.mpi_size = has_size ? size : -1;
    if (has_size) r.mpi_size_from = m.size;
    break;
  }
  const LauncherVars& slurm = slurm_vars();
  int tasks = -1, procid = -1;
  const bool has_tasks = read_int(slurm.size, &tasks);
  const bool has_procid = read_int(slurm.rank, &procid);
  if (!r.mpi_launcher.empty()) {
    if (r.mpi_size < 0 && has_tasks)
      r.mpi_size = tasks, r.mpi_size_from = slurm.size;  // srun --mpi=pmix
  } else if ((has_tasks || has_procid) && param::slurm_mpi()) {
    r.mpi_launcher = "srun";
    r.mpi_rank = has_procid ? procid : -1;
    r.mpi_size = has_tasks ? tasks : -1;
    if (has_tasks) r.mpi_size_from = slurm.size;
  }

  r.master_addr = env_text("MASTER_ADDR");
  r.master_port = env_text("MASTER_PORT");
  r.slurm_nodelist = env_text("SLURM_JOB_NODELIST");
  if (r.slurm_nodelist.empty()) r.slurm_nodelist = env_text("SLURM_NODELIST");
  return r;
}

std::string LaunchInfo::describe() const {
  auto from = [](const std::string& v) { return v.empty() ? std::string("default") : v; };
  std::ostringstream o;
  o << launcher << ": rank " << rank << " of " << size;
  if (launcher != "none") o << " (" << rank_from << ", " << size_from << ")";
  o << ", local rank " << local_rank << " (" << from(local_rank_from) << ") of ";
  if (local_size < 0)
    o << "unknown";
  else
    o << local_size << " (" << from(local_size_from) << ")";
  o << "; MPI launcher: " << (mpi_launcher.empty() ? "none" : mpi_launcher);
  if (!mpi_launcher.empty()) {
    o << " (rank " << (mpi_rank < 0 ? std::string("?") : std::to_string(mpi_rank)) << " of "
      << (mpi_size < 0 ? std::string("?") : std::to_string(mpi_size) + " from " + mpi_size_from)
      << ")";
  }
  if (!master_addr.empty() || !master_port.empty())
    o << "; MASTER_ADDR=" << master_addr << " MASTER_PORT=" << master_port;
  if (!slurm_nodelist.empty()) o << "; nodes " << slurm_nodelist;
  return o.str();
}

std::string launch_markdown_tables() {
  std::ostringstream o;
  o << "| launcher | rank | world size | local rank | local world size |\n|---|---|---|---|---|\n";
  for (const LauncherVars& l : launcher_table())
    o << "| " << l.launcher << " | `" << l.rank << "` | `" << l.size << "` | `" << l.local_rank
      << "` | `" << l.local_size << "` |\n";
  o << "\n| MPI launcher | rank | world size |\n|---|---|---|\n";
  for (const MpiLauncherVars& m : mpi_launcher_table())
    o << "| " << m.launcher << " | `" << m.rank << "` | `" << m.size << "` |\n";
  return o.str();
}

}  // namespace celo2
