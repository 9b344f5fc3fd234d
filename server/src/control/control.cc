// The control plane's core (control_impl.h): the command queue, the step-boundary broadcast
// that makes every rank apply the same commands at the same step, status and metrics. The
// gRPC transport is in control_service.cc, validation in control_validate.cc.
#include <malloc.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "celo2/flax_msgpack.h"
#include "celo2/schedule.h"
#include "celo2/theta_io.h"
#include "control_impl.h"

namespace celo2::control {

namespace fs = std::filesystem;

namespace {

constexpr size_t kRingSize = 1024;         // metrics kept for slow watchers
constexpr size_t kMaxMessageChars = 2000;  // error messages returned to clients

const char* const kLabelNames[3] = {"celo2", "adamw", "frozen"};

std::string format_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

}  // namespace

// A queued command and, once applied, how it went. Guarded by ControlCore::mu_.
struct ControlCore::Outcome {
  grpc::Status status;
  v1::Applied applied;
  std::string checkpoint_path;
  int64_t checkpoint_bytes = 0;
};

struct ControlCore::Pending {
  v1::Command command;
  v1::WeightsSummary weights;   // LoadWeights: what was validated
  std::string checkpoint_name;  // SaveCheckpoint: empty = named at the boundary
  bool checkpoint_overwrite = false;
  bool taken = false;  // taken by the trainer: can no longer be withdrawn
  bool done = false;
  Outcome outcome;
};

ControlCore::ControlCore(const ControlOptions& options, EngineControl& engine,
                         std::vector<TensorDesc> tensors)
    : opts_(options),
      rank_(engine.rank()),
      rule_(engine.optimizer_options().rule),
      tensors_(std::move(tensors)) {
  if (tensors_.size() != engine.num_tensors())
    throw std::invalid_argument("control plane: " + std::to_string(tensors_.size()) +
                                " tensor descriptions for an engine with " +
                                std::to_string(engine.num_tensors()) + " tensors");
  if (rank_ != 0) return;
  if (!opts_.weights_root.empty()) {
    std::error_code ec;
    weights_root_ = fs::canonical(opts_.weights_root, ec);
    if (ec || !fs::is_directory(weights_root_))
      throw std::invalid_argument("weights root '" + opts_.weights_root + "' is not a directory");
  }
  if (!opts_.checkpoint_dir.empty()) {
    std::error_code ec;
    checkpoint_dir_ = fs::canonical(opts_.checkpoint_dir, ec);
    if (ec || !fs::is_directory(checkpoint_dir_))
      throw std::invalid_argument("checkpoint directory '" + opts_.checkpoint_dir +
                                  "' is not a directory");
    // What a checkpoint killed mid-write (a previous run of this job) left behind.
    std::vector<std::string> removed;
    try {
      removed = flax::remove_orphan_temp_files(checkpoint_dir_.string());
    } catch (const flax::IoError& e) {
      throw std::invalid_argument("checkpoint directory '" + opts_.checkpoint_dir +
                                  "': " + e.what());
    }
    for (const std::string& name : removed)
      std::fprintf(stderr, "control: removed %s/%s, left by an interrupted checkpoint\n",
                   checkpoint_dir_.c_str(), name.c_str());
  }
  if (opts_.max_message_bytes < 1024 || opts_.max_queued < 1 || opts_.max_watchers < 0)
    throw std::invalid_argument("control plane: bad limits");

  // The settings the job started with.
  const OptimizerOptions& o = engine.optimizer_options();
  status_.set_state("running");
  status_.set_world_size(engine.world_size());
  status_.set_comm_backend(engine.comm().backend());
  status_.set_step(engine.step_count());
  status_.set_skipped_steps(engine.skipped_steps());
  schedule_to_proto(o.schedule, status_.mutable_schedule());
  status_.set_lr(o.schedule.at(engine.step_count()));
  status_.set_mult_1d(o.mult_1d);
  status_.set_weight_decay(o.weight_decay);
  status_.set_max_grad_norm(o.max_grad_norm);
  status_.set_rules(o.rules.to_string());
  const std::vector<uint8_t> theta = theta_to_bytes(o.theta);
  v1::WeightsSummary* w = status_.mutable_weights();
  w->set_sha256(sha256_hex(theta));
  w->set_canonical_sha256(w->sha256());
  w->set_bytes(static_cast<int64_t>(theta.size()));
  w->set_source("initial");
  summarize_theta(o.theta, w);
  *status_.mutable_versions() = versions_;
  for (size_t i = 0; i < engine.num_tensors(); ++i) labels_.push_back(engine.label_of(i));
}

grpc::Status ControlCore::reject(grpc::StatusCode code, const std::string& message) {
  return reject(grpc::Status(code, message));
}

grpc::Status ControlCore::reject(grpc::Status status) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    counters_.set_rejected(counters_.rejected() + 1);
  }
  // Messages may quote hostile input: printable and bounded before they leave.
  return grpc::Status(status.error_code(), printable(status.error_message(), kMaxMessageChars));
}

