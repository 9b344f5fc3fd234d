// The rendezvous endpoint and the TCP bootstrap (celo2/tcp_bootstrap.h).
// POSIX sockets only; every socket is non-blocking and waited on with poll() against one
// deadline, so no call blocks past the timeout. Every syscall is checked and its error names
// the call and the errno text.
#include "celo2/tcp_bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <thread>
#include <utility>

#include "celo2/params.h"

namespace celo2 {
namespace {

// ---------------------------------------------------------------- environment

// A port variable's value (MASTER_PORT), plus `add` (the bootstrap uses MASTER_PORT+1).
int read_port(const char* name, const std::string& s, int add = 0) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || *end != '\0' || v < 1 || v + add > 65535)
    throw CommError(std::string("environment variable ") + name + "='" + s + "' is not a TCP port" +
                    (add ? " (the bootstrap uses it + " + std::to_string(add) + ")" : std::string()));
  return static_cast<int>(v + add);
}

// The first host of a Slurm node list when it is simple: "a,b" -> a, "gpu[003-010,015],x"
// -> gpu003, "n7" -> n7. Empty for anything else (several bracket groups, bad ranges).
std::string first_slurm_host(const std::string& list) {
  std::string item;
  int depth = 0;
  for (char c : list) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    item += c;
  }
  const size_t open = item.find('[');
  if (open == std::string::npos) return item.find(']') == std::string::npos ? item : "";
  const size_t close = item.find(']', open);
  if (close == std::string::npos || item.find('[', close) != std::string::npos) return "";
  const std::string inside = item.substr(open + 1, close - open - 1);
  const std::string first = inside.substr(0, inside.find_first_of(",-"));
  if (first.empty() || first.find_first_not_of("0123456789") != std::string::npos) return "";
  return item.substr(0, open) + first + item.substr(close + 1);
}

// ---------------------------------------------------------------- sockets

std::string errno_text(int e) { return std::error_code(e, std::generic_category()).message(); }

[[noreturn]] void sys_fail(const std::string& call, int e) {
  throw CommError("bootstrap: " + call + " failed: " + errno_text(e));
}

std::string seconds_text(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", s);
  return b;
}

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);  // nothing to do about a failing close of a socket
    fd_ = -1;
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

void set_nonblocking(int fd, const std::string& what) {
  const int fl = ::fcntl(fd, F_GETFL, 0);
  if (fl < 0) sys_fail("fcntl(F_GETFL) on " + what, errno);
  if (::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) sys_fail("fcntl(F_SETFL, O_NONBLOCK) on " + what, errno);
  if (::fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) sys_fail("fcntl(F_SETFD, FD_CLOEXEC) on " + what, errno);
}

std::string addr_text(const sockaddr* sa, socklen_t len) {
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  const int rc = ::getnameinfo(sa, len, host, sizeof host, serv, sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV);
  if (rc != 0) return std::string("<address: ") + ::gai_strerror(rc) + ">";
  return sa->sa_family == AF_INET6 ? "[" + std::string(host) + "]:" + serv : std::string(host) + ":" + serv;
}

std::string endpoint_text(const std::string& host, int port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

using Clock = std::chrono::steady_clock;

struct Deadline {
  bool infinite = false;
  Clock::time_point at;
  explicit Deadline(double seconds) : infinite(seconds <= 0) {
    if (!infinite)
      at = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }
  bool passed() const { return !infinite && Clock::now() >= at; }
  // Milliseconds left for poll() (-1: no deadline), rounded up so a poll never ends early.
  int poll_ms() const {
    if (infinite) return -1;
    const auto left = std::chrono::duration_cast<std::chrono::microseconds>(at - Clock::now()).count();
    if (left <= 0) return 0;
    return static_cast<int>(std::min<int64_t>((left + 999) / 1000, 1 << 30));
  }
};

// poll() one descriptor; false on timeout. EINTR restarts with the time left.
bool wait_fd(int fd, short events, const Deadline& d, const std::string& what) {
  while (true) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, d.poll_ms());
    if (r > 0) return true;
    if (r == 0) {
      if (d.passed()) return false;
      continue;
    }
    if (errno != EINTR) sys_fail("poll on " + what, errno);
  }
}

