// The Open MPI backend. Every MPI call is checked (file and line in the error); errors
// return instead of aborting (MPI_ERRORS_RETURN) so they surface as CommError. A watchdog
// thread turns a collective that never completes (peers in another collective, or hung) into
// a clear message naming the usual cause, and a non-zero exit within comm_timeout_seconds(),
// instead of a silent hang. (A dead peer: mpirun itself ends the job.)
// The C API only: the deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/params.h"
#include "mpi_runtime.h"

#define CELO2_MPI_CHECK(call)                                                          \
  do {                                                                                 \
    const int celo2_rc_ = (call);                                                      \
    if (celo2_rc_ != MPI_SUCCESS) {                                                    \
      char msg_[MPI_MAX_ERROR_STRING];                                                 \
      int len_ = 0;                                                                    \
      MPI_Error_string(celo2_rc_, msg_, &len_);                                        \
      throw ::celo2::CommError(std::string("MPI error in ") + #call + " at " __FILE__ \
                               ":" + std::to_string(__LINE__) + ": " +                 \
                               std::string(msg_, len_));                               \
    }                                                                                  \
  } while (0)

namespace celo2 {

namespace detail {
namespace {
struct MpiRuntime {
  bool owned = false;
  MpiRuntime() {
    int init = 0;
    CELO2_MPI_CHECK(MPI_Initialized(&init));
    if (!init) {
      int provided = 0;
      // SERIALIZED: the engine's gradient buckets may be reduced on its communication
      // thread while the trainer's thread makes no MPI call (Communicator::background_ok).
      CELO2_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
      owned = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiRuntime() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned && !fin) MPI_Finalize();
  }
};
}  // namespace

void ensure_mpi() { static MpiRuntime rt; }
}  // namespace detail

namespace {

int to_int(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX)
    throw CommError(std::string("MPI backend: ") + what + " count " + std::to_string(n) +
                    " exceeds INT_MAX elements");
  return static_cast<int>(n);
}

std::vector<int> ints(const std::vector<int64_t>& v, const char* what) {
  std::vector<int> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_int(v[i], what);
  return out;
}

std::vector<int> displs_of(const std::vector<int>& counts) {
  std::vector<int> d(counts.size(), 0);
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    d[i] = to_int(acc, "displacement");
    acc += counts[i];
  }
  return d;
}