void ControlCore::count_request() {
  std::lock_guard<std::mutex> lk(mu_);
  counters_.set_requests(counters_.requests() + 1);
}

void ControlCore::count_unauthenticated() {
  std::lock_guard<std::mutex> lk(mu_);
  counters_.set_unauthenticated(counters_.unauthenticated() + 1);
}

grpc::Status ControlCore::submit(v1::Command command, const CallInfo& call,
                                 std::shared_ptr<Pending>* done, std::shared_ptr<Pending> p) {
  if (!p) p = std::make_shared<Pending>();
  p->command = std::move(command);
  std::unique_lock<std::mutex> lk(mu_);
  if (finished_)
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "the job has finished; the command was not applied");
  if (queue_.size() >= static_cast<size_t>(opts_.max_queued))
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "too many commands are waiting for the next step; try again");
  p->command.set_id(++next_id_);
  queue_.push_back(p);
  const Clock::time_point limit = std::min(
      call.deadline, Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(opts_.max_wait_seconds)));
  auto withdraw = [&](grpc::StatusCode code, const std::string& why) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), p));
    counters_.set_withdrawn(counters_.withdrawn() + 1);
    return grpc::Status(code, why + "; the command was withdrawn and nothing changed");
  };
  while (!p->done) {
    if (p->taken && finished_)  // the job ended (or failed) in the middle of applying it
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the job ended while the command was being applied; check the status "
                          "of a restarted job before retrying");
    if (!p->taken) {
      if (call.cancelled()) return withdraw(grpc::StatusCode::CANCELLED, "the call was cancelled");
      if (Clock::now() >= limit)
        return withdraw(grpc::StatusCode::DEADLINE_EXCEEDED,
                        "no step boundary was reached before the deadline (is the job "
                        "stepping?)");
    }
    // Short waits: cancellation is polled, not signalled.
    applied_cv_.wait_until(lk, std::min(limit, Clock::now() + std::chrono::milliseconds(50)));
  }
  *done = p;
  return p->outcome.status;
}

namespace {

// Returns the memory that a weight load freed to the system. glibc serves blocks of a few MB
// from its arenas once its mmap threshold has risen (it follows the largest block freed), and
// keeps them resident after free; malloc_trim returns the free pages of every arena (not the
// free top of a thread's arena: docs/OPERATIONS.md "Limits"). Measured: the RSS left after
// rounds of four concurrent 12.7 MB loads halved with it.
void release_freed_memory() {
#if defined(__GLIBC__)
  ::malloc_trim(0);
#endif
}

}  // namespace

