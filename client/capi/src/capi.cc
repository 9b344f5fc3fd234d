// The C ABI (celo2.h) over the C++ API (client.h). Each entry point checks its arguments
// (argcheck.cc), runs the C++ call inside guarded() so no exception crosses the ABI, and
// returns a status; the message stays in celo2_last_error() for this thread.
#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>
#include <vector>

#include "argcheck.h"
#include "celo2/celo2.h"
#include "celo2/client.h"

struct celo2_options {
  celo2::ClientOptions o;
};

struct celo2_handle {
  std::unique_ptr<celo2::Client> client;
};

using celo2::capi::ArgError;
using celo2::capi::guarded;

namespace {

void fill_report(const celo2::StepReport& r, double seconds, celo2_step_report_t* out) {
  if (!out) return;
  out->step = r.step;
  out->lr = r.lr;
  out->skipped = r.skipped ? 1 : 0;
  out->nonfinite = r.nonfinite;
  for (int i = 0; i < 3; ++i) {
    out->update_rms[i] = r.update_rms[i];
    out->grad_norm[i] = r.grad_norm[i];
  }
  out->seconds = seconds;
}

celo2_status_t do_step(celo2_t* opt, std::optional<double> lr, double loss, celo2_step_report_t* report,
                       const char* api) {
  return guarded(api, [&] {
    celo2::capi::check_handle(opt);
    if (lr && !std::isfinite(*lr)) throw ArgError(CELO2_ERR_INVALID_ARGUMENT, "lr is not finite");
    std::optional<double> l;
    if (std::isfinite(loss)) l = loss;
    const celo2::StepReport r = opt->client->step(l, lr);
    fill_report(r, opt->client->status().last_step_seconds, report);
  });
}

nlohmann::json status_json(celo2::Client& c) {
  const celo2::ClientStatus s = c.status();
  return {{"step", s.step},
          {"skipped", s.skipped},
          {"lr", s.lr},
          {"rank", s.rank},
          {"world_size", s.world_size},
          {"backend", s.backend},
          {"num_tensors", s.num_tensors},
          {"total_elements", s.total_elements},
          {"local_range", {s.local_lo, s.local_hi}},
          {"schedule", s.schedule},
          {"rules", s.rules},
          {"theta_sha256", s.theta_sha256},
          {"control_address", s.control_address},
          {"last_step_seconds", s.last_step_seconds},
          {"total_step_seconds", s.total_step_seconds},
          {"grad_norm", s.grad_norm},
          {"max_grad_norm", s.max_grad_norm},
          {"elements_by_label",
           {{"celo2", s.label_elements[0]}, {"adamw", s.label_elements[1]}, {"frozen", s.label_elements[2]}}}};
}

// Runs `make` (which produces the string) guarded, then copies it out.
template <class F>
celo2_status_t string_call(const char* api, celo2_t* opt, char* buf, size_t len, size_t* needed, F make) {
  std::string s;
  const celo2_status_t st = guarded(api, [&] {
    celo2::capi::check_handle(opt);
    celo2::capi::check_out_buffer(buf, len);
    s = make(*opt->client);
  });
  if (st != CELO2_OK) return st;
  return celo2::capi::copy_out(s, buf, len, needed);
}

}  // namespace

