// The control plane inside a training job (DESIGN.md "Control plane and data plane are
// separate"; API: proto/celo2/v1/control.proto). Rank 0 serves celo2.v1.Control and
// grpc.health.v1 over gRPC; the service never touches tensors. It validates each command
// completely when it arrives, then queues it. The trainer calls, on every rank:
//
//   ControlPlane control(options, engine, tensors);   // collective, after add_tensor()s
//   for (each step) {
//     control.apply_pending(engine);                   // collective, before engine.step()
//     StepReport r = engine.step();
//     control.publish(engine, r, loss);                // rank 0 records, others no-op
//   }
//   control.finish();
//
// apply_pending(): rank 0 takes the queue, serializes it (a celo2.v1.CommandBatch) and
// broadcasts it over the engine's communicator; every rank applies the same commands in the
// same order through the Engine setters, so every rank changes each setting at the same step
// and keeps the same version numbers. Rank 0 then answers the waiting RPCs with that step and
// the versions. One 8-byte broadcast per step when nothing is queued.
//
// Invariants: a command that fails validation changes nothing (INVALID_ARGUMENT naming the
// problem); a command withdrawn before a step boundary (deadline, cancel, job end) changes
// nothing; a missing or wrong bearer token (compared in constant time) changes nothing.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "celo2/engine.h"
#include "celo2/labels.h"
#include "celo2/optimizer.h"

namespace celo2 {

// One setting changed on this rank ("weights", "schedule", "mult_1d", "weight_decay",
// "rules", "checkpoint") and the version it now has. `step` is the number of updates done
// when it took effect: it governs update step+1 onwards.
struct AppliedChange {
  std::string setting;
  int64_t version = 0;
  int64_t step = 0;
  std::string detail;  // the new value in short: a checksum, the schedule text, a path
};

struct ControlOptions {
  // host:port, or just a port (then 127.0.0.1). Port 0 picks a free port (see port()).
  // Anything but a loopback address without TLS draws a warning: the token travels in clear.
  std::string address = "127.0.0.1:50051";
  // The bearer token: `token`, else the first line of `token_file`, else the environment
  // variable CELO2_CONTROL_TOKEN. Rank 0 only; an empty token refuses to start.
  std::string token;
  std::string token_file;
  // LoadWeights by path reads only regular files that resolve (symbolic links included)
  // inside this directory. Empty: only weights sent as bytes are accepted.
  std::string weights_root;
  // SaveCheckpoint writes only here. Empty: SaveCheckpoint is refused.
  std::string checkpoint_dir;
  // TLS: PEM certificate chain and key (both or neither). With tls_client_ca as well,
  // mutual TLS: clients must present a certificate signed by that CA.
  std::string tls_cert_file, tls_key_file, tls_client_ca_file;
  int64_t max_message_bytes = int64_t{16} << 20;  // largest request (and LoadWeights bytes)
  int max_watchers = 16;                          // concurrent WatchMetrics streams
  int max_threads = 64;                           // server threads (RESOURCE_EXHAUSTED beyond)
  int max_queued = 256;                           // commands waiting for a step boundary
  double max_wait_seconds = 600;  // a command whose call has no deadline waits at most this
  // Called on every rank for each setting it applies (e.g. to log "rank R applied ...").
  std::function<void(const AppliedChange&)> on_applied;
};

class ControlPlane {
 public:
  // Collective over engine.comm(): every rank, after the tensors are registered. `tensors`
  // are the registered tensors in registration order (for routing tables). Rank 0 reads the
  // token and starts the server; if anything fails there, every rank throws
  // std::runtime_error with rank 0's message.
  ControlPlane(ControlOptions options, EngineControl& engine, std::vector<TensorDesc> tensors);
  ~ControlPlane();  // finish()
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  int port() const;             // rank 0: the bound port; other ranks: 0
  std::string address() const;  // rank 0: host:port actually bound

  // Collective, once per step before engine.step(): every rank applies the queued commands
  // in order. Returns the settings this rank changed.
  std::vector<AppliedChange> apply_pending(EngineControl& engine);

  // After each step: the report and the loss the trainer measured (mean over ranks if it has
  // it). Rank 0 records them for GetStatus and WatchMetrics; other ranks return at once.
  void publish(EngineControl& engine, const StepReport& report, std::optional<double> loss);

  // The job is over (not collective): queued commands fail with UNAVAILABLE, metric streams
  // end, the server stops. Idempotent.
  void finish();

  // Rank 0: the status in the Prometheus text exposition format (version 0.0.4): step, lr,
  // loss, per-label update RMS and gradient norm, NaN skips, phase timings, communication
  // bytes, applied versions. Other ranks: empty. Thread-safe (the metrics server calls it).
  std::string prometheus_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A plain HTTP endpoint, GET /metrics -> render() as text/plain; version=0.0.4 (libmicrohttpd,
// its own thread). Binds 127.0.0.1 unless `address` names a host ("host:port" or "port";
// port 0 picks a free one). Anything but GET /metrics gets 404/405.
class MetricsServer {
 public:
  MetricsServer(const std::string& address, std::function<std::string()> render);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;
  int port() const { return port_; }
  struct Impl;  // libmicrohttpd state (control_metrics.cc)

 private:
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace celo2
