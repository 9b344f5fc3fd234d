// Internals of the control plane (celo2_control), shared by its three sources:
//   control.cc          ControlPlane and ControlCore: the queue, the step-boundary broadcast,
//                       applying commands, status and metrics (no gRPC transport here);
//   control_validate.cc everything a command is checked against before it is queued;
//   control_service.cc  the gRPC transport: server, TLS, bearer-token check, handlers.
//
// Threads: gRPC handler threads call ControlCore's RPC methods (rank 0 only); the trainer
// thread calls apply_pending/publish/finish. Only the trainer thread touches the Engine; the
// two sides meet under ControlCore::mu_.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "celo2/control.h"
#include "celo2/v1/control.pb.h"

namespace celo2::control {

namespace v1 = ::celo2::v1;
using Clock = std::chrono::steady_clock;

// The calling RPC's deadline and cancellation, as the core sees them.
struct CallInfo {
  Clock::time_point deadline = Clock::time_point::max();
  std::function<bool()> cancelled = [] { return false; };
};

// ---- validation (control_validate.cc) -------------------------------------------------
// Every function returns OK or INVALID_ARGUMENT (FAILED_PRECONDITION when the server is not
// configured for the request) with a message naming the problem. None touches an Engine.

// Untrusted text made safe for error messages: non-printable bytes as \xNN, at most
// max_chars. quoted() also escapes quotes and backslashes and wraps the result in '...'.
std::string printable(const std::string& s, size_t max_chars);
std::string quoted(const std::string& s, size_t max_chars = 120);

// `requested` (relative to root, or absolute) must resolve, symbolic links included, to a
// regular file inside `root` (already canonical). Reads it (at most max_bytes).
grpc::Status read_file_under_root(const std::filesystem::path& root, const std::string& requested,
                                  int64_t max_bytes, std::vector<uint8_t>* bytes,
                                  std::string* resolved);

// Weights bytes -> validated for `rule` (Theta::check_fits), their canonical re-encoding
// and a summary. Copies nothing of `bytes`; at most one decoded copy of the weights is alive
// at a time besides the encoding.
grpc::Status check_weights(std::span<const uint8_t> bytes, const std::string& source,
                           const RuleConfig& rule, std::string* canonical,
                           v1::WeightsSummary* summary);
void summarize_theta(const Theta& theta, v1::WeightsSummary* summary);

// SetScheduleRequest -> a validated ScheduleChange (at least one field set).
grpc::Status check_schedule_request(const v1::SetScheduleRequest& req, v1::ScheduleChange* out);
Schedule schedule_from_proto(const v1::Schedule& s);  // no validation
void schedule_to_proto(const Schedule& s, v1::Schedule* out);

// Rules text -> parsed rules.
grpc::Status check_rules(const std::string& text, LabelRules* rules);
// `rules` (optional): the text table then lists the rules that route no tensor.
void routing_table_to_proto(const std::vector<TensorDesc>& tensors,
                            const std::vector<Label>& labels, v1::RoutingTable* out,
                            const LabelRules* rules = nullptr);

// A checkpoint file name ([A-Za-z0-9._-], not starting with '.', at most 200 characters).
grpc::Status check_checkpoint_name(const std::string& name);

// Constant-time comparison of a presented token with the configured one (both hashed first,
// so neither the content nor the length leaks through timing).
bool token_matches(const std::string& presented, const std::string& expected);

// ---- the core (control.cc) --------------------------------------------------------------
class ControlCore {
 public:
  // Every rank. Rank 0 also validates the options that only it uses (throws on error).
  ControlCore(const ControlOptions& options, EngineControl& engine, std::vector<TensorDesc> tensors);