// One LoadWeights at a time (issue 14 D4): a weight load holds several copies of the weights
// (the request, the decoded tree, the Theta, the canonical encoding) until it is applied at a
// step boundary; concurrent loads multiplied that. A second load is refused at once instead
// of queueing behind the first: loads are rare operator actions, and a prompt "busy" is
// easier to reason about than a wait of up to a step boundary.
class ControlCore::WeightsSlot {
 public:
  explicit WeightsSlot(ControlCore& core) : core_(core) {
    std::lock_guard<std::mutex> lk(core_.mu_);
    if (core_.weights_busy_) {
      busy_for_ = std::chrono::duration<double>(Clock::now() - core_.weights_since_).count();
      return;
    }
    core_.weights_busy_ = true;
    core_.weights_since_ = Clock::now();
    held_ = true;
  }
  ~WeightsSlot() {
    std::lock_guard<std::mutex> lk(core_.mu_);
    if (held_) core_.weights_busy_ = false;
    // gRPC frees the request's bytes only after the handler returns: the trainer thread
    // returns the memory to the system a little later (publish()).
    core_.trim_due_ = Clock::now() + std::chrono::milliseconds(200);
  }
  bool held() const { return held_; }
  double busy_for() const { return busy_for_; }

 private:
  ControlCore& core_;
  bool held_ = false;
  double busy_for_ = 0;
};

grpc::Status ControlCore::load_weights(const v1::LoadWeightsRequest& req,
                                       v1::LoadWeightsResponse* resp, const CallInfo& call) {
  const WeightsSlot slot(*this);  // destroyed last: after every buffer below is freed
  if (!slot.held()) {
    char since[32];
    std::snprintf(since, sizeof since, "%.1f", slot.busy_for());
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        std::string("another LoadWeights is in progress (for ") + since +
                            " s); weights are loaded one at a time to bound the server's "
                            "memory: retry once it has been answered");
  }
  std::vector<uint8_t> file_bytes;  // a path: the file's bytes; data: none (no copy)
  std::span<const uint8_t> bytes;
  std::string source;
  switch (req.source_case()) {
    case v1::LoadWeightsRequest::kPath: {
      if (weights_root_.empty())
        return reject(grpc::StatusCode::FAILED_PRECONDITION,
                      "this job has no weights root (--weights-root): send the bytes instead");
      grpc::Status s = read_file_under_root(weights_root_, req.path(), opts_.max_message_bytes,
                                            &file_bytes, &source);
      if (!s.ok()) return reject(s);
      bytes = file_bytes;
      break;
    }
    case v1::LoadWeightsRequest::kData:
      bytes = {reinterpret_cast<const uint8_t*>(req.data().data()), req.data().size()};
      source = "request bytes";
      break;
    default:
      return reject(grpc::StatusCode::INVALID_ARGUMENT, "LoadWeights: give a path or the bytes");
  }
  auto p = std::make_shared<Pending>();
  std::string canonical;
  grpc::Status s = check_weights(bytes, source, rule_, &canonical, &p->weights);
  std::vector<uint8_t>().swap(file_bytes);  // not needed while the command waits
  if (!s.ok()) return reject(s);
  v1::Command c;
  c.set_weights(std::move(canonical));
  std::shared_ptr<Pending> done;
  s = submit(std::move(c), call, &done, p);
  if (!s.ok()) return s;
  *resp->mutable_applied() = done->outcome.applied;
  *resp->mutable_summary() = done->weights;
  return s;
}

grpc::Status ControlCore::set_schedule(const v1::SetScheduleRequest& req,
                                       v1::SetScheduleResponse* resp, const CallInfo& call) {
  v1::Command c;
  grpc::Status s = check_schedule_request(req, c.mutable_schedule());
  if (!s.ok()) return reject(s);
  std::shared_ptr<Pending> done;
  s = submit(std::move(c), call, &done);
  if (!s.ok()) return s;
  *resp->mutable_applied() = done->outcome.applied;
  std::lock_guard<std::mutex> lk(mu_);
  *resp->mutable_schedule() = status_.schedule();
  resp->set_mult_1d(status_.mult_1d());
  resp->set_weight_decay(status_.weight_decay());
  resp->set_max_grad_norm(status_.max_grad_norm());
  return s;
}