enum class Io { kOk, kEof, kTimeout };

// Sends all n bytes (kTimeout when the deadline passes first).
Io send_all(int fd, const void* data, size_t n, const Deadline& d, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::send(fd, p + done, n - done, MSG_NOSIGNAL);
    if (w > 0) {
      done += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!wait_fd(fd, POLLOUT, d, what)) return Io::kTimeout;
      continue;
    }
    if (w < 0 && (errno == EPIPE || errno == ECONNRESET)) return Io::kEof;
    sys_fail("send to " + what, errno);
  }
  return Io::kOk;
}

// Reads exactly n bytes; *got says how many arrived (for messages).
Io recv_all(int fd, void* data, size_t n, const Deadline& d, const std::string& what, size_t* got) {
  char* p = static_cast<char*>(data);
  *got = 0;
  while (*got < n) {
    const ssize_t r = ::recv(fd, p + *got, n - *got, 0);
    if (r > 0) {
      *got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return Io::kEof;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!wait_fd(fd, POLLIN, d, what)) return Io::kTimeout;
      continue;
    }
    if (errno == ECONNRESET) return Io::kEof;
    sys_fail("recv from " + what, errno);
  }
  return Io::kOk;
}

// ---------------------------------------------------------------- protocol

constexpr uint32_t kMagic = 0x43324253u;  // "C2BS"
constexpr uint16_t kVersion = 1;
constexpr size_t kHelloBytes = 16, kHeaderBytes = 12, kAckBytes = 8;
constexpr uint32_t kMaxBlob = 16u << 20, kMaxErrorText = 64u << 10;
enum : uint16_t { kStatusOk = 0, kStatusError = 1 };

void put32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24), p[1] = uint8_t(v >> 16), p[2] = uint8_t(v >> 8), p[3] = uint8_t(v);
}
void put16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v >> 8), p[1] = uint8_t(v); }
uint32_t get32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}
uint16_t get16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }

std::string hex32(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

std::vector<uint8_t> frame(uint16_t status, const void* payload, size_t n) {
  std::vector<uint8_t> f(kHeaderBytes + n);
  put32(f.data(), kMagic);
  put16(f.data() + 4, kVersion);
  put16(f.data() + 6, status);
  put32(f.data() + 8, static_cast<uint32_t>(n));
  if (n) std::memcpy(f.data() + kHeaderBytes, payload, n);
  return f;
}

// A connection on rank 0, before and after its hello.
struct Conn {
  Fd fd;
  std::string peer;  // ip:port it came from
  uint8_t buf[kHelloBytes] = {};
  size_t got = 0;
  int rank = -1;  // after a valid hello
};

}  // namespace

// ---------------------------------------------------------------- endpoint

