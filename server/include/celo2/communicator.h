// The collectives the sharded engine needs, behind one interface with one implementation
// per transport: single-process (local), Open MPI, and (with CUDA) NCCL. The backend is
// chosen in one place, make_communicator(). An operation a backend cannot do throws
// UnsupportedError("backend X does not support Y") rather than doing something else.
//
// Counts are in elements; every call is accounted (calls and bytes sent by this rank) so the
// engine and celo2-bench can report communication per phase.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace celo2 {

class UnsupportedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CommCounter {
  int64_t calls = 0;
  int64_t bytes = 0;  // bytes this rank sent (payload), by the algorithm-independent count
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  virtual void all_reduce_sum(double* data, int64_t n);
  virtual void all_reduce_sum(float* data, int64_t n);
  // recv (counts[rank()] elements) = sum over ranks of send[displ(rank) ...]; send holds
  // sum(counts) elements laid out rank after rank.
  virtual void reduce_scatter_sum(const float* send, float* recv,
                                  const std::vector<int64_t>& counts);
  // recv (sum(counts)) = concatenation of every rank's send (counts[r] elements).
  virtual void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts);
  virtual void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts,
                            float* recv, const std::vector<int64_t>& recv_counts);
  virtual void broadcast(void* data, int64_t bytes, int root);
  virtual void barrier();
  // Collective over this communicator: the ranks that pass the same `color` form a new
  // communicator, ranked by `key` (then by rank here). Groups of ranks for the split
  // Newton–Schulz (celo2/split_ns.h). Backends without it throw UnsupportedError.
  virtual std::unique_ptr<Communicator> split(int color, int key);
  // Whether one other thread may call this communicator's collectives while the thread that
  // made it calls none (MPI_THREAD_SERIALIZED): what the engine's overlap of the gradient
  // reduce-scatter with the trainer's backward pass needs (EngineOptions::overlap_grad_reduce).
  // Transports that cannot say no run the buckets at step() instead.
  virtual bool background_ok() const { return false; }

  // name -> counter ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", ...).
  const std::map<std::string, CommCounter>& counters() const { return counters_; }
  void reset_counters() { counters_.clear(); }

 protected:
  void count(const char* op, int64_t bytes) {
    CommCounter& c = counters_[op];
    c.calls += 1;
    c.bytes += bytes;
  }
  // One count per rank and none negative, or a CommError naming the transport and the
  // collective: what every transport checks before a collective that takes counts.
  void check_counts(const std::vector<int64_t>& counts, const char* op) const;
  [[noreturn]] void unsupported(const char* op) const {
    throw UnsupportedError("communicator backend '" + backend() + "' does not support " + op);
  }

 private:
  std::map<std::string, CommCounter> counters_;
};

// One process: every collective is a copy.
std::unique_ptr<Communicator> make_local_communicator();
// MPI_COMM_WORLD (initializes MPI if needed, finalizes at exit). Throws CommError if MPI
// support was not built.
std::unique_ptr<Communicator> make_mpi_communicator();
// For a process going down after an uncaught error in a job of two or more MPI ranks:
// MPI_Abort(MPI_COMM_WORLD, code), so that mpirun ends every rank now. Finalizing instead
// waits for the other ranks, which may be waiting in a collective for this one: both sides
// then sit until CELO2_COMM_TIMEOUT_S. Prints "celo2: rank R of N: <reason>; ending the MPI
// job (MPI_Abort) ..." first. Returns false, doing nothing, when MPI is not running (not
// initialized, finalized, or one rank); does not return otherwise.
bool abort_mpi_world(int code, const std::string& reason);
// NCCL over the launcher's ranks, one GPU per rank (celo2/nccl_communicator.h). Throws
// CommError if the project was built without CUDA and NCCL.
std::unique_ptr<Communicator> make_nccl_communicator();
// The one place a backend is chosen: "local", "mpi", "nccl" (CUDA builds), or "auto" (MPI when an
// MPI launcher — mpirun, srun; detect_launch() in celo2/launch.h — started more than one
// rank, else local).
std::unique_ptr<Communicator> make_communicator(const std::string& kind = "auto");

// Seconds a collective may take before the transport reports it (MPI: exits; NCCL, torch/gloo:
// CommError), naming the cause (a dead rank, or ranks alive in another collective):
// celo2::param::comm_timeout_s() (CELO2_COMM_TIMEOUT_S, default 600; 0 disables; a
// malformed value throws ParamError).
double comm_timeout_seconds();

// What every transport (MPI, NCCL, torch/gloo) says after naming a collective that timed
// out with its peers alive: the usual cause and its fix. One text; Python reads it as
// celo2._celo2.HANG_FIX.
inline constexpr const char* kHangFix =
    "Usual cause: a collective called on some ranks only, e.g. opt.state_dict() or opt.save() from rank 0 only "
    "(nanoGPT style): call opt.consolidate_state_dict(to=0) on every rank before saving from rank 0, or call "
    "state_dict() on every rank. If a rank is legitimately slower (a long evaluation or checkpoint write on one "
    "rank), raise CELO2_COMM_TIMEOUT_S.";

}  // namespace celo2