grpc::Status ControlCore::set_label_rules(const v1::SetLabelRulesRequest& req,
                                          v1::SetLabelRulesResponse* resp, const CallInfo& call) {
  LabelRules rules;
  grpc::Status s = check_rules(req.rules(), &rules);
  if (!s.ok()) return reject(s);
  std::vector<Label> labels;
  try {
    labels = rules.assign(tensors_);
  } catch (const std::exception& e) {
    return reject(grpc::StatusCode::INVALID_ARGUMENT, std::string("label rules: ") + e.what());
  }
  routing_table_to_proto(tensors_, labels, resp->mutable_table(), &rules);
  resp->set_rules(rules.to_string());
  resp->set_dry_run(req.dry_run());
  if (req.dry_run()) return grpc::Status::OK;
  v1::Command c;
  c.set_rules(req.rules());
  std::shared_ptr<Pending> done;
  s = submit(std::move(c), call, &done);
  if (!s.ok()) return s;
  *resp->mutable_applied() = done->outcome.applied;
  return s;
}

grpc::Status ControlCore::save_checkpoint(const v1::SaveCheckpointRequest& req,
                                          v1::SaveCheckpointResponse* resp, const CallInfo& call) {
  if (checkpoint_dir_.empty())
    return reject(grpc::StatusCode::FAILED_PRECONDITION,
                  "this job has no checkpoint directory (--checkpoint-dir)");
  grpc::Status s = check_checkpoint_name(req.name());
  if (!s.ok()) return reject(s);
  if (!req.name().empty()) {
    const fs::path path = checkpoint_dir_ / req.name();
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(path, ec);
    if (fs::exists(st)) {
      if (!fs::is_regular_file(st))
        return reject(grpc::StatusCode::INVALID_ARGUMENT,
                      "checkpoint " + quoted(req.name()) + " exists and is not a regular file");
      if (!req.overwrite())
        return reject(grpc::StatusCode::ALREADY_EXISTS,
                      "checkpoint " + quoted(req.name()) + " exists (set overwrite to replace it)");
    }
  }
  auto p = std::make_shared<Pending>();
  p->checkpoint_name = req.name();
  p->checkpoint_overwrite = req.overwrite();
  v1::Command c;
  c.set_checkpoint_path("");  // named at the step boundary (take_queue)
  std::shared_ptr<Pending> done;
  s = submit(std::move(c), call, &done, p);
  if (!s.ok()) return s;
  *resp->mutable_applied() = done->outcome.applied;
  resp->set_path(done->outcome.checkpoint_path);
  resp->set_bytes(done->outcome.checkpoint_bytes);
  return s;
}

grpc::Status ControlCore::get_status(const v1::GetStatusRequest& req, v1::GetStatusResponse* resp) {
  std::lock_guard<std::mutex> lk(mu_);
  *resp = status_;
  v1::ControlCounters* c = resp->mutable_control();
  *c = counters_;
  c->set_pending(static_cast<int32_t>(queue_.size()));
  resp->set_uptime_seconds(std::chrono::duration<double>(Clock::now() - started_).count());
  if (req.include_routing_table())
    routing_table_to_proto(tensors_, labels_, resp->mutable_routing_table());
  return grpc::Status::OK;
}