BootstrapEndpoint discover_bootstrap_endpoint(const LaunchInfo& launch) {
  BootstrapEndpoint ep;
  std::string host_from;
  const std::string addr = param::bootstrap_addr();
  if (!addr.empty()) {
    ep.host = addr, host_from = "CELO2_BOOTSTRAP_ADDR";
  } else if (launch.launcher == "torchrun") {
    if (!launch.master_addr.empty()) ep.host = launch.master_addr, host_from = "MASTER_ADDR";
  } else if (launch.launcher == "slurm") {
    const std::string first = launch.slurm_nodelist.empty() ? "" : first_slurm_host(launch.slurm_nodelist);
    if (!first.empty()) {
      ep.host = first, host_from = "first host of SLURM_JOB_NODELIST";
    } else if (!launch.master_addr.empty()) {
      ep.host = launch.master_addr, host_from = "MASTER_ADDR";
    } else {
      throw CommError("TCP bootstrap under Slurm: cannot tell rank 0's host from SLURM_JOB_NODELIST='" +
                      launch.slurm_nodelist + "'; set CELO2_BOOTSTRAP_ADDR to the host of SLURM_PROCID 0");
    }
  } else {
    if (!launch.master_addr.empty()) {
      ep.host = launch.master_addr, host_from = "MASTER_ADDR";
    } else if (launch.launcher == "openmpi" && !launch.local_size_from.empty() &&
               launch.local_size == launch.size) {
      ep.host = "127.0.0.1", host_from = "one node (" + launch.local_size_from + ")";
    }
  }
  if (ep.host.empty())
    throw CommError("TCP bootstrap (" + launch.launcher + ", " + std::to_string(launch.size) +
                    " ranks): no address for rank 0; set CELO2_BOOTSTRAP_ADDR" +
                    (launch.launcher == "torchrun" ? " or MASTER_ADDR" : ""));
  std::string port_from = "default";
  if (const int port = param::bootstrap_port(); port > 0) {
    ep.port = port, port_from = "CELO2_BOOTSTRAP_PORT";
  } else if (!launch.master_port.empty()) {
    ep.port = read_port("MASTER_PORT", launch.master_port, 1), port_from = "MASTER_PORT+1";
  }
  ep.bind_host = param::bootstrap_bind();
  ep.source = host_from + ", port " + port_from;
  return ep;
}

std::string choose_nccl_bootstrap(const LaunchInfo& launch, bool mpi_initialized) {
  const std::string s = param::nccl_bootstrap();
  if (s != "auto") return s;
  if (mpi_initialized) return "mpi";
  // An MPI launcher started this process, and its ranks are the ranks of the launch (srun
  // --mpi=pmix torchrun ... has fewer MPI ranks than torchrun ranks: TCP then).
  if (!launch.mpi_variables()) return "tcp";
  if (launch.mpi_size < 0) return "mpi";
  return launch.mpi_size == launch.size ? "mpi" : "tcp";
}

// ---------------------------------------------------------------- TcpBootstrap

TcpBootstrap::TcpBootstrap(int rank, int world_size, BootstrapEndpoint endpoint, double timeout_s)
    : rank_(rank), world_(world_size), endpoint_(std::move(endpoint)),
      timeout_s_(timeout_s < 0 ? comm_timeout_seconds() : timeout_s) {
  if (world_ < 1 || rank_ < 0 || rank_ >= world_)
    throw CommError("bootstrap: rank " + std::to_string(rank_) + " of " + std::to_string(world_) +
                    " is not a valid rank");
  if (endpoint_.port < 0 || endpoint_.port > 65535 || (rank_ != 0 && endpoint_.port == 0))
    throw CommError("bootstrap: port " + std::to_string(endpoint_.port) + " is not a TCP port");
  if (rank_ != 0 || world_ == 1) return;

  // Rank 0 listens now, so that port 0 resolves to a real port before any peer is told.
  const std::string where = endpoint_text(endpoint_.bind_host.empty() ? "0.0.0.0" : endpoint_.bind_host,
                                          endpoint_.port);
  std::vector<std::pair<sockaddr_storage, socklen_t>> addrs;
  if (endpoint_.bind_host.empty()) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons(static_cast<uint16_t>(endpoint_.port));
    sockaddr_storage ss{};
    std::memcpy(&ss, &a, sizeof a);
    addrs.emplace_back(ss, static_cast<socklen_t>(sizeof a));
  } else {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    const std::string port = std::to_string(endpoint_.port);
    const int rc = ::getaddrinfo(endpoint_.bind_host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0)
      throw CommError("bootstrap: getaddrinfo(" + endpoint_.bind_host + ") for the listening address failed: " +
                      (rc == EAI_SYSTEM ? errno_text(errno) : std::string(::gai_strerror(rc))));
    for (addrinfo* ai = res; ai; ai = ai->ai_next) {
      sockaddr_storage ss{};
      std::memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
      addrs.emplace_back(ss, ai->ai_addrlen);
    }
    ::freeaddrinfo(res);
  }
  std::string errors;
  for (const auto& [ss, len] : addrs) {
    const sockaddr* sa = reinterpret_cast<const sockaddr*>(&ss);
    Fd fd(::socket(sa->sa_family, SOCK_STREAM, 0));
    if (!fd) sys_fail("socket() for listening on " + where, errno);
    set_nonblocking(fd.get(), "the listening socket");
    const int one = 1;
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
      sys_fail("setsockopt(SO_REUSEADDR) on " + where, errno);
    if (::bind(fd.get(), sa, len) < 0) {
      const int e = errno;
      errors += (errors.empty() ? "" : "; ") + std::string("bind(") + addr_text(sa, len) + "): " + errno_text(e);
      continue;
    }
    if (::listen(fd.get(), SOMAXCONN) < 0) sys_fail("listen() on " + where, errno);
    sockaddr_storage bound{};
    socklen_t blen = sizeof bound;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &blen) < 0)
      sys_fail("getsockname() on " + where, errno);
    endpoint_.port = bound.ss_family == AF_INET6
                         ? ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port)
                         : ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);
    listen_fd_ = fd.release();  // closed by broadcast() or ~TcpBootstrap
    return;
  }
  throw CommError("bootstrap: rank 0 cannot listen on " + where + " (" + errors +
                  "); another job on this port? set CELO2_BOOTSTRAP_PORT");
}

