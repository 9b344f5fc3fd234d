// celo2ctl: the operator's command line for a running celo2 job's control plane
// (proto/celo2/v1/control.proto). One subcommand per RPC, plus `health` (grpc.health.v1) and
// `watch` (a live view of WatchMetrics). Human-readable output by default, --json for
// scripts (one JSON object per reply; one per line for `watch`).
//
// Every call carries a deadline (--timeout, default 30 s; `watch` runs until the job ends or
// --timeout if given) and the bearer token (--token-file, else $CELO2_CONTROL_TOKEN).
// Exit status: 0 success, 1 the server refused or failed the call, 2 usage or local errors.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "celo2/params.h"
#include "celo2/v1/control.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace {

namespace v1 = celo2::v1;
using Clock = std::chrono::system_clock;

struct Globals {
  std::string addr = "127.0.0.1:50051";
  std::string token_file;
  double timeout_s = 30.0;
  bool json = false;
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
};

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError(std::string("cannot read ") + what + " '" + path + "'");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string first_line(std::string s) {
  s = s.substr(0, s.find('\n'));
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  size_t b = 0;
  while (b < s.size() && (s[b] == ' ' || s[b] == '\t')) ++b;
  return s.substr(b);
}

const char* code_name(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

std::string to_json(const google::protobuf::Message& m, bool pretty) {
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = pretty;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) out = "{}";
  return out;
}


class Client {
 public:
  explicit Client(const Globals& g) : g_(g) {
    std::string addr = g.addr;
    if (addr.find_first_not_of("0123456789") == std::string::npos) addr = "127.0.0.1:" + addr;
    std::shared_ptr<grpc::ChannelCredentials> creds;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    if (!g.tls_ca.empty() || !g.tls_cert.empty() || !g.tls_key.empty()) {
      if (g.tls_cert.empty() != g.tls_key.empty())
        throw UsageError("--tls-cert and --tls-key go together");
      grpc::SslCredentialsOptions ssl;
      if (!g.tls_ca.empty()) ssl.pem_root_certs = read_file(g.tls_ca, "TLS CA");
      if (!g.tls_cert.empty()) {
        ssl.pem_cert_chain = read_file(g.tls_cert, "TLS certificate");
        ssl.pem_private_key = read_file(g.tls_key, "TLS key");
      }
      creds = grpc::SslCredentials(ssl);
      if (!g.tls_server_name.empty()) args.SetSslTargetNameOverride(g.tls_server_name);
    } else {
      creds = grpc::InsecureChannelCredentials();
    }
    channel_ = grpc::CreateCustomChannel(addr, creds, args);
    control_ = v1::Control::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
    if (!g.token_file.empty()) {
      token_ = first_line(read_file(g.token_file, "token file"));
    } else if (const std::string env = celo2::param::control_token(); !env.empty()) {
      token_ = first_line(env);
    }
  }

  // A context with the deadline and the token (when the call needs one).
  void prepare(grpc::ClientContext* ctx, double timeout_s, bool needs_token) const {
    ctx->set_deadline(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(timeout_s)));
    if (token_.empty()) {
      if (needs_token)
        throw UsageError("no bearer token: give --token-file or set CELO2_CONTROL_TOKEN");
      return;
    }
    ctx->AddMetadata("authorization", "Bearer " + token_);
  }

  v1::Control::Stub& control() { return *control_; }
  grpc::health::v1::Health::Stub& health() { return *health_; }

 private:
  const Globals& g_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Control::Stub> control_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::string token_;
};

