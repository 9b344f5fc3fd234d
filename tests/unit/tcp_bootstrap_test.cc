// The TCP bootstrap (celo2/tcp_bootstrap.h) on loopback, one forked process per rank: a
// random 128-byte blob (the size of an ncclUniqueId) reaches every rank for 1, 2 and 4 ranks,
// also when the peers start before rank 0; a wrong world size, a duplicate rank, a missing
// rank 0, a missing peer, garbage on the port and a short hello each fail with a message
// naming what went wrong, within the (short) timeout. Then rank discovery and the endpoint
// from the launchers' variables (torchrun, Slurm, Open MPI, none), each in a child process
// with its own environment. No GPU needed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "celo2/params.h"
#include "celo2/tcp_bootstrap.h"

namespace {

using celo2::BootstrapEndpoint;
using celo2::TcpBootstrap;

std::string hex(const std::vector<uint8_t>& b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t c : b) s += d[c >> 4], s += d[c & 15];
  return s;
}

void write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t w = ::write(fd, s.data() + done, s.size() - done);
    if (w <= 0) return;
    done += static_cast<size_t>(w);
  }
}

// A forked process running fn(report_fd); its report is fn's return value ("OK:..." or
// "ERR:<what()>"). fn may write earlier lines to report_fd (rank 0 writes its port first).
struct Child {
  pid_t pid = -1;
  int fd = -1;
};

Child spawn(const std::function<std::string(int)>& fn) {
  int p[2];
  if (::pipe(p) != 0) std::abort();
  const pid_t pid = ::fork();
  if (pid < 0) std::abort();
  if (pid == 0) {
    ::close(p[0]);
    std::string out;
    try {
      out = fn(p[1]);
    } catch (const std::exception& e) {
      out = std::string("ERR:") + e.what();
    }
    write_all(p[1], out);
    ::close(p[1]);
    ::_exit(0);
  }
  ::close(p[1]);
  return {pid, p[0]};
}

std::string read_line(int fd) {
  std::string s;
  char c;
  while (::read(fd, &c, 1) == 1 && c != '\n') s += c;
  return s;
}

// The rest of the child's report; waits for it to exit.
std::string finish(const Child& c) {
  std::string s;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(c.fd, buf, sizeof buf)) > 0) s.append(buf, static_cast<size_t>(n));
  ::close(c.fd);
  int status = 0;
  ::waitpid(c.pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  return s;
}

BootstrapEndpoint loopback(int port) {
  BootstrapEndpoint ep;
  ep.host = "127.0.0.1";
  ep.port = port;
  ep.bind_host = "127.0.0.1";
  ep.source = "test";
  return ep;
}

// Rank 0 in a child, listening on `port` (0: a free one); returns it with the port bound.
Child spawn_root(int world, std::vector<uint8_t> blob, double timeout, int* port, int want_port = 0) {
  Child c = spawn([=](int report) {
    TcpBootstrap boot(0, world, loopback(want_port), timeout);
    write_all(report, std::to_string(boot.port()) + "\n");
    return "OK:" + hex(boot.broadcast(blob, static_cast<int64_t>(blob.size())));
  });
  const std::string line = read_line(c.fd);
  *port = std::atoi(line.c_str());
  return c;
}

Child spawn_peer(int rank, int world, int port, double timeout, int64_t expect = 128) {
  return spawn([=](int) {
    TcpBootstrap boot(rank, world, loopback(port), timeout);
    return "OK:" + hex(boot.broadcast({}, expect));
  });
}

// A port nothing listens on (bound and released; loopback, so nobody takes it meanwhile in
// practice).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::vector<uint8_t> random_blob(size_t n) {
  std::mt19937 g(std::random_device{}());
  std::vector<uint8_t> b(n);
  for (auto& c : b) c = static_cast<uint8_t>(g());
  return b;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class Broadcast : public ::testing::TestWithParam<int> {};

TEST_P(Broadcast, EveryRankGetsTheBlob) {
  const int world = GetParam();
  const std::vector<uint8_t> blob = random_blob(128);
  int port = 0;
  Child root = spawn_root(world, blob, 5.0, &port);
  if (world > 1) {
    ASSERT_GT(port, 0);
  }
  std::vector<Child> peers;
  for (int r = 1; r < world; ++r) {
    peers.push_back(spawn_peer(r, world, port, 5.0));
  }
  EXPECT_EQ(finish(root), "OK:" + hex(blob));
  for (int r = 1; r < world; ++r) EXPECT_EQ(finish(peers[r - 1]), "OK:" + hex(blob)) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Ranks, Broadcast, ::testing::Values(1, 2, 4));

