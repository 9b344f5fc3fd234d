// A one-rank job serving the control plane, in a process of its own so that a test (or a
// person) can measure its memory from outside while clients send it LoadWeights
// (control_service_test's LoadWeightsMemory, docs/OPERATIONS.md "Limits"). The rule's MLP is
// as large as asked, so a valid theta is large too (hidden 1024, 4 hidden layers: 12.7 MB);
// every tensor is routed to AdamW, so steps stay cheap however large the MLP is.
//
//   control_load_server HIDDEN LAYERS PORT_FILE     (token: CELO2_CONTROL_TOKEN)
//
// Writes the bound port into PORT_FILE once serving, steps every millisecond, answers the
// commands it reads on standard input (below), and exits when its standard input reaches end
// of file (the parent closed the pipe or died).
#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/control.h"
#include "celo2/engine.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s HIDDEN LAYERS PORT_FILE\n", argv[0]);
    return 2;
  }
  try {
    celo2::EngineOptions eo;
    eo.opt.rule.ff_hidden_size = std::atoi(argv[1]);
    eo.opt.rule.ff_hidden_layers = std::atoi(argv[2]);
    eo.opt.theta = celo2::Theta::random(eo.opt.rule, 1);
    eo.opt.rules = celo2::LabelRules::parse("* => adamw");
    celo2::Engine engine(eo, celo2::make_local_communicator());
    std::vector<float> w(64, 0.1f), gw(64, 0.01f);
    engine.add_tensor("w", {8, 8}, w.data(), gw.data());
    celo2::ControlOptions co;
    co.address = "127.0.0.1:0";
    celo2::ControlPlane control(co, engine, {{"w", {8, 8}}});
    {
      std::ofstream f(argv[3]);
      f << control.port() << "\n";
    }
    std::atomic<bool> stop{false};
    std::thread watch_stdin([&] {
      // Commands, one per line: "inuse" prints "inuse BYTES" (memory allocated and not
      // freed: mallinfo2's uordblks + hblkhd) on standard output; by hand, "trim"
      // (malloc_trim) and "stats" (malloc_stats, on standard error).
      std::string line;
      char c;
      while (::read(0, &c, 1) > 0) {
        if (c != '\n') {
          line += c;
          continue;
        }
        if (line == "inuse") {
          const struct mallinfo2 mi = ::mallinfo2();
          std::printf("inuse %zu\n", mi.uordblks + mi.hblkhd);
          std::fflush(stdout);
        }
        if (line == "trim") ::malloc_trim(0);
        if (line == "stats") ::malloc_stats();
        line.clear();
      }
      stop = true;
    });
    while (!stop) {
      control.apply_pending(engine);
      const celo2::StepReport r = engine.step();
      control.publish(engine, r, std::nullopt);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    watch_stdin.join();
    control.finish();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "control_load_server: %s\n", e.what());
    return 1;
  }
  return 0;
}