// Prints a failed call and returns the exit status.
int report_error(const Globals& g, const grpc::Status& s) {
  if (g.json) {
    const nlohmann::json err = {{"error", {{"code", code_name(s.error_code())},
                                           {"message", s.error_message()}}}};
    // Replace invalid UTF-8 rather than throw: messages may quote hostile input.
    std::printf("%s\n", err.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::fprintf(stderr, "celo2ctl: %s: %s\n", code_name(s.error_code()),
                 s.error_message().c_str());
  }
  return 1;
}

std::string one_line(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  for (size_t at; (at = s.find('\n')) != std::string::npos;) s.replace(at, 1, "; ");
  return s;
}

std::string human_bytes(double b) {
  char buf[32];
  if (b < 1024)
    std::snprintf(buf, sizeof buf, "%.0f B", b);
  else if (b < 1024.0 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024);
  else if (b < 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f MiB", b / 1048576);
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824);
  return buf;
}

void print_applied(const v1::Applied& a) {
  const v1::Versions& v = a.versions();
  std::printf(
      "applied at step %lld (the change governs update %lld on); versions: weights %lld, "
      "schedule %lld, mult_1d %lld, weight_decay %lld, rules %lld, checkpoints %lld\n",
      static_cast<long long>(a.step()), static_cast<long long>(a.step() + 1),
      static_cast<long long>(v.weights()), static_cast<long long>(v.schedule()),
      static_cast<long long>(v.mult_1d()), static_cast<long long>(v.weight_decay()),
      static_cast<long long>(v.rules()), static_cast<long long>(v.checkpoints()));
}

void print_weights(const v1::WeightsSummary& w) {
  std::string layers;
  for (const auto& l : w.layers()) layers += (layers.empty() ? "" : " ") + l;
  std::printf("weights  sha256 %s  (%s, layers %s, %lld parameters, from %s)\n", w.sha256().c_str(),
              human_bytes(static_cast<double>(w.bytes())).c_str(), layers.c_str(),
              static_cast<long long>(w.parameters()), w.source().c_str());
  if (w.canonical_sha256() != w.sha256())
    std::printf("         canonical sha256 %s (as checkpoints record it)\n",
                w.canonical_sha256().c_str());
}

void print_table(const v1::RoutingTable& t) { std::fputs(t.text().c_str(), stdout); }

void print_labels(const google::protobuf::RepeatedPtrField<v1::LabelMetrics>& labels,
                  const char* indent) {
  bool first = true;
  for (const auto& l : labels) {
    std::printf("%s%-7s update_rms %.3e  grad_norm %.3e\n", first ? "" : indent, l.label().c_str(),
                l.update_rms(), l.grad_norm());
    first = false;
  }
  if (labels.empty()) std::printf("-\n");
}

int cmd_status(Client& c, const Globals& g, bool routing) {
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, true);
  v1::GetStatusRequest req;
  req.set_include_routing_table(routing);
  v1::GetStatusResponse r;
  const grpc::Status s = c.control().GetStatus(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  if (g.json) {
    std::printf("%s\n", to_json(r, true).c_str());
    return 0;
  }
  const v1::Versions& v = r.versions();
  std::printf("job      %s, step %lld, world size %d (%s), up %.1f s\n", r.state().c_str(),
              static_cast<long long>(r.step()), r.world_size(), r.comm_backend().c_str(),
              r.uptime_seconds());
  std::printf("lr       %.4e   loss %s   step time %.2f ms\n", r.lr(),
              r.has_loss() ? std::to_string(r.loss()).c_str() : "-", 1e3 * r.step_seconds());
  std::printf("labels   ");
  print_labels(r.labels(), "         ");
  std::printf("skipped  %lld steps (non-finite gradient entries in the last step: %lld)\n",
              static_cast<long long>(r.skipped_steps()),
              static_cast<long long>(r.nonfinite_last()));
  std::printf("schedule %s (v%lld)\n", r.schedule().text().c_str(),
              static_cast<long long>(v.schedule()));
  std::printf("mult_1d  %g (v%lld)   weight_decay %g (v%lld)\n", r.mult_1d(),
              static_cast<long long>(v.mult_1d()), r.weight_decay(),
              static_cast<long long>(v.weight_decay()));
  std::printf("clipping max_grad_norm %g (v%lld; 0: off)   last grad norm %g\n", r.max_grad_norm(),
              static_cast<long long>(v.max_grad_norm()), r.grad_norm());
  std::printf("rules    %s (v%lld)\n", one_line(r.rules()).c_str(),
              static_cast<long long>(v.rules()));
  print_weights(r.weights());
  std::printf("         (weights v%lld)\n", static_cast<long long>(v.weights()));
  std::printf("ckpt     %lld written%s%s\n", static_cast<long long>(v.checkpoints()),
              r.last_checkpoint().empty() ? "" : ", last ", r.last_checkpoint().c_str());
  std::string phases;
  for (const auto& p : r.phases()) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "%s%s %.3f ms %s", phases.empty() ? "" : " | ",
                  p.phase().c_str(), 1e3 * p.seconds(),
                  human_bytes(static_cast<double>(p.bytes())).c_str());
    phases += buf;
  }
  std::printf("phases   %s\n", phases.empty() ? "-" : phases.c_str());
  std::string comm;
  for (const auto& k : r.comm()) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "%s%s %lld calls %s", comm.empty() ? "" : " | ", k.op().c_str(),
                  static_cast<long long>(k.calls()),
                  human_bytes(static_cast<double>(k.bytes())).c_str());
    comm += buf;
  }
  std::printf("comm     %s\n", comm.empty() ? "-" : comm.c_str());
  const v1::ControlCounters& k = r.control();
  std::printf(
      "control  %lld requests, %lld unauthenticated, %lld rejected, %lld applied, "
      "%lld withdrawn, %d pending, %d watching\n",
      static_cast<long long>(k.requests()), static_cast<long long>(k.unauthenticated()),
      static_cast<long long>(k.rejected()), static_cast<long long>(k.applied()),
      static_cast<long long>(k.withdrawn()), k.pending(), k.watchers());
  if (routing) print_table(r.routing_table());
  return 0;
}

