// Prometheus text exposition of the control plane's status, and the HTTP endpoint that
// serves it (libmicrohttpd). Rank 0 only; the data is what GetStatus returns.
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "celo2/control.h"
#include "control_impl.h"

namespace celo2 {
namespace {

// Label values: escape backslash, double quote and newline (exposition format).
std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

void metric(std::ostringstream& o, const char* name, const char* type, const char* help) {
  o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
}

std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  std::ostringstream s;
  s.precision(10);
  s << v;
  return s.str();
}

}  // namespace

std::string render_prometheus(const v1::GetStatusResponse& st) {
  std::ostringstream o;
  metric(o, "celo2_step", "counter", "Optimizer updates applied.");
  o << "celo2_step " << st.step() << "\n";
  metric(o, "celo2_learning_rate", "gauge", "Base learning rate of the last update.");
  o << "celo2_learning_rate " << num(st.lr()) << "\n";
  if (st.has_loss()) {
    metric(o, "celo2_loss", "gauge", "Last training loss the trainer reported (mean over ranks).");
    o << "celo2_loss " << num(st.loss()) << "\n";
  }
  metric(o, "celo2_update_rms", "gauge", "RMS of the update applied at the last step, per label.");
  for (const auto& l : st.labels())
    o << "celo2_update_rms{label=\"" << esc(l.label()) << "\"} " << num(l.update_rms()) << "\n";
  metric(o, "celo2_grad_norm", "gauge", "L2 norm of the averaged gradients at the last step, per label.");
  for (const auto& l : st.labels())
    o << "celo2_grad_norm{label=\"" << esc(l.label()) << "\"} " << num(l.grad_norm()) << "\n";
  metric(o, "celo2_skipped_steps", "counter", "Steps skipped for non-finite gradients.");
  o << "celo2_skipped_steps " << st.skipped_steps() << "\n";
  metric(o, "celo2_nonfinite_last_step", "gauge", "Non-finite gradient entries in the last step.");
  o << "celo2_nonfinite_last_step " << st.nonfinite_last() << "\n";
  metric(o, "celo2_step_seconds", "gauge", "Wall time between the last two steps.");
  o << "celo2_step_seconds " << num(st.step_seconds()) << "\n";
  metric(o, "celo2_phase_seconds", "gauge", "Seconds of each engine phase in the last step (rank 0).");
  for (const auto& p : st.phases())
    o << "celo2_phase_seconds{phase=\"" << esc(p.phase()) << "\"} " << num(p.seconds()) << "\n";
  metric(o, "celo2_phase_bytes", "gauge", "Bytes rank 0 sent in each engine phase of the last step.");
  for (const auto& p : st.phases())
    o << "celo2_phase_bytes{phase=\"" << esc(p.phase()) << "\"} " << p.bytes() << "\n";
  metric(o, "celo2_comm_bytes_total", "counter", "Bytes rank 0 sent per collective since the start.");
  for (const auto& c : st.comm())
    o << "celo2_comm_bytes_total{op=\"" << esc(c.op()) << "\"} " << c.bytes() << "\n";
  metric(o, "celo2_comm_calls_total", "counter", "Calls of each collective since the start (rank 0).");
  for (const auto& c : st.comm())
    o << "celo2_comm_calls_total{op=\"" << esc(c.op()) << "\"} " << c.calls() << "\n";
  metric(o, "celo2_world_size", "gauge", "Ranks of the engine.");
  o << "celo2_world_size{backend=\"" << esc(st.comm_backend()) << "\"} " << st.world_size() << "\n";
  metric(o, "celo2_setting_version", "gauge", "Version of each setting applied by every rank.");
  const auto& v = st.versions();
  const std::pair<const char*, int64_t> versions[] = {
      {"weights", v.weights()}, {"schedule", v.schedule()},       {"mult_1d", v.mult_1d()},
      {"weight_decay", v.weight_decay()}, {"rules", v.rules()}, {"checkpoints", v.checkpoints()},
      {"commands", v.commands()}, {"max_grad_norm", v.max_grad_norm()}};
  for (const auto& [name, ver] : versions)
    o << "celo2_setting_version{setting=\"" << name << "\"} " << ver << "\n";
  metric(o, "celo2_weight_decay", "gauge", "Weight decay in force.");
  o << "celo2_weight_decay " << num(st.weight_decay()) << "\n";
  metric(o, "celo2_mult_1d", "gauge", "Learning-rate multiplier of the AdamW branch.");
  o << "celo2_mult_1d " << num(st.mult_1d()) << "\n";
  metric(o, "celo2_max_grad_norm", "gauge", "Global gradient clipping threshold (0: off).");
  o << "celo2_max_grad_norm " << num(st.max_grad_norm()) << "\n";
  metric(o, "celo2_grad_norm", "gauge", "Global gradient norm of the last step, before clipping.");
  o << "celo2_grad_norm " << num(st.grad_norm()) << "\n";
  metric(o, "celo2_weights_info", "gauge", "The optimizer weights in use (checksum as a label).");
  o << "celo2_weights_info{sha256=\"" << esc(st.weights().sha256()) << "\"} 1\n";
  metric(o, "celo2_control_requests_total", "counter", "Control-plane RPCs received.");
  o << "celo2_control_requests_total " << st.control().requests() << "\n";
  metric(o, "celo2_control_rejected_total", "counter", "Control-plane commands rejected.");
  o << "celo2_control_rejected_total " << st.control().rejected() << "\n";
  metric(o, "celo2_up", "gauge", "1 while the job runs, 0 once it finished.");
  o << "celo2_up " << (st.state() == "running" ? 1 : 0) << "\n";
  return o.str();
}

