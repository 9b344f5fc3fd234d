// A small sharded-training loop whose chosen rank dies (SIGKILL) or hangs at a chosen step:
// run by tests/mpi/fault_test.sh to check that the other ranks stop with a clear error in
// bounded time instead of hanging. Usage: fault_main kill|hang RANK STEP
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "celo2/engine.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s kill|hang RANK STEP\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  const int bad_rank = std::atoi(argv[2]), bad_step = std::atoi(argv[3]);
  auto comm = std::shared_ptr<celo2::Communicator>(celo2::make_communicator("auto"));
  celo2::EngineOptions eo;
  celo2::Engine eng(eo, comm);
  std::vector<float> w(64 * 64), gw(64 * 64), b(64), gb(64);
  eng.add_tensor("w", {64, 64}, w.data(), gw.data());
  eng.add_tensor("b", {64}, b.data(), gb.data());
  std::mt19937 rng(comm->rank());
  std::normal_distribution<float> nd;
  for (int step = 0; step < 1000000; ++step) {
    if (comm->rank() == bad_rank && step == bad_step) {
      std::fprintf(stderr, "fault_main: rank %d %s at step %d\n", bad_rank, mode.c_str(), step);
      std::fflush(stderr);
      if (mode == "kill") std::raise(SIGKILL);
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    for (auto& x : gw) x = nd(rng);
    for (auto& x : gb) x = nd(rng);
    eng.step();
  }
  return 0;
}