grpc::Status ControlCore::watch_metrics(const v1::WatchMetricsRequest& req,
                                        const std::function<bool(const v1::StepMetrics&)>& write,
                                        const CallInfo& call) {
  if (req.every() < 0 || req.max_messages() < 0)
    return reject(grpc::StatusCode::INVALID_ARGUMENT, "every and max_messages must be >= 0");
  const int64_t every = std::max<int64_t>(1, req.every());
  std::unique_lock<std::mutex> lk(mu_);
  if (counters_.watchers() >= opts_.max_watchers)
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        "too many metric streams open (" + std::to_string(opts_.max_watchers) + ")");
  counters_.set_watchers(counters_.watchers() + 1);
  struct Leave {  // however the stream ends: one watcher fewer, counted under mu_
    ControlCore* core;
    std::unique_lock<std::mutex>& lk;
    ~Leave() {
      if (!lk.owns_lock()) lk.lock();
      core->counters_.set_watchers(core->counters_.watchers() - 1);
    }
  };
  int64_t seq = next_seq_, dropped = 0, sent = 0;
  std::vector<v1::StepMetrics> batch;
  Leave leave{this, lk};
  while (true) {
    metrics_cv_.wait_for(lk, std::chrono::milliseconds(100),
                         [&] { return next_seq_ > seq || finished_; });
    if (call.cancelled() || Clock::now() >= call.deadline) return grpc::Status::OK;
    if (seq < ring_first_seq_) {
      dropped += ring_first_seq_ - seq;
      seq = ring_first_seq_;
    }
    batch.clear();
    for (; seq < next_seq_; ++seq) {
      const v1::StepMetrics& m = ring_[static_cast<size_t>(seq - ring_first_seq_)];
      if (m.step() % every == 0) batch.push_back(m);
    }
    const bool finished = finished_;
    if (batch.empty() && finished) return grpc::Status::OK;
    lk.unlock();  // never hold the lock while a slow client drains
    bool gone = false;
    for (v1::StepMetrics& m : batch) {
      m.set_dropped(dropped);
      if (!write(m)) {
        gone = true;
        break;
      }
      if (req.max_messages() > 0 && ++sent >= req.max_messages()) {
        lk.lock();
        return grpc::Status::OK;
      }
    }
    lk.lock();
    if (gone) return grpc::Status::OK;
  }
}

// ---------------------------------------------------------------------------------------
// Trainer side.

std::vector<std::shared_ptr<ControlCore::Pending>> ControlCore::take_queue(int64_t step) {
  std::vector<std::shared_ptr<Pending>> batch;
  std::lock_guard<std::mutex> lk(mu_);
  while (!queue_.empty()) {
    std::shared_ptr<Pending> p = std::move(queue_.front());
    queue_.pop_front();
    p->taken = true;
    if (p->command.kind_case() == v1::Command::kCheckpointPath) {
      // Named now that the step is known; existence checked again (another queued command
      // may have taken the name).
      const std::string name = p->checkpoint_name.empty()
                                   ? "celo2-step" + std::to_string(step) + ".state"
                                   : p->checkpoint_name;
      const fs::path path = checkpoint_dir_ / name;
      std::error_code ec;
      const fs::file_status st = fs::symlink_status(path, ec);
      if (fs::exists(st) && (!p->checkpoint_overwrite || !fs::is_regular_file(st))) {
        p->outcome.status = grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                                         "checkpoint " + quoted(name) + " exists");
        p->done = true;
        continue;
      }
      p->command.set_checkpoint_path(path.string());
    }
    batch.push_back(std::move(p));
  }
  applied_cv_.notify_all();  // taken commands can no longer be withdrawn
  return batch;
}

void ControlCore::note_change(std::vector<AppliedChange>* changes, const char* setting,
                              int64_t version, int64_t step, std::string detail) {
  AppliedChange c{setting, version, step, std::move(detail)};
  if (opts_.on_applied) opts_.on_applied(c);
  changes->push_back(std::move(c));
}