TEST(TcpBootstrap, PeersStartedBeforeRankZeroRetry) {
  const std::vector<uint8_t> blob = random_blob(128);
  const int port = free_port();
  std::vector<Child> peers;
  for (int r = 1; r < 3; ++r) {
    peers.push_back(spawn_peer(r, 3, port, 5.0));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // peers are refused meanwhile
  int bound = 0;
  Child root = spawn_root(3, blob, 5.0, &bound, port);
  EXPECT_EQ(bound, port);
  EXPECT_EQ(finish(root), "OK:" + hex(blob));
  for (Child& p : peers) EXPECT_EQ(finish(p), "OK:" + hex(blob));
}

TEST(TcpBootstrap, WrongWorldSizeInHello) {
  int port = 0;
  Child root = spawn_root(2, random_blob(128), 3.0, &port);
  Child peer = spawn_peer(1, 3, port, 3.0);
  const std::string r0 = finish(root), r1 = finish(peer);
  EXPECT_TRUE(has(r0, "ERR:") && has(r0, "rank 1 from 127.0.0.1:") &&
              has(r0, "says the world size is 3, rank 0 has 2")) << r0;
  // The peer hears why instead of timing out.
  EXPECT_TRUE(has(r1, "failed the bootstrap") && has(r1, "world size is 3")) << r1;
}

TEST(TcpBootstrap, DuplicateRank) {
  int port = 0;
  Child root = spawn_root(3, random_blob(128), 3.0, &port);
  Child a = spawn_peer(1, 3, port, 3.0);
  Child b = spawn_peer(1, 3, port, 3.0);
  const std::string r0 = finish(root), ra = finish(a), rb = finish(b);
  EXPECT_TRUE(has(r0, "ERR:") && has(r0, "rank 1 connected twice (from 127.0.0.1:")) << r0;
  EXPECT_TRUE(has(ra, "connected twice")) << ra;
  EXPECT_TRUE(has(rb, "connected twice")) << rb;
}

TEST(TcpBootstrap, NoRankZeroTimesOut) {
  const int port = free_port();
  const auto t0 = std::chrono::steady_clock::now();
  Child peer = spawn_peer(1, 2, port, 0.5);
  const std::string r1 = finish(peer);
  EXPECT_TRUE(has(r1, "rank 0 at 127.0.0.1:" + std::to_string(port) + " did not answer within 0.5 s") &&
              has(r1, "Connection refused")) << r1;
  EXPECT_LT(since(t0), 3.0);
}

TEST(TcpBootstrap, RankZeroWithAMissingPeerTimesOut) {
  int port = 0;
  const auto t0 = std::chrono::steady_clock::now();
  Child root = spawn_root(3, random_blob(128), 0.7, &port);
  Child peer = spawn_peer(1, 3, port, 3.0);
  const std::string r0 = finish(root), r1 = finish(peer);
  EXPECT_TRUE(has(r0, "only 2 of 3 ranks connected to rank 0 (port " + std::to_string(port) +
                          ") within 0.7 s (missing ranks 2)")) << r0;
  EXPECT_TRUE(has(r1, "failed the bootstrap") && has(r1, "only 2 of 3 ranks connected")) << r1;
  EXPECT_LT(since(t0), 3.0);
}

// Connects to rank 0 by hand and sends `bytes`; returns what rank 0 answered.
std::string raw_client(int port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  write_all(fd, bytes);
  ::shutdown(fd, SHUT_WR);
  std::string answer;
  char buf[1024];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) answer.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return answer;
}