TcpBootstrap::~TcpBootstrap() {
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

std::vector<uint8_t> TcpBootstrap::broadcast(const std::vector<uint8_t>& blob, int64_t expected_size) {
  if (used_) throw CommError("bootstrap: broadcast() called twice");
  used_ = true;
  if (rank_ == 0) {
    if (expected_size >= 0 && static_cast<int64_t>(blob.size()) != expected_size)
      throw CommError("bootstrap: rank 0 was given a " + std::to_string(blob.size()) +
                      "-byte blob, expected " + std::to_string(expected_size));
    if (blob.size() > kMaxBlob) throw CommError("bootstrap: blob larger than 16 MiB");
    if (world_ == 1) return blob;
    struct CloseListener {  // the port is free again whatever serve() does
      int& fd;
      ~CloseListener() {
        if (fd >= 0) ::close(fd);
        fd = -1;
      }
    } close_listener{listen_fd_};
    return serve(blob);
  }
  return fetch(expected_size);
}

std::vector<uint8_t> TcpBootstrap::serve(const std::vector<uint8_t>& blob) {
  const std::string self = "rank 0 (port " + std::to_string(endpoint_.port) + ")";
  const std::string tmo = seconds_text(timeout_s_) + " s";
  std::vector<Conn> conns;  // every accepted connection; rank >= 0 once its hello is valid
  std::vector<int> by_rank(world_, -1);
  int joined = 0;

  // A failure is reported to every connected peer (best effort) before it is thrown.
  auto fail = [&](const std::string& msg) {
    const std::vector<uint8_t> f = frame(kStatusError, msg.data(), std::min<size_t>(msg.size(), kMaxErrorText));
    const Deadline quick(0.2);
    for (Conn& c : conns) {
      try {
        send_all(c.fd.get(), f.data(), f.size(), quick, c.peer);
      } catch (const CommError&) {  // the peer may be gone already
      }
      ::shutdown(c.fd.get(), SHUT_WR);
      // Unread input would turn the close into a reset that can overtake the message.
      char sink[256];
      while (::recv(c.fd.get(), sink, sizeof sink, 0) > 0) {
      }
    }
    throw CommError("bootstrap: " + msg);
  };
  auto missing = [&](auto has) {
    std::string m;
    int shown = 0, more = 0;
    for (int r = 1; r < world_; ++r) {
      if (has(r)) continue;
      if (shown < 8) m += (shown++ ? ", " : "") + std::to_string(r);
      else ++more;
    }
    if (more) m += " and " + std::to_string(more) + " more";
    return m;
  };

  const Deadline join(timeout_s_);
  while (joined < world_ - 1) {
    std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
    std::vector<size_t> which;
    for (size_t i = 0; i < conns.size(); ++i)
      if (conns[i].rank < 0) fds.push_back({conns[i].fd.get(), POLLIN, 0}), which.push_back(i);
    const int r = ::poll(fds.data(), fds.size(), join.poll_ms());
    if (r < 0) {
      if (errno == EINTR) continue;
      sys_fail("poll on rank 0's connections", errno);
    }
    if (r == 0) {
      if (!join.passed()) continue;
      const size_t silent = conns.size() - static_cast<size_t>(joined);
      fail("only " + std::to_string(joined + 1) + " of " + std::to_string(world_) + " ranks connected to " +
           self + " within " + tmo + " (missing ranks " +
           missing([&](int k) { return by_rank[k] >= 0; }) + ")" +
           (silent ? "; " + std::to_string(silent) + " connection(s) sent no complete hello" : "") +
           " — are all ranks started, with the same CELO2_BOOTSTRAP_ADDR/PORT, and the port open?");
    }
    if (fds[0].revents & (POLLERR | POLLNVAL)) fail("the listening socket of " + self + " failed");
    if (fds[0].revents & POLLIN) {
      while (true) {
        sockaddr_storage ss{};
        socklen_t len = sizeof ss;
        const int fd = ::accept(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len);
        if (fd < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          if (errno == EINTR || errno == ECONNABORTED) continue;
          sys_fail("accept() on " + self, errno);
        }
        Conn c;
        c.fd = Fd(fd);
        c.peer = addr_text(reinterpret_cast<sockaddr*>(&ss), len);
        set_nonblocking(fd, "the connection from " + c.peer);
        conns.push_back(std::move(c));
      }
    }
    for (size_t k = 0; k < which.size(); ++k) {
      if (!fds[k + 1].revents) continue;
      Conn& c = conns[which[k]];
      const ssize_t n = ::recv(c.fd.get(), c.buf + c.got, kHelloBytes - c.got, 0);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        if (errno == ECONNRESET) {
          fail("the connection from " + c.peer + " was reset after " + std::to_string(c.got) + " of " +
               std::to_string(kHelloBytes) + " hello bytes");
        }
        sys_fail("recv() of a hello from " + c.peer, errno);
      }
      if (n == 0)
        fail("the connection from " + c.peer + " closed after " + std::to_string(c.got) + " of " +
             std::to_string(kHelloBytes) + " hello bytes");
      c.got += static_cast<size_t>(n);
      if (c.got < kHelloBytes) continue;
      const uint32_t magic = get32(c.buf), version = get16(c.buf + 4);
      const uint32_t prank = get32(c.buf + 8), pworld = get32(c.buf + 12);
      if (magic != kMagic)
        fail("the connection from " + c.peer + " sent a bad hello (magic " + hex32(magic) + ", expected " +
             hex32(kMagic) + "): not a celo2 rank, or another program using port " +
             std::to_string(endpoint_.port));
      if (version != kVersion)
        fail("the connection from " + c.peer + " speaks bootstrap protocol version " + std::to_string(version) +
             ", rank 0 speaks version " + std::to_string(kVersion) + " (mixed celo2 builds?)");
      if (pworld != static_cast<uint32_t>(world_))
        fail("rank " + std::to_string(prank) + " from " + c.peer + " says the world size is " +
             std::to_string(pworld) + ", rank 0 has " + std::to_string(world_) +
             " (ranks launched with different world sizes?)");
      if (prank == 0 || prank >= static_cast<uint32_t>(world_))
        fail("the connection from " + c.peer + " claims rank " + std::to_string(prank) + ", expected 1.." +
             std::to_string(world_ - 1));
      if (by_rank[prank] >= 0)
        fail("rank " + std::to_string(prank) + " connected twice (from " + conns[by_rank[prank]].peer +
             " and from " + c.peer + ")");
      c.rank = static_cast<int>(prank);
      by_rank[prank] = static_cast<int>(which[k]);
      ++joined;
    }
  }

  // Everyone is here: send the blob, then wait for every acknowledgement.
  const std::vector<uint8_t> f = frame(kStatusOk, blob.data(), blob.size());
  const Deadline ack(timeout_s_);
  for (Conn& c : conns) {
    const Io io = send_all(c.fd.get(), f.data(), f.size(), ack, "rank " + std::to_string(c.rank) + " at " + c.peer);
    if (io == Io::kTimeout)
      fail("rank " + std::to_string(c.rank) + " at " + c.peer + " did not take the blob within " + tmo);
    if (io == Io::kEof)
      fail("rank " + std::to_string(c.rank) + " at " + c.peer + " closed the connection before the blob was sent");
  }
  std::vector<bool> acked(world_, false);
  for (Conn& c : conns) {
    uint8_t a[kAckBytes];
    size_t got = 0;
    const std::string who = "rank " + std::to_string(c.rank) + " at " + c.peer;
    const Io io = recv_all(c.fd.get(), a, kAckBytes, ack, who, &got);
    if (io == Io::kTimeout) {
      int n = 0;
      for (int k = 1; k < world_; ++k) n += acked[k];
      fail("only " + std::to_string(n) + " of " + std::to_string(world_ - 1) +
           " ranks acknowledged the blob within " + tmo + " (missing ranks " +
           missing([&](int k) { return static_cast<bool>(acked[k]); }) + ")");
    }
    if (io == Io::kEof)
      fail(who + " closed the connection after " + std::to_string(got) + " of " + std::to_string(kAckBytes) +
           " acknowledgement bytes");
    if (get32(a) != kMagic || get32(a + 4) != static_cast<uint32_t>(c.rank))
      fail(who + " sent a bad acknowledgement");
    acked[c.rank] = true;
  }
  return blob;
}