void ControlCore::apply_one(EngineControl& engine, const v1::Command& c, Outcome* out,
                            std::vector<AppliedChange>* changes) {
  const int64_t step = engine.step_count();
  grpc::Status status;
  try {
    switch (c.kind_case()) {
      case v1::Command::kWeights: {
        const std::string& b = c.weights();
        Theta theta = theta_from_bytes({reinterpret_cast<const uint8_t*>(b.data()), b.size()},
                                       engine.optimizer_options().rule);
        engine.set_theta(std::move(theta));
        versions_.set_weights(versions_.weights() + 1);
        note_change(changes, "weights", versions_.weights(), step,
                    "sha256 " + sha256_hex({reinterpret_cast<const uint8_t*>(b.data()), b.size()}));
        break;
      }
      case v1::Command::kSchedule: {
        const v1::ScheduleChange& s = c.schedule();
        if (s.has_schedule()) {
          const Schedule sched = schedule_from_proto(s.schedule());
          engine.set_schedule(sched);
          versions_.set_schedule(versions_.schedule() + 1);
          note_change(changes, "schedule", versions_.schedule(), step, sched.to_string());
        }
        if (s.has_mult_1d()) {
          engine.set_mult_1d(s.mult_1d());
          versions_.set_mult_1d(versions_.mult_1d() + 1);
          note_change(changes, "mult_1d", versions_.mult_1d(), step, format_number(s.mult_1d()));
        }
        if (s.has_weight_decay()) {
          engine.set_weight_decay(s.weight_decay());
          versions_.set_weight_decay(versions_.weight_decay() + 1);
          note_change(changes, "weight_decay", versions_.weight_decay(), step,
                      format_number(s.weight_decay()));
        }
        if (s.has_max_grad_norm()) {
          engine.set_max_grad_norm(s.max_grad_norm());
          versions_.set_max_grad_norm(versions_.max_grad_norm() + 1);
          note_change(changes, "max_grad_norm", versions_.max_grad_norm(), step,
                      format_number(s.max_grad_norm()));
        }
        break;
      }
      case v1::Command::kRules: {
        const LabelRules rules = LabelRules::parse(c.rules());
        engine.set_rules(rules);
        versions_.set_rules(versions_.rules() + 1);
        std::string text = rules.to_string();  // one rule per line: one line here
        while (!text.empty() && text.back() == '\n') text.pop_back();
        for (size_t at; (at = text.find('\n')) != std::string::npos;) text.replace(at, 1, "; ");
        note_change(changes, "rules", versions_.rules(), step, text);
        break;
      }
      case v1::Command::kCheckpointPath: {
        // Collective; rank 0 writes. Rank 0 then tells every rank whether it worked, so the
        // checkpoint count stays the same everywhere.
        std::string error;
        try {
          engine.save_state(c.checkpoint_path());
        } catch (const std::exception& e) {
          error = e.what();
        }
        int32_t ok = error.empty() ? 1 : 0;
        engine.comm().broadcast(&ok, sizeof ok, 0);
        if (!ok) {
          status =
              grpc::Status(grpc::StatusCode::INTERNAL,
                           "checkpoint " + quoted(c.checkpoint_path(), 400) + " failed: " + error);
          break;
        }
        versions_.set_checkpoints(versions_.checkpoints() + 1);
        note_change(changes, "checkpoint", versions_.checkpoints(), step, c.checkpoint_path());
        if (rank_ == 0) {
          struct stat st {};
          out->checkpoint_path = c.checkpoint_path();
          if (::stat(c.checkpoint_path().c_str(), &st) == 0) out->checkpoint_bytes = st.st_size;
        }
        break;
      }
      default:
        status = grpc::Status(grpc::StatusCode::INTERNAL, "unknown command");
    }
  } catch (const std::exception& e) {
    // Validation on arrival makes this unreachable in practice; every rank would fail alike.
    status = grpc::Status(grpc::StatusCode::INTERNAL, std::string("applying failed: ") + e.what());
  }
  if (status.ok()) versions_.set_commands(versions_.commands() + 1);
  if (rank_ != 0) return;
  out->status = status;
  out->applied.set_step(step);
  *out->applied.mutable_versions() = versions_;
}