int cmd_health(Client& c, const Globals& g, const std::string& service) {
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, false);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse r;
  const grpc::Status s = c.health().Check(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(r.status());
  if (g.json)
    std::printf("%s\n", to_json(r, false).c_str());
  else
    std::printf("%s\n", name.c_str());
  return r.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

int cmd_load_weights(Client& c, const Globals& g, const std::string& path,
                     const std::string& local_file) {
  v1::LoadWeightsRequest req;
  if (!local_file.empty() && !path.empty())
    throw UsageError("load-weights: give a server path or --file, not both");
  if (!local_file.empty())
    req.set_data(read_file(local_file, "weights file"));
  else if (!path.empty())
    req.set_path(path);
  else
    throw UsageError("load-weights: give a path under the server's weights root, or --file");
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, true);
  v1::LoadWeightsResponse r;
  const grpc::Status s = c.control().LoadWeights(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  if (g.json) {
    std::printf("%s\n", to_json(r, true).c_str());
    return 0;
  }
  print_weights(r.summary());
  print_applied(r.applied());
  return 0;
}

int cmd_set_schedule(Client& c, const Globals& g, const std::string& text, CLI::Option* mult,
                     double mult_1d, CLI::Option* wd_opt, double wd, CLI::Option* clip_opt, double clip) {
  v1::SetScheduleRequest req;
  if (!text.empty()) req.set_schedule_text(text);
  if (mult->count() > 0) req.set_mult_1d(mult_1d);
  if (wd_opt->count() > 0) req.set_weight_decay(wd);
  if (clip_opt->count() > 0) req.set_max_grad_norm(clip);
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, true);
  v1::SetScheduleResponse r;
  const grpc::Status s = c.control().SetSchedule(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  if (g.json) {
    std::printf("%s\n", to_json(r, true).c_str());
    return 0;
  }
  std::printf("schedule %s   mult_1d %g   weight_decay %g   max_grad_norm %g\n", r.schedule().text().c_str(),
              r.mult_1d(), r.weight_decay(), r.max_grad_norm());
  print_applied(r.applied());
  return 0;
}

int cmd_set_rules(Client& c, const Globals& g, const std::string& rules, bool dry_run) {
  v1::SetLabelRulesRequest req;
  req.set_rules(rules);
  req.set_dry_run(dry_run);
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, true);
  v1::SetLabelRulesResponse r;
  const grpc::Status s = c.control().SetLabelRules(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  if (g.json) {
    std::printf("%s\n", to_json(r, true).c_str());
    return 0;
  }
  std::printf("rules: %s\n", one_line(r.rules()).c_str());
  print_table(r.table());
  if (r.dry_run())
    std::printf("dry run: nothing changed\n");
  else
    print_applied(r.applied());
  return 0;
}

int cmd_save_checkpoint(Client& c, const Globals& g, const std::string& name, bool overwrite) {
  v1::SaveCheckpointRequest req;
  req.set_name(name);
  req.set_overwrite(overwrite);
  grpc::ClientContext ctx;
  c.prepare(&ctx, g.timeout_s, true);
  v1::SaveCheckpointResponse r;
  const grpc::Status s = c.control().SaveCheckpoint(&ctx, req, &r);
  if (!s.ok()) return report_error(g, s);
  if (g.json) {
    std::printf("%s\n", to_json(r, true).c_str());
    return 0;
  }
  std::printf("checkpoint %s (%s)\n", r.path().c_str(),
              human_bytes(static_cast<double>(r.bytes())).c_str());
  print_applied(r.applied());
  return 0;
}

int cmd_watch(Client& c, const Globals& g, bool timeout_given, int64_t count, int every) {
  v1::WatchMetricsRequest req;
  req.set_every(every);
  req.set_max_messages(count);
  grpc::ClientContext ctx;
  // A live view runs until the job ends; its deadline is a day unless --timeout says less.
  c.prepare(&ctx, timeout_given ? g.timeout_s : 86400.0, true);
  auto reader = c.control().WatchMetrics(&ctx, req);
  v1::StepMetrics m;
  bool header = false;
  while (reader->Read(&m)) {
    if (g.json) {
      std::printf("%s\n", to_json(m, false).c_str());
    } else {
      if (!header) {
        std::printf("%8s  %8s  %9s  %10s", "step", "loss", "lr", "grad norm");
        for (const auto& l : m.labels()) std::printf("  %-16s", ("rms " + l.label()).c_str());
        std::printf("\n");
        header = true;
      }
      std::printf("%8lld  %8s  %9.3e", static_cast<long long>(m.step()),
                  m.has_loss() ? std::to_string(m.loss()).substr(0, 8).c_str() : "-", m.lr());
      std::printf("  %10.4g", m.grad_norm());
      for (const auto& l : m.labels()) std::printf("  %-16.3e", l.update_rms());
      if (m.skipped()) std::printf("  skipped");
      if (m.dropped() > 0) std::printf("  (%lld dropped)", static_cast<long long>(m.dropped()));
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  const grpc::Status s = reader->Finish();
  if (!s.ok() && !(s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && timeout_given))
    return report_error(g, s);
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{
      "celo2ctl: control a running celo2 job (load weights, schedules, label rules, "
      "status, metrics, checkpoints)"};
  app.require_subcommand(1);
  app.fallthrough();
  Globals g;
  if (const std::string env = celo2::param::control_addr(); !env.empty()) g.addr = env;
  app.add_option("--addr", g.addr, "server host:port (or $CELO2_CONTROL_ADDR)")
      ->capture_default_str();
  app.add_option("--token-file", g.token_file, "bearer token file (default: $CELO2_CONTROL_TOKEN)");
  auto* timeout_opt = app.add_option("--timeout", g.timeout_s, "deadline of each call, seconds")
                          ->check(CLI::PositiveNumber)
                          ->capture_default_str();
  app.add_flag("--json", g.json, "print replies as JSON");
  app.add_option("--tls-ca", g.tls_ca, "TLS: CA certificate that signed the server's (PEM)");
  app.add_option("--tls-cert", g.tls_cert, "mutual TLS: client certificate (PEM)");
  app.add_option("--tls-key", g.tls_key, "mutual TLS: client key (PEM)");
  app.add_option("--tls-server-name", g.tls_server_name,
                 "TLS: expect this name in the server's certificate");

  auto* status = app.add_subcommand("status", "step, lr, loss, per-label metrics, settings");
  bool routing = false;
  status->add_flag("--routing", routing, "include the routing table");

  auto* health = app.add_subcommand("health", "grpc.health.v1 check (no token needed)");
  std::string service;
  health->add_option("--service", service, "service name (default: the whole server)");

  auto* load = app.add_subcommand("load-weights", "swap the optimizer weights (theta.state)");
  std::string path, local_file;
  load->add_option("path", path, "path under the server's weights root");
  load->add_option("--file", local_file, "send this local file's bytes instead");

  auto* sched = app.add_subcommand("set-schedule", "learning-rate schedule, mult_1d, weight decay, clipping");
  std::string sched_text;
  double mult_1d = 0, wd = 0, clip = 0;
  sched->add_option("schedule", sched_text,
                    "e.g. constant:lr=1e-3 or cosine:lr=3e-3,warmup=100,total=10000,final=0.1");
  auto* mult_opt = sched->add_option("--mult-1d", mult_1d, "lr multiplier of the adamw branch");
  auto* wd_opt = sched->add_option("--wd", wd, "weight decay");
  auto* clip_opt = sched->add_option("--max-grad-norm", clip, "global gradient clipping threshold (0: off)");

  auto* rules = app.add_subcommand("set-rules", "parameter-label rules (with --dry-run: preview)");
  std::string rules_text;
  bool dry_run = false;
  rules->add_option("rules", rules_text, "e.g. 're:/b$ => adamw; * => celo2'")->required();
  rules->add_flag("--dry-run", dry_run, "show the routing table, change nothing");

  auto* watch = app.add_subcommand("watch", "live view: step, loss, lr, update RMS per label");
  int64_t count = 0;
  int every = 1;
  watch->add_option("--count", count, "stop after this many messages (0: until the job ends)")
      ->check(CLI::NonNegativeNumber);
  watch->add_option("--every", every, "one message every N steps")->check(CLI::PositiveNumber);

  auto* ckpt = app.add_subcommand("save-checkpoint", "write a checkpoint at the next step");
  std::string ckpt_name;
  bool overwrite = false;
  ckpt->add_option("name", ckpt_name, "file name in the server's checkpoint directory");
  ckpt->add_flag("--overwrite", overwrite, "replace an existing checkpoint of that name");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  Client c(g);
  if (*status) return cmd_status(c, g, routing);
  if (*health) return cmd_health(c, g, service);
  if (*load) return cmd_load_weights(c, g, path, local_file);
  if (*sched) {
    if (sched_text.empty() && mult_opt->count() == 0 && wd_opt->count() == 0 && clip_opt->count() == 0)
      throw UsageError("set-schedule: give a schedule, --mult-1d, --wd or --max-grad-norm");
    return cmd_set_schedule(c, g, sched_text, mult_opt, mult_1d, wd_opt, wd, clip_opt, clip);
  }
  if (*rules) return cmd_set_rules(c, g, rules_text, dry_run);
  if (*watch) return cmd_watch(c, g, timeout_opt->count() > 0, count, every);
  if (*ckpt) return cmd_save_checkpoint(c, g, ckpt_name, overwrite);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "celo2ctl: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "celo2ctl: %s\n", e.what());
    return 2;
  }
}