// ---- the HTTP endpoint -------------------------------------------------------------------

struct MetricsServer::Impl {
  MHD_Daemon* daemon = nullptr;
  std::function<std::string()> render;
};

namespace {

MHD_Result respond(MHD_Connection* c, unsigned code, const std::string& body, const char* type) {
  MHD_Response* r = MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()),
                                                    MHD_RESPMEM_MUST_COPY);
  if (!r) return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  const MHD_Result ret = MHD_queue_response(c, code, r);
  MHD_destroy_response(r);
  return ret;
}

MHD_Result handle(void* cls, MHD_Connection* c, const char* url, const char* method, const char*,
                  const char*, size_t* upload_size, void** ctx) {
  auto* impl = static_cast<MetricsServer::Impl*>(cls);
  if (*ctx == nullptr) {  // first call: headers only
    static int marker;
    *ctx = &marker;
    return MHD_YES;
  }
  if (*upload_size != 0) {  // no request bodies
    *upload_size = 0;
    return respond(c, MHD_HTTP_BAD_REQUEST, "no request body expected\n", "text/plain");
  }
  if (std::strcmp(method, "GET") != 0 && std::strcmp(method, "HEAD") != 0)
    return respond(c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET /metrics\n", "text/plain");
  if (std::strcmp(url, "/metrics") != 0) return respond(c, MHD_HTTP_NOT_FOUND, "GET /metrics\n", "text/plain");
  std::string body;
  try {
    body = impl->render();
  } catch (const std::exception& e) {
    return respond(c, MHD_HTTP_INTERNAL_SERVER_ERROR, std::string(e.what()) + "\n", "text/plain");
  }
  return respond(c, MHD_HTTP_OK, body, "text/plain; version=0.0.4; charset=utf-8");
}

}  // namespace

MetricsServer::MetricsServer(const std::string& address, std::function<std::string()> render)
    : impl_(std::make_unique<Impl>()) {
  impl_->render = std::move(render);
  std::string host = "127.0.0.1", port_text = address;
  if (const auto colon = address.rfind(':'); colon != std::string::npos) {
    host = address.substr(0, colon);
    port_text = address.substr(colon + 1);
  }
  char* end = nullptr;
  const long port = std::strtol(port_text.c_str(), &end, 10);
  if (port_text.empty() || *end != '\0' || port < 0 || port > 65535)
    throw std::invalid_argument("metrics address '" + address + "': bad port");
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  if (host == "localhost") host = "127.0.0.1";
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1)
    throw std::invalid_argument("metrics address '" + address + "': not an IPv4 address");
  impl_->daemon = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, nullptr, nullptr, &handle, impl_.get(),
      MHD_OPTION_SOCK_ADDR, reinterpret_cast<sockaddr*>(&sa), MHD_OPTION_CONNECTION_LIMIT, 16u,
      MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
  if (!impl_->daemon) throw std::runtime_error("metrics: cannot listen on " + address);
  const MHD_DaemonInfo* info = MHD_get_daemon_info(impl_->daemon, MHD_DAEMON_INFO_BIND_PORT);
  port_ = info ? info->port : static_cast<int>(port);
}

MetricsServer::~MetricsServer() {
  if (impl_->daemon) MHD_stop_daemon(impl_->daemon);
}

}  // namespace celo2
