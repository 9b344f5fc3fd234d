// The engine's worker thread (server/src/engine/serial_worker.h), which runs the gradient
// buckets of overlap_grad_reduce: tasks run in posting order on one other thread; a task
// that throws drops the ones after it and wait() rethrows its error once.
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../../server/src/engine/serial_worker.h"

namespace celo2::detail {
namespace {

TEST(SerialWorker, RunsTasksInOrderOnAnotherThread) {
  SerialWorker w;
  std::vector<int> order;
  std::atomic<bool> other_thread{true};
  const auto me = std::this_thread::get_id();
  for (int i = 0; i < 200; ++i)
    w.post([&, i] {
      if (std::this_thread::get_id() == me) other_thread = false;
      order.push_back(i);  // one thread: no lock needed
    });
  w.wait();
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(order[i], i);
  EXPECT_TRUE(other_thread);
  EXPECT_GE(w.take_busy_seconds(), 0.0);
  EXPECT_EQ(w.take_busy_seconds(), 0.0);  // taken
}

TEST(SerialWorker, AFailureDropsTheRestAndIsReportedOnce) {
  SerialWorker w;
  std::vector<int> ran;
  w.post([&] { ran.push_back(0); });
  w.post([&] { throw std::runtime_error("bucket 1 failed"); });
  w.post([&] { ran.push_back(2); });
  try {
    w.wait();
    FAIL() << "wait() did not rethrow";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "bucket 1 failed");
  }
  EXPECT_EQ(ran, std::vector<int>{0});
  w.wait();  // reported once: the worker is usable again
  w.post([&] { ran.push_back(3); });
  w.wait();
  EXPECT_EQ(ran, (std::vector<int>{0, 3}));
}

TEST(SerialWorker, WaitWithNothingPostedReturns) {
  SerialWorker w;
  w.wait();
}

}  // namespace
}  // namespace celo2::detail