TEST(TcpBootstrap, PeerSendingGarbage) {
  int port = 0;
  Child root = spawn_root(2, random_blob(128), 3.0, &port);
  const std::string answer = raw_client(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string r0 = finish(root);
  EXPECT_TRUE(has(r0, "the connection from 127.0.0.1:") && has(r0, "sent a bad hello (magic 0x47455420"))
      << r0;
  ASSERT_GE(answer.size(), 12u);  // an error frame: magic 'C2BS', version 1, status 1
  EXPECT_EQ(answer.substr(0, 4), "C2BS");
  EXPECT_TRUE(has(answer, "bad hello")) << answer;
}

TEST(TcpBootstrap, ShortHello) {
  int port = 0;
  Child root = spawn_root(2, random_blob(128), 3.0, &port);
  raw_client(port, "C2BS");
  const std::string r0 = finish(root);
  EXPECT_TRUE(has(r0, "closed after 4 of 16 hello bytes")) << r0;
}

TEST(TcpBootstrap, BlobOfTheWrongLength) {
  int port = 0;
  Child root = spawn_root(2, random_blob(64), 3.0, &port);
  Child peer = spawn_peer(1, 2, port, 3.0, 128);
  const std::string r0 = finish(root), r1 = finish(peer);
  EXPECT_TRUE(has(r1, "sent a 64-byte blob, expected 128")) << r1;
  EXPECT_TRUE(has(r0, "rank 1 at 127.0.0.1:") && has(r0, "of 8 acknowledgement bytes")) << r0;
}

TEST(TcpBootstrap, PortInUse) {
  TcpBootstrap first(0, 2, loopback(0), 1.0);
  try {
    TcpBootstrap second(0, 2, loopback(first.port()), 1.0);
    FAIL() << "two listeners on one port";
  } catch (const celo2::CommError& e) {
    EXPECT_TRUE(has(e.what(), "cannot listen on 127.0.0.1:" + std::to_string(first.port())) &&
                has(e.what(), "Address already in use") && has(e.what(), "CELO2_BOOTSTRAP_PORT"))
        << e.what();
  }
}

TEST(TcpBootstrap, BadArguments) {
  EXPECT_THROW(TcpBootstrap(2, 2, loopback(1234), 1.0), celo2::CommError);
  EXPECT_THROW(TcpBootstrap(1, 2, loopback(0), 1.0), celo2::CommError);  // a peer needs a port
  TcpBootstrap one(0, 1, loopback(0), 1.0);
  const std::vector<uint8_t> blob = random_blob(128);
  EXPECT_EQ(one.broadcast(blob, 128), blob);
  EXPECT_THROW(one.broadcast(blob, 128), celo2::CommError);  // once
}

// ------------------------------------------------------------ launcher variables

const char* kLauncherVars[] = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
    "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_RANK", "PMIX_SIZE", "PMI_RANK", "PMI_SIZE", "CELO2_BOOTSTRAP_ADDR", "CELO2_BOOTSTRAP_PORT",
    "CELO2_BOOTSTRAP_BIND", "CELO2_NCCL_BOOTSTRAP", "CELO2_SLURM_MPI"};

// In a child with exactly `vars` of the launcher variables set: "source rank size local"
// then " host:port bootstrap" (more than one rank), or "ERR:...".
std::string discover_with(std::vector<std::pair<std::string, std::string>> vars) {
  Child c = spawn([vars](int) {
    for (const char* v : kLauncherVars) ::unsetenv(v);
    for (const auto& [k, v] : vars) ::setenv(k.c_str(), v.c_str(), 1);
    celo2::param::reload();  // the tunables as this child's environment has them
    const celo2::LaunchInfo r = celo2::detect_launch();
    std::string s = r.launcher + " " + std::to_string(r.rank) + " " + std::to_string(r.size) + " " +
                    std::to_string(r.local_rank);
    if (r.size > 1) {
      const BootstrapEndpoint ep = celo2::discover_bootstrap_endpoint(r);
      s += " " + ep.host + ":" + std::to_string(ep.port) + (ep.bind_host.empty() ? "" : " bind=" + ep.bind_host);
    }
    return s + " " + celo2::choose_nccl_bootstrap(r, false);
  });
  return finish(c);
}

TEST(LauncherDiscovery, None) { EXPECT_EQ(discover_with({}), "none 0 1 0 tcp"); }