  // RPC side (rank 0, any thread).
  grpc::Status load_weights(const v1::LoadWeightsRequest& req, v1::LoadWeightsResponse* resp,
                            const CallInfo& call);
  grpc::Status set_schedule(const v1::SetScheduleRequest& req, v1::SetScheduleResponse* resp,
                            const CallInfo& call);
  grpc::Status set_label_rules(const v1::SetLabelRulesRequest& req, v1::SetLabelRulesResponse* resp,
                               const CallInfo& call);
  grpc::Status get_status(const v1::GetStatusRequest& req, v1::GetStatusResponse* resp);
  grpc::Status save_checkpoint(const v1::SaveCheckpointRequest& req,
                               v1::SaveCheckpointResponse* resp, const CallInfo& call);
  // Streams metrics through `write` (false: the client is gone) until the job ends, the
  // client leaves or max_messages were sent.
  grpc::Status watch_metrics(const v1::WatchMetricsRequest& req,
                             const std::function<bool(const v1::StepMetrics&)>& write,
                             const CallInfo& call);
  void count_request();
  void count_unauthenticated();

  // Trainer side.
  std::vector<AppliedChange> apply_pending(EngineControl& engine);
  void publish(EngineControl& engine, const StepReport& report, std::optional<double> loss);
  void finish();

 private:
  struct Pending;
  struct Outcome;
  class WeightsSlot;  // one LoadWeights at a time (control.cc)
  // Queue a validated command and wait until it is applied, withdrawn or the job ends.
  grpc::Status submit(v1::Command command, const CallInfo& call, std::shared_ptr<Pending>* done,
                      std::shared_ptr<Pending> pending = nullptr);
  grpc::Status reject(grpc::StatusCode code, const std::string& message);
  grpc::Status reject(grpc::Status status);
  // Rank 0, at a boundary: takes the queue; drops (and answers) commands that became invalid.
  std::vector<std::shared_ptr<Pending>> take_queue(int64_t step);
  // Every rank: applies one command; rank 0 fills `outcome`.
  void apply_one(EngineControl& engine, const v1::Command& command, Outcome* outcome,
                 std::vector<AppliedChange>* changes);
  void note_change(std::vector<AppliedChange>* changes, const char* setting, int64_t version,
                   int64_t step, std::string detail);

  ControlOptions opts_;
  const int rank_;
  const RuleConfig rule_;
  const std::vector<TensorDesc> tensors_;
  std::filesystem::path weights_root_;    // canonical; empty: path loading refused
  std::filesystem::path checkpoint_dir_;  // canonical; empty: checkpoints refused
  const Clock::time_point started_ = Clock::now();

  // Trainer thread only (every rank).
  v1::Versions versions_;
  Clock::time_point last_publish_ = Clock::now();

  // Shared (rank 0): guarded by mu_.
  std::mutex mu_;
  std::condition_variable applied_cv_;  // a pending command finished
  std::condition_variable metrics_cv_;  // a new StepMetrics (or the job ended)
  bool finished_ = false;
  uint64_t next_id_ = 0;
  std::deque<std::shared_ptr<Pending>> queue_;
  bool weights_busy_ = false;         // a LoadWeights is between arrival and answer
  Clock::time_point weights_since_;   // ... since then
  std::optional<Clock::time_point> trim_due_;  // publish() returns freed memory then
  v1::GetStatusResponse status_;  // everything but the control counters
  std::vector<Label> labels_;     // current labels (routing tables)
  v1::ControlCounters counters_;
  std::deque<v1::StepMetrics> ring_;  // the latest metrics, oldest first
  int64_t ring_first_seq_ = 0;        // sequence number of ring_.front()
  int64_t next_seq_ = 0;              // sequence number of the next message
};

// ---- the gRPC transport (control_service.cc) -------------------------------------------
class ControlServer {
 public:
  virtual ~ControlServer() = default;
  virtual int port() const = 0;
  virtual std::string address() const = 0;
  virtual void shutdown() = 0;  // health NOT_SERVING, then stop; idempotent
};
// Starts serving `core` (throws std::runtime_error naming the problem).
std::unique_ptr<ControlServer> start_control_server(const ControlOptions& options,
                                                    ControlCore& core);

}  // namespace celo2::control
