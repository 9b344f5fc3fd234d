// The control plane's gRPC transport (control_impl.h): the server, its credentials (plain on
// loopback, TLS, mutual TLS), the bearer-token check and the celo2.v1.Control handlers, each
// a thin wrapper around ControlCore. grpc.health.v1 is gRPC's built-in default health
// service (no token: load balancers and probes call it).
//
// The token is checked at the top of every handler, before the request is looked at, so an
// unauthenticated call can change nothing. (An AuthMetadataProcessor would only run with
// secure credentials; the plain loopback server needs the same check.)
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "celo2/params.h"
#include "celo2/v1/control.grpc.pb.h"
#include "control_impl.h"

namespace celo2::control {

namespace {

constexpr const char* kServiceName = "celo2.v1.Control";

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::invalid_argument(std::string("cannot read ") + what + " '" + path + "'");
  std::ostringstream s;
  s << f.rdbuf();
  if (!f && !f.eof())
    throw std::invalid_argument(std::string("cannot read ") + what + " '" + path + "'");
  return s.str();
}

std::string first_line_stripped(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
    line.pop_back();
  size_t b = 0;
  while (b < line.size() && (line[b] == ' ' || line[b] == '\t')) ++b;
  return line.substr(b);
}

std::string resolve_token(const ControlOptions& o) {
  std::string token;
  if (!o.token.empty()) {
    token = o.token;
  } else if (!o.token_file.empty()) {
    token = first_line_stripped(read_text_file(o.token_file, "token file"));
    if (token.empty()) throw std::invalid_argument("token file '" + o.token_file + "' is empty");
    struct stat st {};
    if (::stat(o.token_file.c_str(), &st) == 0 && (st.st_mode & 077) != 0)
      std::fprintf(stderr, "control: warning: token file '%s' is readable by other users\n",
                   o.token_file.c_str());
  } else if (const std::string env = param::control_token(); !env.empty()) {
    token = first_line_stripped(env);
  }
  if (token.empty())
    throw std::invalid_argument(
        "the control plane needs a bearer token: give a token file (--control-token-file) or "
        "set CELO2_CONTROL_TOKEN");
  // A guessable token is a remote control of the job: refuse it rather than warn.
  if (token.size() < 16)
    throw std::invalid_argument("the control plane's bearer token has only " + std::to_string(token.size()) +
                                " bytes; use at least 16 (e.g. openssl rand -hex 32)");
  return token;
}

// "50051" and ":50051" mean 127.0.0.1:50051: loopback unless told otherwise.
std::string normalize_address(const std::string& a) {
  if (a.empty()) throw std::invalid_argument("empty control address");
  if (a.find_first_not_of("0123456789") == std::string::npos) return "127.0.0.1:" + a;
  if (a[0] == ':') return "127.0.0.1" + a;
  return a;
}

bool is_loopback(const std::string& address) {
  if (address.rfind("unix:", 0) == 0) return true;
  const auto colon = address.rfind(':');
  std::string host = colon == std::string::npos ? address : address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0 ||
         host.rfind("ipv4:127.", 0) == 0;
}

CallInfo call_info(grpc::ServerContext* ctx) {
  CallInfo c;
  const auto deadline = ctx->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    auto left = deadline - std::chrono::system_clock::now();
    const auto year = std::chrono::hours(24 * 365);
    if (left > year) left = year;
    c.deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
  }
  c.cancelled = [ctx] { return ctx->IsCancelled(); };
  return c;
}

class Service final : public v1::Control::Service {
 public:
  Service(ControlCore& core, std::string token) : core_(core), token_(std::move(token)) {}

  grpc::Status LoadWeights(grpc::ServerContext* ctx, const v1::LoadWeightsRequest* req,
                           v1::LoadWeightsResponse* resp) override {
    return guarded(ctx, [&](const CallInfo& c) { return core_.load_weights(*req, resp, c); });
  }
  grpc::Status SetSchedule(grpc::ServerContext* ctx, const v1::SetScheduleRequest* req,
                           v1::SetScheduleResponse* resp) override {
    return guarded(ctx, [&](const CallInfo& c) { return core_.set_schedule(*req, resp, c); });
  }
  grpc::Status SetLabelRules(grpc::ServerContext* ctx, const v1::SetLabelRulesRequest* req,
                             v1::SetLabelRulesResponse* resp) override {
    return guarded(ctx, [&](const CallInfo& c) { return core_.set_label_rules(*req, resp, c); });
  }
  grpc::Status GetStatus(grpc::ServerContext* ctx, const v1::GetStatusRequest* req,
                         v1::GetStatusResponse* resp) override {
    return guarded(ctx, [&](const CallInfo&) { return core_.get_status(*req, resp); });
  }
  grpc::Status WatchMetrics(grpc::ServerContext* ctx, const v1::WatchMetricsRequest* req,
                            grpc::ServerWriter<v1::StepMetrics>* writer) override {
    return guarded(ctx, [&](const CallInfo& c) {
      return core_.watch_metrics(
          *req, [writer](const v1::StepMetrics& m) { return writer->Write(m); }, c);
    });
  }
  grpc::Status SaveCheckpoint(grpc::ServerContext* ctx, const v1::SaveCheckpointRequest* req,
                              v1::SaveCheckpointResponse* resp) override {
    return guarded(ctx, [&](const CallInfo& c) { return core_.save_checkpoint(*req, resp, c); });
  }