TEST(LauncherDiscovery, Torchrun) {
  const std::vector<std::pair<std::string, std::string>> torchrun = {
      {"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}};
  EXPECT_EQ(discover_with(torchrun), "torchrun 1 4 1 node0:29501 tcp");  // torch's store has 29500
  auto v = torchrun;
  v.push_back({"CELO2_BOOTSTRAP_ADDR", "10.0.0.5"});
  v.push_back({"CELO2_BOOTSTRAP_PORT", "31000"});
  v.push_back({"CELO2_BOOTSTRAP_BIND", "10.0.0.5"});
  EXPECT_EQ(discover_with(v), "torchrun 1 4 1 10.0.0.5:31000 bind=10.0.0.5 tcp");
  v = torchrun;
  v.erase(v.begin() + 3);  // no MASTER_ADDR
  const std::string no_addr = discover_with(v);
  EXPECT_TRUE(has(no_addr, "ERR:") && has(no_addr, "set CELO2_BOOTSTRAP_ADDR or MASTER_ADDR")) << no_addr;
  v = torchrun;
  v.pop_back();  // no MASTER_PORT: the default port
  EXPECT_EQ(discover_with(v), "torchrun 1 4 1 node0:" + std::to_string(celo2::kDefaultBootstrapPort) + " tcp");
  v = torchrun;
  v.back().second = "65535";
  EXPECT_TRUE(has(discover_with(v), "MASTER_PORT='65535' is not a TCP port"));
  v = torchrun;
  v[0].second = "x";
  EXPECT_TRUE(has(discover_with(v), "RANK='x' is not a valid rank"));
  v = torchrun;
  v[0].second = "4";
  EXPECT_TRUE(has(discover_with(v), "rank 4 is not below the world size 4"));
  // srun --mpi=pmix torchrun: 2 MPI tasks, 16 torchrun ranks -> TCP, not MPI.
  v = torchrun;
  v[1].second = "16";
  v.push_back({"PMIX_RANK", "0"});
  v.push_back({"SLURM_NTASKS", "2"});
  EXPECT_EQ(discover_with(v), "torchrun 1 16 1 node0:29501 tcp");
}

TEST(LauncherDiscovery, Slurm) {
  const std::vector<std::pair<std::string, std::string>> slurm = {
      {"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "3"}, {"SLURM_JOB_NODELIST", "gpu[003-010,015]"}};
  EXPECT_EQ(discover_with(slurm), "slurm 3 8 3 gpu003:29510 tcp");  // plain srun: no MPI
  auto v = slurm;
  v.push_back({"PMIX_RANK", "3"});  // srun --mpi=pmix: MPI carries the id
  EXPECT_EQ(discover_with(v), "slurm 3 8 3 gpu003:29510 mpi");
  v = slurm;
  v.back().second = "a1,b2";
  EXPECT_EQ(discover_with(v), "slurm 3 8 3 a1:29510 tcp");
  v.back().second = "rack[1-2]-n[01-04]";
  const std::string complex = discover_with(v);
  EXPECT_TRUE(has(complex, "ERR:") && has(complex, "set CELO2_BOOTSTRAP_ADDR")) << complex;
  v.push_back({"CELO2_BOOTSTRAP_ADDR", "rack1-n01"});
  v.push_back({"CELO2_BOOTSTRAP_PORT", "40000"});
  EXPECT_EQ(discover_with(v), "slurm 3 8 3 rack1-n01:40000 tcp");
}

TEST(LauncherDiscovery, OpenMpi) {
  const std::vector<std::pair<std::string, std::string>> ompi = {
      {"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
      {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}};
  EXPECT_EQ(discover_with(ompi), "openmpi 2 4 2 127.0.0.1:29510 mpi");
  auto v = ompi;
  v.push_back({"CELO2_NCCL_BOOTSTRAP", "tcp"});
  EXPECT_EQ(discover_with(v), "openmpi 2 4 2 127.0.0.1:29510 tcp");
  v.back().second = "carrier-pigeon";
  EXPECT_TRUE(has(discover_with(v), "CELO2_NCCL_BOOTSTRAP='carrier-pigeon': expected mpi, tcp or auto"));
  v = ompi;
  v.back().second = "2";  // two nodes, no address known
  const std::string multi = discover_with(v);
  EXPECT_TRUE(has(multi, "ERR:") && has(multi, "set CELO2_BOOTSTRAP_ADDR")) << multi;
}

TEST(LauncherDiscovery, TorchrunBeforeSlurmBeforeOpenMpi) {
  EXPECT_EQ(discover_with({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"SLURM_PROCID", "5"},
                           {"SLURM_NTASKS", "8"}, {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "3"}}),
            "torchrun 0 2 0 h:29510 tcp");  // MPI's 3 ranks are not these 2
  EXPECT_EQ(discover_with({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_JOB_NODELIST", "n1"},
                           {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "8"}}),
            "slurm 5 8 5 n1:29510 mpi");
}

}  // namespace