std::vector<AppliedChange> ControlCore::apply_pending(EngineControl& engine) {
  std::vector<AppliedChange> changes;
  const int64_t step = engine.step_count();
  std::vector<std::shared_ptr<Pending>> batch;
  // Rank 0 moves the queued commands into `cb` (a weights command carries the whole theta:
  // no copy) and, with other ranks, sends its encoding; the others decode it.
  v1::CommandBatch cb;
  std::string wire;
  if (rank_ == 0) {
    batch = take_queue(step);
    for (const auto& p : batch) *cb.add_commands() = std::move(p->command);
    if (engine.world_size() > 1 && !batch.empty()) wire = cb.SerializeAsString();
  }
  Communicator& comm = engine.comm();
  if (engine.world_size() > 1) {
    int64_t size = static_cast<int64_t>(wire.size());  // commands have ids: never 0 bytes
    comm.broadcast(&size, sizeof size, 0);
    if (size == 0) return changes;
    wire.resize(static_cast<size_t>(size));
    comm.broadcast(wire.data(), size, 0);
    // Our own encoding: a failure here means corrupted transport.
    if (rank_ != 0 && !cb.ParseFromString(wire))
      throw std::runtime_error("control plane: rank " + std::to_string(rank_) +
                               " received a command batch it cannot parse");
    std::string().swap(wire);
  } else if (batch.empty()) {
    return changes;
  }
  bool weights_changed = false;
  std::vector<Outcome> outcomes(static_cast<size_t>(cb.commands_size()));
  std::vector<v1::Command::KindCase> kinds;
  for (int i = 0; i < cb.commands_size(); ++i) {
    kinds.push_back(cb.commands(i).kind_case());
    apply_one(engine, cb.commands(i), &outcomes[static_cast<size_t>(i)], &changes);
    if (kinds.back() == v1::Command::kWeights) {
      weights_changed = true;
      cb.mutable_commands(i)->clear_weights();  // the engine holds its own Theta now
    }
  }
  if (weights_changed) release_freed_memory();
  if (rank_ != 0) return changes;

  // Rank 0: record the new settings and answer the waiting calls.
  const OptimizerOptions& o = engine.optimizer_options();
  std::vector<Label> labels;
  for (size_t i = 0; i < engine.num_tensors(); ++i) labels.push_back(engine.label_of(i));
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < batch.size(); ++i) {
    Pending& p = *batch[i];
    p.outcome = std::move(outcomes[i]);
    const v1::Command::KindCase kind = kinds[i];
    if (p.outcome.status.ok()) {
      counters_.set_applied(counters_.applied() + 1);
      if (kind == v1::Command::kWeights) *status_.mutable_weights() = p.weights;
      if (kind == v1::Command::kCheckpointPath)
        status_.set_last_checkpoint(p.outcome.checkpoint_path);
    }
    p.done = true;
  }
  schedule_to_proto(o.schedule, status_.mutable_schedule());
  status_.set_mult_1d(o.mult_1d);
  status_.set_weight_decay(o.weight_decay);
  status_.set_max_grad_norm(o.max_grad_norm);
  status_.set_rules(o.rules.to_string());
  *status_.mutable_versions() = versions_;
  labels_ = std::move(labels);
  applied_cv_.notify_all();
  return changes;
}

void ControlCore::publish(EngineControl& engine, const StepReport& r, std::optional<double> loss) {
  if (rank_ != 0) return;
  const Clock::time_point now = Clock::now();
  const double step_seconds = std::chrono::duration<double>(now - last_publish_).count();
  last_publish_ = now;
  v1::StepMetrics m;
  m.set_step(r.step);
  m.set_lr(r.lr);
  if (loss && std::isfinite(*loss)) m.set_loss(*loss);
  for (int l = 0; l < 3; ++l) {
    v1::LabelMetrics* lm = m.add_labels();
    lm->set_label(kLabelNames[l]);
    lm->set_update_rms(r.update_rms[l]);
    lm->set_grad_norm(r.grad_norm[l]);
  }
  m.set_skipped(r.skipped);
  m.set_grad_norm(r.grad_norm_total);
  m.set_skipped_steps(engine.skipped_steps());
  m.set_step_seconds(step_seconds);
  *m.mutable_versions() = versions_;
  const PhaseStats& ph = engine.last_phase_stats();
  const auto counters = engine.comm().counters();

  std::unique_lock<std::mutex> lk(mu_);
  status_.set_step(engine.step_count());
  status_.set_lr(r.lr);
  if (m.has_loss())
    status_.set_loss(m.loss());
  else
    status_.clear_loss();
  *status_.mutable_labels() = m.labels();
  status_.set_skipped_steps(engine.skipped_steps());
  status_.set_nonfinite_last(r.nonfinite);
  status_.set_grad_norm(r.grad_norm_total);
  status_.set_step_seconds(step_seconds);
  status_.clear_phases();
  for (const auto& [name, seconds] : ph.seconds) {
    v1::PhaseTiming* t = status_.add_phases();
    t->set_phase(name);
    t->set_seconds(seconds);
    const auto b = ph.bytes.find(name);
    t->set_bytes(b == ph.bytes.end() ? 0 : b->second);
  }
  status_.clear_comm();
  for (const auto& [op, c] : counters) {
    v1::CommCounter* cc = status_.add_comm();
    cc->set_op(op);
    cc->set_calls(c.calls);
    cc->set_bytes(c.bytes);
  }
  ring_.push_back(std::move(m));
  ++next_seq_;
  if (ring_.size() > kRingSize) {
    ring_.pop_front();
    ++ring_first_seq_;
  }
  metrics_cv_.notify_all();
  if (trim_due_ && now >= *trim_due_) {
    trim_due_.reset();
    lk.unlock();
    release_freed_memory();
  }
}