 private:
  // "authorization: Bearer <token>", exactly one such header.
  bool authorized(const grpc::ServerContext& ctx) const {
    const auto& md = ctx.client_metadata();
    const auto range = md.equal_range("authorization");
    if (range.first == range.second || std::next(range.first) != range.second) return false;
    const grpc::string_ref v = range.first->second;
    static constexpr char kScheme[] = "bearer ";
    constexpr size_t n = sizeof kScheme - 1;
    if (v.size() <= n) return false;
    for (size_t i = 0; i < n; ++i)
      if (std::tolower(static_cast<unsigned char>(v.data()[i])) != kScheme[i]) return false;
    return token_matches(std::string(v.data() + n, v.size() - n), token_);
  }

  template <class F>
  grpc::Status guarded(grpc::ServerContext* ctx, F&& handle) {
    core_.count_request();
    if (!authorized(*ctx)) {
      core_.count_unauthenticated();
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "missing or wrong bearer token (metadata 'authorization: Bearer "
                          "<token>')");
    }
    try {
      return handle(call_info(ctx));
    } catch (const std::bad_alloc&) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory for this request");
    } catch (const std::exception& e) {
      return grpc::Status(grpc::StatusCode::INTERNAL, printable(e.what(), 2000));
    }
  }

  ControlCore& core_;
  const std::string token_;
};

class GrpcControlServer final : public ControlServer {
 public:
  GrpcControlServer(const ControlOptions& o, ControlCore& core) : service_(core, resolve_token(o)) {
    const std::string address = normalize_address(o.address);
    std::shared_ptr<grpc::ServerCredentials> creds;
    const bool tls = !o.tls_cert_file.empty() || !o.tls_key_file.empty();
    if (tls) {
      if (o.tls_cert_file.empty() || o.tls_key_file.empty())
        throw std::invalid_argument("TLS needs both a certificate and a key");
      grpc::SslServerCredentialsOptions ssl(
          o.tls_client_ca_file.empty()
              ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      if (!o.tls_client_ca_file.empty())
        ssl.pem_root_certs = read_text_file(o.tls_client_ca_file, "TLS client CA");
      ssl.pem_key_cert_pairs.push_back({read_text_file(o.tls_key_file, "TLS key"),
                                        read_text_file(o.tls_cert_file, "TLS certificate")});
      creds = grpc::SslServerCredentials(ssl);
    } else {
      if (!o.tls_client_ca_file.empty())
        throw std::invalid_argument("a TLS client CA needs a TLS certificate and key");
      creds = grpc::InsecureServerCredentials();
      if (!is_loopback(address))
        std::fprintf(stderr,
                     "control: warning: serving %s without TLS; the bearer token is sent in "
                     "clear\n",
                     address.c_str());
    }
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder b;
    b.AddListeningPort(address, creds, &port_);
    b.RegisterService(&service_);
    b.SetMaxReceiveMessageSize(static_cast<int>(o.max_message_bytes));
    b.SetMaxSendMessageSize(static_cast<int>(std::min<int64_t>(4 * o.max_message_bytes, 1 << 30)));
    grpc::ResourceQuota quota("celo2-control");
    quota.SetMaxThreads(std::max(4, o.max_threads));
    b.SetResourceQuota(quota);
    // Find clients that vanished without closing (their streams end, their threads return).
    b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
    b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
    b.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 64);
    // No SO_REUSEPORT. With it gRPC opens one listening socket per completion queue (two
    // here: the sync handlers' and the health service's), and for port 0 the copy asked for
    // port 0 again: a second, unannounced port serving the control plane. It also let a
    // second server bind a port in use and take part of its connections; now that fails.
    b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0)
      throw std::runtime_error("cannot serve the control plane on '" + address +
                               "' (address in use or invalid?)");
    const auto colon = address.rfind(':');
    address_ = (colon == std::string::npos ? address : address.substr(0, colon)) + ":" +
               std::to_string(port_);
    if (auto* health = server_->GetHealthCheckService()) {
      health->SetServingStatus(kServiceName, true);
      health->SetServingStatus(true);
    }
  }

  ~GrpcControlServer() override { shutdown(); }

  int port() const override { return port_; }
  std::string address() const override { return address_; }

  void shutdown() override {
    if (!server_ || down_) return;
    down_ = true;
    if (auto* health = server_->GetHealthCheckService()) health->SetServingStatus(false);
    // Handlers see the job finished (ControlCore::finish) and return; calls still running
    // after the grace period are cancelled.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_->Wait();
  }

 private:
  Service service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  bool down_ = false;
};

}  // namespace

std::unique_ptr<ControlServer> start_control_server(const ControlOptions& options,
                                                    ControlCore& core) {
  return std::make_unique<GrpcControlServer>(options, core);
}

}  // namespace celo2::control
