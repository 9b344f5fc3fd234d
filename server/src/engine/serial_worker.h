// Private to the engine: one background thread that runs posted tasks in the order they were
// posted (the gradient buckets' reduce-scatters that overlap the trainer's backward pass).
// A task that throws stops the queue: the tasks after it are dropped and wait() rethrows
// its exception, so a failed collective is reported once and no later bucket runs out of
// order.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace celo2::detail {

class SerialWorker {
 public:
  SerialWorker() : thread_([this] { loop(); }) {}
  ~SerialWorker() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();  // a task stuck in a collective ends with the transport's timeout
  }
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  void post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_all();
  }

  // Blocks until every posted task has run (or was dropped after a failure); rethrows the
  // first failure, once.
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return queue_.empty() && !running_; });
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  // Seconds spent running tasks since the last call (call between wait() and the next post).
  double take_busy_seconds() {
    std::lock_guard<std::mutex> lk(mu_);
    const double s = busy_s_;
    busy_s_ = 0;
    return s;
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      if (error_) {  // a task failed: drop the rest
        if (queue_.empty()) done_cv_.notify_all();
        continue;
      }
      running_ = true;
      lk.unlock();
      const auto t0 = std::chrono::steady_clock::now();
      std::exception_ptr err;
      try {
        task();
      } catch (...) {
        err = std::current_exception();
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      lk.lock();
      running_ = false;
      busy_s_ += s;
      if (err && !error_) error_ = err;
      if (queue_.empty()) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::function<void()>> queue_;
  bool running_ = false, stop_ = false;
  std::exception_ptr error_;
  double busy_s_ = 0;
  std::thread thread_;  // last: started after the members it uses
};

}  // namespace celo2::detail
