// The NCCL communicator (celo2/nccl_communicator.h). Compiled only when CUDA and NCCL were
// found (server/CMakeLists.txt); communicator.cc registers it as make_communicator("nccl").
#include "celo2/nccl_communicator.h"

#include <cuda_runtime.h>
// The C API of MPI only (no C++ bindings, which would need libmpi_cxx).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "celo2/cuda/check.h"
#include "celo2/tcp_bootstrap.h"
#include "mpi_runtime.h"

#define CELO2_NCCL_CHECK(call)                                                          \
  do {                                                                                  \
    const ncclResult_t celo2_nr_ = (call);                                              \
    if (celo2_nr_ != ncclSuccess)                                                       \
      throw ::celo2::CommError(std::string(#call) + " failed: " +                       \
                               ncclGetErrorString(celo2_nr_) + " (" + __FILE__ + ":" +  \
                               std::to_string(__LINE__) + ")");                         \
  } while (0)

#define CELO2_MPI_BOOT_CHECK(call)                                                      \
  do {                                                                                  \
    const int celo2_rc_ = (call);                                                       \
    if (celo2_rc_ != MPI_SUCCESS)                                                       \
      throw ::celo2::CommError(std::string(#call) + " failed with MPI error " +         \
                               std::to_string(celo2_rc_) + " (" + __FILE__ + ":" +      \
                               std::to_string(__LINE__) + ")");                         \
  } while (0)

namespace celo2 {
namespace {

int64_t total_of(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

class Nccl final : public NcclCommunicator {
 public:
  explicit Nccl(const LaunchInfo& ri) : info_(ri) {
    int devices = 0;
    CELO2_CUDA_CHECK(cudaGetDeviceCount(&devices));
    if (devices == 0) throw CommError("NCCL communicator: no CUDA device");
    device_ = ri.local_rank % devices;
    CELO2_CUDA_CHECK(cudaSetDevice(device_));
    ncclUniqueId id;
    if (ri.size == 1) {
      CELO2_NCCL_CHECK(ncclGetUniqueId(&id));
    } else {
      int mpi_init = 0;
      CELO2_MPI_BOOT_CHECK(MPI_Initialized(&mpi_init));
      bootstrap_ = choose_nccl_bootstrap(ri, mpi_init != 0);
      if (bootstrap_ == "mpi") {
        detail::ensure_mpi();  // MPI only carries the NCCL id (mpi_runtime.h)
        int mpi_rank = -1, mpi_size = -1;
        CELO2_MPI_BOOT_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank));
        CELO2_MPI_BOOT_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &mpi_size));
        if (mpi_rank != ri.rank || mpi_size != ri.size)
          throw CommError("NCCL bootstrap: " + ri.launcher + " says rank " + std::to_string(ri.rank) +
                          " of " + std::to_string(ri.size) + " but MPI says " +
                          std::to_string(mpi_rank) + " of " + std::to_string(mpi_size) +
                          " (set CELO2_NCCL_BOOTSTRAP=tcp when MPI does not start these ranks)");
        if (ri.rank == 0) CELO2_NCCL_CHECK(ncclGetUniqueId(&id));
        CELO2_MPI_BOOT_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD));
      } else {
        // TCP store (torchrun, plain srun): rank 0 listens, the others connect.
        TcpBootstrap boot(ri.rank, ri.size, discover_bootstrap_endpoint(ri));
        std::vector<uint8_t> blob;
        if (ri.rank == 0) {
          CELO2_NCCL_CHECK(ncclGetUniqueId(&id));
          const uint8_t* p = reinterpret_cast<const uint8_t*>(&id);
          blob.assign(p, p + sizeof id);
        }
        blob = boot.broadcast(blob, static_cast<int64_t>(sizeof id));
        std::memcpy(&id, blob.data(), sizeof id);
      }
    }
    CELO2_NCCL_CHECK(ncclCommInitRank(&comm_, ri.size, id, ri.rank));
    CELO2_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (cudaEvent_t& e : ready_) CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    for (cudaEvent_t& e : done_) CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    timeout_ = comm_timeout_seconds();
  }
  // A communicator of ranks of `parent` (Communicator::split): ncclCommSplit's result, on
  // the parent's device, with the parent's timeout and a stream of its own.
  Nccl(const Nccl& parent, ncclComm_t sub) : info_(parent.info_), bootstrap_("split"), device_(parent.device_), comm_(sub) {
    CELO2_NCCL_CHECK(ncclCommUserRank(comm_, &info_.rank));
    CELO2_NCCL_CHECK(ncclCommCount(comm_, &info_.size));
    CELO2_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (cudaEvent_t& e : ready_) CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    for (cudaEvent_t& e : done_) CELO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    timeout_ = parent.timeout_;
  }
  // Collective over this communicator: ranks of one colour form a communicator, ordered by
  // key (NCCL's ncclCommSplit: the Newton–Schulz groups, celo2/plan.h).
  std::unique_ptr<Communicator> split(int color, int key) override {
    alive();
    if (color < 0) throw CommError("NCCL communicator: split colour must be >= 0 (got " + std::to_string(color) + ")");
    count("split", 0);
    ncclComm_t sub = nullptr;
    CELO2_NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, nullptr));
    if (!sub) throw CommError("NCCL communicator: ncclCommSplit returned no communicator");
    return std::make_unique<Nccl>(*this, sub);
  }
  ~Nccl() override {
    // Teardown errors are ignored on purpose: a destructor must not throw.
    if (stream_) cudaStreamSynchronize(stream_);
    if (comm_) ncclCommDestroy(comm_);
    for (cudaEvent_t e : ready_) if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : done_) if (e) cudaEventDestroy(e);
    if (stream_) cudaStreamDestroy(stream_);
    cudaFree(scratch_);
  }

  int rank() const override { return info_.rank; }
  int size() const override { return info_.size; }
  std::string backend() const override { return "nccl"; }
  // One thread at a time (the engine's worker binds the device first: Backend::bind_thread);
  // every call waits for its stream, so program order is data order on any thread.
  bool background_ok() const override { return true; }
  int device() const override { return device_; }
  CUstream_st* stream() const override { return stream_; }

  void all_reduce_sum(double* data, int64_t n) override {
    count("all_reduce", ring_all_reduce_bytes(n * 8));
    staged(data, n * 8, true, [&](void* d) {
      CELO2_NCCL_CHECK(ncclAllReduce(d, d, n, ncclDouble, ncclSum, comm_, stream_));
    });
  }
  void all_reduce_sum(float* data, int64_t n) override {
    count("all_reduce", ring_all_reduce_bytes(n * 4));
    staged(data, n * 4, true, [&](void* d) {
      CELO2_NCCL_CHECK(ncclAllReduce(d, d, n, ncclFloat, ncclSum, comm_, stream_));
    });
  }
  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    check_counts(counts, "reduce_scatter_sum");
    const int64_t total = total_of(counts);
    count("reduce_scatter", ring_bytes(total * 4));
    // Variable counts: one ncclReduce per destination rank, grouped (ncclReduceScatter
    // needs equal counts).
    two_buffers(send, total, recv, counts[info_.rank], [&](const float* s, float* r) {
      CELO2_NCCL_CHECK(ncclGroupStart());
      int64_t off = 0;
      for (int p = 0; p < info_.size; ++p) {
        CELO2_NCCL_CHECK(ncclReduce(s + off, r, counts[p], ncclFloat, ncclSum, p, comm_, stream_));
        off += counts[p];
      }
      CELO2_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void all_gather(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    check_counts(counts, "all_gather");
    const int64_t total = total_of(counts);
    count("all_gather", ring_bytes(total * 4));
    two_buffers(send, counts[info_.rank], recv, total, [&](const float* s, float* r) {
      CELO2_NCCL_CHECK(ncclGroupStart());
      int64_t off = 0;
      for (int p = 0; p < info_.size; ++p) {
        CELO2_NCCL_CHECK(ncclBroadcast(s, r + off, counts[p], ncclFloat, p, comm_, stream_));
        off += counts[p];
      }
      CELO2_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) override {
    check_counts(send_counts, "all_to_all_v (send)");
    check_counts(recv_counts, "all_to_all_v (recv)");
    count("all_to_all", (total_of(send_counts) - send_counts[info_.rank]) * 4);
    two_buffers(send, total_of(send_counts), recv, total_of(recv_counts), [&](const float* s, float* r) {
      CELO2_NCCL_CHECK(ncclGroupStart());
      int64_t so = 0, ro = 0;
      for (int p = 0; p < info_.size; ++p) {
        if (send_counts[p]) CELO2_NCCL_CHECK(ncclSend(s + so, send_counts[p], ncclFloat, p, comm_, stream_));
        if (recv_counts[p]) CELO2_NCCL_CHECK(ncclRecv(r + ro, recv_counts[p], ncclFloat, p, comm_, stream_));
        so += send_counts[p];
        ro += recv_counts[p];
      }
      CELO2_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    count("broadcast", info_.rank == root ? bytes : 0);
    staged(data, bytes, true, [&](void* d) {
      CELO2_NCCL_CHECK(ncclBroadcast(d, d, bytes, ncclChar, root, comm_, stream_));
    });
  }
  void barrier() override {
    count("barrier", 0);
    int* d = static_cast<int*>(scratch(sizeof(int)));
    CELO2_NCCL_CHECK(ncclAllReduce(d, d, 1, ncclInt, ncclSum, comm_, stream_));
    wait();
  }

  CUevent_st* all_reduce_sum_async(float* dev, int64_t n, CUstream_st* producer) override {
    count("all_reduce", ring_all_reduce_bytes(n * 4));
    const int slot = slot_++ % kSlots;
    CELO2_CUDA_CHECK(cudaEventRecord(ready_[slot], producer));
    CELO2_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_[slot], 0));
    CELO2_NCCL_CHECK(ncclAllReduce(dev, dev, n, ncclFloat, ncclSum, comm_, stream_));
    CELO2_CUDA_CHECK(cudaEventRecord(done_[slot], stream_));
    return done_[slot];
  }

  void group_start() override {
    alive();  // before the group opens, so a throw never leaves one open
    CELO2_NCCL_CHECK(ncclGroupStart());
  }
  void group_end() override { CELO2_NCCL_CHECK(ncclGroupEnd()); }
  void reduce_async(const void* send, void* recv, int64_t n, bool bf16, int root) override {
    alive();
    count("reduce", info_.size > 1 ? n * (bf16 ? 2 : 4) : 0);
    // Non-root ranks pass their send buffer as recv: NCCL does not write it there.
    CELO2_NCCL_CHECK(ncclReduce(send, info_.rank == root ? recv : const_cast<void*>(send), n,
                                bf16 ? ncclBfloat16 : ncclFloat, ncclSum, root, comm_, stream_));
  }
  void broadcast_async(void* buf, int64_t n, bool bf16, int root) override {
    alive();
    count("broadcast", info_.rank == root && info_.size > 1 ? n * (bf16 ? 2 : 4) : 0);
    CELO2_NCCL_CHECK(ncclBroadcast(buf, buf, n, bf16 ? ncclBfloat16 : ncclFloat, root, comm_, stream_));
  }
  void stream_wait(CUevent_st* ev) override { CELO2_CUDA_CHECK(cudaStreamWaitEvent(stream_, ev, 0)); }
  void synchronize() override {
    alive();
    wait();
  }

 private:
  static constexpr int kSlots = 8;

  void alive() const {
    if (!comm_) throw CommError("NCCL communicator was aborted after an earlier failure");
  }

  int64_t ring_bytes(int64_t bytes) const {
    return info_.size > 1 ? bytes * (info_.size - 1) / info_.size : 0;
  }
  int64_t ring_all_reduce_bytes(int64_t bytes) const { return 2 * ring_bytes(bytes); }

  static bool on_device(const void* p) {
    if (!p) return false;
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
  }

  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      CELO2_CUDA_CHECK(cudaFree(scratch_));
      scratch_ = nullptr;
      CELO2_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  // In-place collective on `bytes` at p (device: in place; host: through scratch).
  template <class F>
  void staged(void* p, int64_t bytes, bool copy_back, F op) {
    if (bytes <= 0 && info_.size == 1) return;
    if (on_device(p)) {
      op(p);
      wait();
      return;
    }
    void* d = scratch(static_cast<size_t>(std::max<int64_t>(bytes, 8)));
    CELO2_CUDA_CHECK(cudaMemcpyAsync(d, p, bytes, cudaMemcpyHostToDevice, stream_));
    op(d);
    if (copy_back) CELO2_CUDA_CHECK(cudaMemcpyAsync(p, d, bytes, cudaMemcpyDeviceToHost, stream_));
    wait();
  }

  // Out-of-place collective: send (ns floats) -> recv (nr floats), staging host buffers.
  template <class F>
  void two_buffers(const float* send, int64_t ns, float* recv, int64_t nr, F op) {
    const bool dev_s = ns == 0 || on_device(send), dev_r = nr == 0 || on_device(recv);
    if (dev_s && dev_r) {
      op(send, recv);
      wait();
      return;
    }
    const size_t bs = static_cast<size_t>(ns) * 4, br = static_cast<size_t>(nr) * 4;
    char* base = static_cast<char*>(scratch(bs + br + 256));
    float* ds = reinterpret_cast<float*>(base);
    float* dr = reinterpret_cast<float*>(base + ((bs + 255) / 256) * 256);
    if (ns) CELO2_CUDA_CHECK(cudaMemcpyAsync(ds, send, bs, dev_s ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, stream_));
    op(ds, dr);
    if (nr) CELO2_CUDA_CHECK(cudaMemcpyAsync(recv, dr, br, dev_r ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost, stream_));
    wait();
  }

  // Waits for the communicator's stream; a collective stuck past the timeout aborts NCCL.
  void wait() {
    const auto t0 = std::chrono::steady_clock::now();
    while (true) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) CELO2_CUDA_CHECK(e);
      ncclResult_t async = ncclSuccess;
      CELO2_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      if (async != ncclSuccess && async != ncclInProgress) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        throw CommError("celo2: rank " + std::to_string(info_.rank) + " of " + std::to_string(info_.size) +
                        ": NCCL communicator failed: " + ncclGetErrorString(async) +
                        (async == ncclRemoteError
                             ? " (a peer rank died or its network failed; look at the other "
                               "ranks' output for the first error)"
                             : ""));
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (timeout_ > 0 && s > timeout_) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        // No error from NCCL: the peers did not join. A dead peer is not always noticed by
        // NCCL (shared memory, NVLink), so both causes are named.
        char limit[32];
        std::snprintf(limit, sizeof limit, "%g", timeout_);
        throw CommError(
            "celo2: rank " + std::to_string(info_.rank) + " of " + std::to_string(info_.size) +
            ": NCCL collective did not finish within " + limit +
            " s (CELO2_COMM_TIMEOUT_S); communicator aborted. NCCL reported no error: the "
            "other ranks are in a different collective or none, or hung (or died without "
            "NCCL noticing: check that every rank still runs). " + kHangFix);
      }
      std::this_thread::yield();
    }
  }

  LaunchInfo info_;
  std::string bootstrap_ = "none";  // how the NCCL id travelled: none (one rank), mpi or tcp
  int device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_[kSlots] = {}, done_[kSlots] = {};
  int slot_ = 0;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  double timeout_ = 600;
};

}  // namespace

std::unique_ptr<NcclCommunicator> make_nccl_communicator_ex() {
  return std::make_unique<Nccl>(detect_launch());
}

std::unique_ptr<Communicator> make_nccl_communicator() { return make_nccl_communicator_ex(); }

}  // namespace celo2