extern "C" {

const char* celo2_status_name(celo2_status_t status) {
  switch (status) {
    case CELO2_OK: return "CELO2_OK";
    case CELO2_ERR_INVALID_ARGUMENT: return "CELO2_ERR_INVALID_ARGUMENT";
    case CELO2_ERR_STATE: return "CELO2_ERR_STATE";
    case CELO2_ERR_FORMAT: return "CELO2_ERR_FORMAT";
    case CELO2_ERR_IO: return "CELO2_ERR_IO";
    case CELO2_ERR_COMM: return "CELO2_ERR_COMM";
    case CELO2_ERR_NONFINITE: return "CELO2_ERR_NONFINITE";
    case CELO2_ERR_UNSUPPORTED: return "CELO2_ERR_UNSUPPORTED";
    case CELO2_ERR_INTERNAL: return "CELO2_ERR_INTERNAL";
    case CELO2_ERR_BUFFER_TOO_SMALL: return "CELO2_ERR_BUFFER_TOO_SMALL";
  }
  return "CELO2_ERR_UNKNOWN_STATUS";
}

const char* celo2_last_error(void) { return celo2::capi::last_error(); }

celo2_status_t celo2_version(int* major, int* minor, int* patch, int* abi) {
  return guarded("celo2_version", [&] {
    if (major) *major = CELO2_VERSION_MAJOR;
    if (minor) *minor = CELO2_VERSION_MINOR;
    if (patch) *patch = CELO2_VERSION_PATCH;
    if (abi) *abi = CELO2_ABI_VERSION;
  });
}

celo2_status_t celo2_options_create(celo2_options_t** out) {
  return guarded("celo2_options_create", [&] {
    celo2::capi::check_not_null(out, "out");
    *out = new celo2_options;
  });
}

celo2_status_t celo2_options_set(celo2_options_t* options, const char* key, const char* value) {
  return guarded("celo2_options_set", [&] {
    celo2::capi::check_handle(options, "options");
    const std::string k = celo2::capi::check_string(key, "key", 64);
    const std::string v = celo2::capi::check_string(value, "value", celo2::capi::kMaxTextBytes, true);
    celo2::set_client_option(options->o, k, v);
  });
}

celo2_status_t celo2_options_destroy(celo2_options_t* options) {
  return guarded("celo2_options_destroy", [&] { delete options; });
}

celo2_status_t celo2_create(const celo2_options_t* options, celo2_t** out) {
  return guarded("celo2_create", [&] {
    celo2::capi::check_handle(options, "options");
    celo2::capi::check_not_null(out, "out");
    *out = nullptr;
    auto h = std::make_unique<celo2_handle>();
    h->client = std::make_unique<celo2::Client>(options->o);
    *out = h.release();
  });
}

celo2_status_t celo2_destroy(celo2_t* opt) {
  return guarded("celo2_destroy", [&] { delete opt; });
}

celo2_status_t celo2_add_tensor(celo2_t* opt, const char* name, int32_t ndim, const int64_t* shape,
                                celo2_dtype_t dtype, void* params, const void* grads) {
  return guarded("celo2_add_tensor", [&] {
    celo2::capi::check_handle(opt);
    const std::string n = celo2::capi::check_name(name);
    const int64_t numel = celo2::capi::check_shape(ndim, shape);
    const celo2::DType d = celo2::capi::check_dtype(dtype);
    celo2::capi::check_buffers(params, grads, numel, d);
    std::vector<int64_t> s(shape, shape + ndim);
    opt->client->add_tensor(n, s, params, d, static_cast<const float*>(grads));
  });
}

celo2_status_t celo2_set_tensor_group(celo2_t* opt, const char* name, double lr_scale, double weight_decay) {
  return guarded("celo2_set_tensor_group", [&] {
    celo2::capi::check_handle(opt);
    const std::string n = celo2::capi::check_name(name);
    celo2::TensorGroup g;
    g.lr_scale = lr_scale;
    if (!std::isnan(weight_decay)) g.weight_decay = weight_decay;
    opt->client->set_group(n, g);
  });
}

celo2_status_t celo2_step(celo2_t* opt, double loss, celo2_step_report_t* report) {
  return do_step(opt, std::nullopt, loss, report, "celo2_step");
}

celo2_status_t celo2_step_with_lr(celo2_t* opt, double lr, double loss, celo2_step_report_t* report) {
  return do_step(opt, lr, loss, report, "celo2_step_with_lr");
}

celo2_status_t celo2_save(celo2_t* opt, const char* path) {
  return guarded("celo2_save", [&] {
    celo2::capi::check_handle(opt);
    opt->client->save(celo2::capi::check_path(path, "path"));
  });
}

celo2_status_t celo2_load(celo2_t* opt, const char* path) {
  return guarded("celo2_load", [&] {
    celo2::capi::check_handle(opt);
    opt->client->load(celo2::capi::check_path(path, "path"));
  });
}

celo2_status_t celo2_set(celo2_t* opt, const char* key, const char* value) {
  return guarded("celo2_set", [&] {
    celo2::capi::check_handle(opt);
    const std::string k = celo2::capi::check_string(key, "key", 64);
    const std::string v = celo2::capi::check_string(value, "value");
    opt->client->set(k, v);
  });
}

celo2_status_t celo2_grad_ready(celo2_t* opt, const char* name) {
  return guarded("celo2_grad_ready", [&] {
    celo2::capi::check_handle(opt);
    opt->client->grad_ready(celo2::capi::check_string(name, "name"));
  });
}

celo2_status_t celo2_gather_params(celo2_t* opt) {
  return guarded("celo2_gather_params", [&] {
    celo2::capi::check_handle(opt);
    opt->client->gather_params();
  });
}

celo2_status_t celo2_get_info(celo2_t* opt, celo2_info_t* info) {
  return guarded("celo2_get_info", [&] {
    celo2::capi::check_handle(opt);
    celo2::capi::check_not_null(info, "info");
    const celo2::ClientStatus s = opt->client->status();
    info->step = s.step;
    info->skipped = s.skipped;
    info->lr = s.lr;
    info->rank = s.rank;
    info->world_size = s.world_size;
    info->num_tensors = static_cast<int64_t>(s.num_tensors);
    info->total_elements = s.total_elements;
    info->local_lo = s.local_lo;
    info->local_hi = s.local_hi;
  });
}

celo2_status_t celo2_status_json(celo2_t* opt, char* buf, size_t len, size_t* needed) {
  return string_call("celo2_status_json", opt, buf, len, needed,
                     [](celo2::Client& c) { return status_json(c).dump(); });
}

celo2_status_t celo2_routing_table(celo2_t* opt, char* buf, size_t len, size_t* needed) {
  return string_call("celo2_routing_table", opt, buf, len, needed,
                     [](celo2::Client& c) { return c.routing_table(); });
}

celo2_status_t celo2_control_address(celo2_t* opt, char* buf, size_t len, size_t* needed) {
  return string_call("celo2_control_address", opt, buf, len, needed,
                     [](celo2::Client& c) { return c.control_address(); });
}

celo2_status_t celo2_start_control(celo2_t* opt) {
  return guarded("celo2_start_control", [&] {
    celo2::capi::check_handle(opt);
    opt->client->start_control();
  });
}

}  // extern "C"