void ControlCore::finish() {
  std::lock_guard<std::mutex> lk(mu_);
  if (finished_) return;
  finished_ = true;
  status_.set_state("finished");
  for (auto& p : queue_) {
    p->taken = true;
    p->done = true;
    p->outcome.status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "the job finished before the next step; the command was "
                                     "not applied");
    counters_.set_withdrawn(counters_.withdrawn() + 1);
  }
  queue_.clear();
  applied_cv_.notify_all();
  metrics_cv_.notify_all();
}

}  // namespace celo2::control

// ---------------------------------------------------------------------------------------
// The public face (control.h).
namespace celo2 {

struct ControlPlane::Impl {
  std::unique_ptr<control::ControlCore> core;
  std::unique_ptr<control::ControlServer> server;  // rank 0
};

ControlPlane::ControlPlane(ControlOptions options, EngineControl& engine, std::vector<TensorDesc> tensors)
    : impl_(std::make_unique<Impl>()) {
  // Rank 0 may fail (bad options, port taken, unreadable token); every rank must learn it,
  // or the others would wait forever in the first step's broadcast. So: agree on whether
  // any rank failed, then share rank 0's message.
  std::string error;
  try {
    impl_->core = std::make_unique<control::ControlCore>(options, engine, std::move(tensors));
    if (engine.rank() == 0) impl_->server = control::start_control_server(options, *impl_->core);
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  double failed = error.empty() ? 0.0 : 1.0;
  if (engine.world_size() > 1) engine.comm().all_reduce_sum(&failed, 1);
  if (failed == 0.0) return;
  std::string root_error = error;
  if (engine.world_size() > 1) {
    int64_t n = static_cast<int64_t>(root_error.size());
    engine.comm().broadcast(&n, sizeof n, 0);
    root_error.resize(static_cast<size_t>(n));
    if (n > 0) engine.comm().broadcast(root_error.data(), n, 0);
  }
  if (impl_->server) impl_->server->shutdown();
  throw std::runtime_error("control plane: " + (!root_error.empty() ? root_error
                                                : !error.empty()
                                                    ? error
                                                    : std::string("failed on another rank")));
}

ControlPlane::~ControlPlane() { finish(); }

int ControlPlane::port() const { return impl_->server ? impl_->server->port() : 0; }
std::string ControlPlane::address() const { return impl_->server ? impl_->server->address() : ""; }

std::vector<AppliedChange> ControlPlane::apply_pending(EngineControl& engine) {
  return impl_->core->apply_pending(engine);
}

void ControlPlane::publish(EngineControl& engine, const StepReport& report, std::optional<double> loss) {
  impl_->core->publish(engine, report, loss);
}

void ControlPlane::finish() {
  if (!impl_ || !impl_->core) return;
  impl_->core->finish();
  if (impl_->server) impl_->server->shutdown();
}

}  // namespace celo2

namespace celo2 {

std::string render_prometheus(const v1::GetStatusResponse& status);  // control_metrics.cc

std::string ControlPlane::prometheus_text() const {
  if (!impl_->server) return "";
  v1::GetStatusRequest req;
  v1::GetStatusResponse resp;
  const grpc::Status s = impl_->core->get_status(req, &resp);
  if (!s.ok()) throw std::runtime_error("status unavailable: " + s.error_message());
  return render_prometheus(resp);
}

}  // namespace celo2