std::vector<uint8_t> TcpBootstrap::fetch(int64_t expected_size) {
  const std::string root = "rank 0 at " + endpoint_text(endpoint_.host, endpoint_.port);
  const std::string tmo = seconds_text(timeout_s_) + " s";
  const Deadline d(timeout_s_);

  // Connect, retrying with exponential backoff until the deadline (rank 0 may start later).
  Fd sock;
  std::string last_error = "no attempt";
  auto backoff = std::chrono::milliseconds(20);
  while (!sock) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    const std::string port = std::to_string(endpoint_.port);
    const int rc = ::getaddrinfo(endpoint_.host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0) {
      // Names of fresh pods/nodes may resolve only after a while: retried like a refusal.
      last_error = "getaddrinfo(" + endpoint_.host + "): " +
                   (rc == EAI_SYSTEM ? errno_text(errno) : std::string(::gai_strerror(rc)));
    } else {
      struct Free {
        addrinfo* r;
        ~Free() { ::freeaddrinfo(r); }
      } free_res{res};
      for (addrinfo* ai = res; ai && !sock; ai = ai->ai_next) {
        const std::string to = addr_text(ai->ai_addr, ai->ai_addrlen);
        Fd fd(::socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol));
        if (!fd) sys_fail("socket() to connect to " + root, errno);
        set_nonblocking(fd.get(), "the socket to " + root);
        int e = 0;
        if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) < 0) {
          e = errno;
          if (e == EINPROGRESS || e == EINTR) {
            if (!wait_fd(fd.get(), POLLOUT, d, root)) {
              e = ETIMEDOUT;
            } else {
              socklen_t len = sizeof e;
              if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &e, &len) < 0)
                sys_fail("getsockopt(SO_ERROR) on the socket to " + root, errno);
            }
          }
        }
        if (e == 0) {
          sock = std::move(fd);
          break;
        }
        last_error = "connect(" + to + "): " + errno_text(e);
        switch (e) {
          case ECONNREFUSED: case ETIMEDOUT: case EHOSTUNREACH: case ENETUNREACH: case ECONNRESET:
          case EADDRNOTAVAIL: case EAGAIN: case ENETDOWN: case EHOSTDOWN:
            break;  // not up (yet): retried
          default:
            sys_fail("connect() to " + root + " (" + to + ")", e);
        }
      }
    }
    if (sock) break;
    if (d.passed())
      throw CommError("bootstrap: " + root + " did not answer within " + tmo + " (last error: " +
                      last_error + "; endpoint from " + (endpoint_.source.empty() ? "the caller" : endpoint_.source) +
                      ") — is rank 0 running, and is the port reachable from this host?");
    auto nap = backoff;
    if (!d.infinite)
      nap = std::min(nap, std::chrono::duration_cast<std::chrono::milliseconds>(d.at - Clock::now()) +
                              std::chrono::milliseconds(1));
    std::this_thread::sleep_for(nap);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(1000));
  }
  const int one = 1;
  if (::setsockopt(sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
    sys_fail("setsockopt(TCP_NODELAY) on the socket to " + root, errno);

  uint8_t hello[kHelloBytes] = {};
  put32(hello, kMagic);
  put16(hello + 4, kVersion);
  put32(hello + 8, static_cast<uint32_t>(rank_));
  put32(hello + 12, static_cast<uint32_t>(world_));
  Io io = send_all(sock.get(), hello, sizeof hello, d, root);
  if (io == Io::kTimeout) throw CommError("bootstrap: " + root + " did not take our hello within " + tmo);
  if (io == Io::kEof) throw CommError("bootstrap: " + root + " closed the connection before our hello was sent");

  uint8_t head[kHeaderBytes];
  size_t got = 0;
  io = recv_all(sock.get(), head, sizeof head, d, root, &got);
  if (io == Io::kTimeout)
    throw CommError("bootstrap: " + root + " accepted rank " + std::to_string(rank_) +
                    "'s connection but sent nothing within " + tmo + " (it waits for all " +
                    std::to_string(world_) + " ranks: is every rank started?)");
  if (io == Io::kEof)
    throw CommError("bootstrap: " + root + " closed the connection after " + std::to_string(got) + " of " +
                    std::to_string(kHeaderBytes) + " header bytes");
  const uint32_t magic = get32(head), len = get32(head + 8);
  const uint16_t version = get16(head + 4), status = get16(head + 6);
  if (magic != kMagic)
    throw CommError("bootstrap: " + root + " answered with a bad magic " + hex32(magic) +
                    ": not a celo2 rank 0, or another program on that port");
  if (version != kVersion)
    throw CommError("bootstrap: " + root + " speaks protocol version " + std::to_string(version) +
                    ", this rank speaks " + std::to_string(kVersion));
  if (status != kStatusOk && status != kStatusError)
    throw CommError("bootstrap: " + root + " sent an unknown status " + std::to_string(status));
  if (len > (status == kStatusOk ? kMaxBlob : kMaxErrorText))
    throw CommError("bootstrap: " + root + " announced " + std::to_string(len) + " bytes, more than allowed");
  std::vector<uint8_t> payload(len);
  io = recv_all(sock.get(), payload.data(), len, d, root, &got);
  if (io != Io::kOk)
    throw CommError("bootstrap: " + root + (io == Io::kTimeout ? " stalled" : " closed the connection") +
                    " after " + std::to_string(got) + " of " + std::to_string(len) + " payload bytes");
  if (status == kStatusError)
    throw CommError("bootstrap: " + root + " failed the bootstrap: " +
                    std::string(payload.begin(), payload.end()));
  if (expected_size >= 0 && static_cast<int64_t>(len) != expected_size)
    throw CommError("bootstrap: " + root + " sent a " + std::to_string(len) + "-byte blob, expected " +
                    std::to_string(expected_size));
  uint8_t ack[kAckBytes];
  put32(ack, kMagic);
  put32(ack + 4, static_cast<uint32_t>(rank_));
  io = send_all(sock.get(), ack, sizeof ack, d, root);
  if (io != Io::kOk)
    throw CommError("bootstrap: " + root + (io == Io::kTimeout ? " did not take" : " closed the connection before") +
                    " our acknowledgement");
  return payload;
}

}  // namespace celo2