// MPI is initialized once per process and finalized at exit if we initialized it.
class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() : MpiCommunicator((detail::ensure_mpi(), MPI_COMM_WORLD), false) {}
  // `owned`: a communicator of our own (split), freed with this object.
  MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    timeout_ = comm_timeout_seconds();  // a malformed CELO2_COMM_TIMEOUT_S is refused before MPI starts
    detail::ensure_mpi();
    CELO2_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    CELO2_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    if (timeout_ > 0) watchdog_ = std::thread([this] { watch(); });
  }
  ~MpiCommunicator() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin && p2p_ != MPI_COMM_NULL) MPI_Comm_free(&p2p_);
    if (owned_ && !fin) MPI_Comm_free(&comm_);
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    Guard g(this, "split");
    MPI_Comm sub = MPI_COMM_NULL;
    CELO2_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    CELO2_MPI_CHECK(MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN));
    return std::make_unique<MpiCommunicator>(sub, true);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  bool background_ok() const override {
    int level = MPI_THREAD_SINGLE;
    return MPI_Query_thread(&level) == MPI_SUCCESS && level >= MPI_THREAD_SERIALIZED;
  }

  void all_reduce_sum(double* data, int64_t n) override {
    Guard g(this, "all_reduce");
    CELO2_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data, to_int(n, "all_reduce"), MPI_DOUBLE,
                                  MPI_SUM, comm_));
    count("all_reduce", ring_all_reduce_bytes(n * 8));
  }
  void all_reduce_sum(float* data, int64_t n) override {
    Guard g(this, "all_reduce");
    CELO2_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data, to_int(n, "all_reduce"), MPI_FLOAT,
                                  MPI_SUM, comm_));
    count("all_reduce", ring_all_reduce_bytes(n * 4));
  }
  void reduce_scatter_sum(const float* send, float* recv,
                          const std::vector<int64_t>& counts) override {
    Guard g(this, "reduce_scatter");
    const std::vector<int> c = rank_counts(counts, "reduce_scatter");
    if (ring_reduce_scatter() && size_ > 1)
      ring_reduce_scatter(send, recv, counts);
    else
      CELO2_MPI_CHECK(MPI_Reduce_scatter(send, recv, c.data(), MPI_FLOAT, MPI_SUM, comm_));
    count("reduce_scatter", ring_bytes(total(counts) * 4));
  }
  void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    Guard g(this, "all_gather");
    const std::vector<int> c = rank_counts(counts, "all_gather");
    const std::vector<int> d = displs_of(c);
    CELO2_MPI_CHECK(MPI_Allgatherv(send, c[rank_], MPI_FLOAT, recv, c.data(), d.data(),
                                   MPI_FLOAT, comm_));
    count("all_gather", ring_bytes(total(counts) * 4));
  }
  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) override {
    Guard g(this, "all_to_all");
    const std::vector<int> sc = rank_counts(send_counts, "all_to_all"), rc = rank_counts(recv_counts, "all_to_all");
    const std::vector<int> sd = displs_of(sc), rd = displs_of(rc);
    CELO2_MPI_CHECK(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_FLOAT, recv, rc.data(),
                                  rd.data(), MPI_FLOAT, comm_));
    count("all_to_all", (total(send_counts) - send_counts[rank_]) * 4);
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    Guard g(this, "broadcast");
    CELO2_MPI_CHECK(MPI_Bcast(data, to_int(bytes, "broadcast"), MPI_BYTE, root, comm_));
    count("broadcast", rank_ == root ? bytes : 0);
  }
  void barrier() override {
    Guard g(this, "barrier");
    CELO2_MPI_CHECK(MPI_Barrier(comm_));
    count("barrier", 0);
  }

 private:
  // One count per rank (check_counts), each within int (MPI's counts).
  std::vector<int> rank_counts(const std::vector<int64_t>& counts, const char* op) const {
    check_counts(counts, op);
    return ints(counts, op);
  }
  static int64_t total(const std::vector<int64_t>& v) {
    int64_t s = 0;
    for (int64_t x : v) s += x;
    return s;
  }
  // Bytes each rank sends in a ring reduce-scatter or all-gather of `bytes` in all, and in a
  // ring all-reduce (one of each): the usual algorithm-level volume.
  int64_t ring_bytes(int64_t bytes) const { return bytes * (size_ - 1) / size_; }
  int64_t ring_all_reduce_bytes(int64_t bytes) const { return 2 * ring_bytes(bytes); }

  // Marks a collective in flight for the watchdog.
  struct Guard {
    MpiCommunicator* c;
    Guard(MpiCommunicator* comm, const char* op) : c(comm) {
      c->op_.store(op);
      c->since_.store(now_s());
    }
    ~Guard() { c->since_.store(0.0); }
  };
  static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void watch() {
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
      cv_.wait_for(lk, std::chrono::milliseconds(500));
      const double since = since_.load();
      if (since > 0 && now_s() - since > timeout_) {
        // Under mpirun a rank that dies ends the whole job (Open MPI kills the others), so
        // a collective still waiting here has peers that are alive but elsewhere, or hung.
        std::fprintf(stderr,
                     "celo2: rank %d of %d: %s did not complete within %g s "
                     "(CELO2_COMM_TIMEOUT_S): the other ranks did not join it. Under mpirun "
                     "they are alive (Open MPI ends the job when a rank dies) but in a "
                     "different collective or none, or hung. %s Exiting.\n",
                     rank_, size_, op_.load(), timeout_, kHangFix);
        std::fflush(stderr);
        std::_Exit(75);
      }
    }
  }

  // The reduce-scatter as a ring of MPI_Sendrecv (the algorithm NCCL and Horovod use for
  // large buffers): rank r passes the partial sum of chunk (r − 1 − s) to rank r + 1 at step
  // s and adds its own part to the one it receives from r − 1, so after W − 1 steps it holds
  // the sum of its own chunk. Each rank sends Σ counts − counts[r] floats, the volume
  // ring_bytes counts. In windows of kRingWindow floats of every chunk, so the scratch is two
  // windows whatever the gradient size. The sum of chunk k is ((g_{k+1} + g_{k+2}) + …) + g_k
  // (ranks mod W): one fixed order, the same bits on every run.
  static bool ring_reduce_scatter() { return param::mpi_reduce_scatter() == "ring"; }
  static constexpr int64_t kRingWindow = int64_t{1} << 20;
  void ring_reduce_scatter(const float* send, float* recv, const std::vector<int64_t>& counts) {
    const int W = size_, r = rank_;
    if (p2p_ == MPI_COMM_NULL) {  // our own context: no tag can meet the trainer's messages
      CELO2_MPI_CHECK(MPI_Comm_dup(comm_, &p2p_));
      CELO2_MPI_CHECK(MPI_Comm_set_errhandler(p2p_, MPI_ERRORS_RETURN));
    }
    std::vector<int64_t> displ(W, 0);
    int64_t maxc = 0;
    for (int k = 0; k < W; ++k) {
      if (k) displ[k] = displ[k - 1] + counts[k - 1];
      maxc = std::max(maxc, counts[k]);
    }
    const int64_t win = std::min(maxc, kRingWindow);
    if (static_cast<int64_t>(ring_tmp_.size()) < win) {
      ring_tmp_.resize(win);
      ring_acc_.resize(win);
    }
    float* tmp = ring_tmp_.data();
    float* acc = ring_acc_.data();
    const int right = (r + 1) % W, left = (r + W - 1) % W;
    auto part = [&](int k, int64_t o) { return static_cast<int>(std::clamp<int64_t>(counts[k] - o, 0, win)); };
    for (int64_t o = 0; o < maxc; o += win) {
      for (int s = 0; s + 1 < W; ++s) {
        const int cs = ((r - 1 - s) % W + W) % W, cr = ((r - 2 - s) % W + W) % W;
        const int ns = part(cs, o), nr = part(cr, o);
        const float* sbuf = s == 0 ? send + displ[cs] + o : acc;
        CELO2_MPI_CHECK(MPI_Sendrecv(sbuf, ns, MPI_FLOAT, right, 0, tmp, nr, MPI_FLOAT, left, 0, p2p_,
                                     MPI_STATUS_IGNORE));
        float* __restrict out = s + 2 == W ? recv + o : acc;  // the last step receives chunk r
        const float* __restrict own = send + displ[cr] + o;
        const float* __restrict in = tmp;
#pragma omp simd
        for (int i = 0; i < nr; ++i) out[i] = in[i] + own[i];
      }
    }
  }

  MPI_Comm comm_ = MPI_COMM_WORLD;
  MPI_Comm p2p_ = MPI_COMM_NULL;
  std::vector<float> ring_tmp_, ring_acc_;
  bool owned_ = false;
  int rank_ = 0, size_ = 1;
  double timeout_ = 0;
  std::atomic<double> since_{0.0};
  std::atomic<const char*> op_{""};
  std::thread watchdog_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

bool abort_mpi_world(int code, const std::string& reason) {
  int init = 0, fin = 0, size = 1, rank = 0;
  if (MPI_Initialized(&init) != MPI_SUCCESS || !init) return false;
  if (MPI_Finalized(&fin) != MPI_SUCCESS || fin) return false;
  if (MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS || size < 2) return false;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fflush(stdout);
  std::fprintf(stderr,
               "celo2: rank %d of %d: %s; ending the MPI job (MPI_Abort) so that the other ranks "
               "stop now instead of waiting for this one in a collective.\n",
               rank, size, reason.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; if an implementation did, still go down
}

}  // namespace celo2
