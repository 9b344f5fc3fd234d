// celo2._celo2: the Python binding of the C++ API (celo2/client.h). No PyTorch here: tensors
// arrive as data pointer + shape + dtype (celo2/torch.py passes tensor.data_ptr()) or as
// NumPy arrays; the Python side keeps them alive (add_tensor's `keepalive`).
//
// Errors become Python exceptions: ValueError for bad arguments, celo2.FormatError (a
// ValueError) for bad weight or checkpoint files, celo2.CommError for failed collectives,
// celo2.UnsupportedError (NotImplementedError), celo2.NonFiniteGradientError
// (FloatingPointError); state errors (registration after the first step) are RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "celo2/client.h"
#include "celo2/flax_msgpack.h"
#include "celo2/newton_schulz.h"
#if defined(CELO2_HAVE_CONTROL) && CELO2_HAVE_CONTROL
#include "celo2/control.h"
#endif
#include "celo2/state_file.h"
#include "celo2/theta_io.h"
#include "py_communicator.h"

namespace py = pybind11;
using namespace celo2;

namespace {

// A Python value -> the flax tree config_from_value() reads (keys of spec §1).
flax::Value to_flax(py::handle h, const std::string& where) {
  if (py::isinstance<py::bool_>(h)) return flax::Value::of_bool(h.cast<bool>());
  if (py::isinstance<py::int_>(h)) return flax::Value::of_int(h.cast<int64_t>());
  if (py::isinstance<py::float_>(h)) return flax::Value::of_float(h.cast<double>());
  if (py::isinstance<py::str>(h)) return flax::Value::of_string(h.cast<std::string>());
  if (py::isinstance<py::dict>(h)) {
    flax::Value v = flax::Value::of_map();
    for (auto [k, x] : h.cast<py::dict>()) {
      const std::string key = py::str(k).cast<std::string>();
      v.map[key] = to_flax(x, where + "/" + key);
    }
    return v;
  }
  if (py::isinstance<py::sequence>(h)) {
    flax::Value v;
    v.kind = flax::Value::Kind::kList;
    for (auto x : h.cast<py::sequence>()) v.list.push_back(to_flax(x, where));
    return v;
  }
  // NumPy scalars and anything else with __float__.
  if (py::hasattr(h, "__float__")) return flax::Value::of_float(h.cast<double>());
  throw std::invalid_argument(where + ": unsupported value of type " +
                              py::str(py::type::of(h)).cast<std::string>());
}

// Python keyword values to the one option table (celo2/client.h): every key but the two
// with Python-only forms (theta as bytes, config as a dict) goes through set_client_option
// as text, so Python and the C ABI spell and parse options the same way.
std::string option_text(const std::string& key, py::handle v) {
  if (py::isinstance<py::bool_>(v)) return v.cast<bool>() ? "true" : "false";
  if (py::isinstance<py::str>(v)) return v.cast<std::string>();
  if (py::hasattr(v, "__fspath__")) return py::str(v).cast<std::string>();
  if (py::hasattr(v, "__index__")) return std::to_string(v.cast<int64_t>());
  if (py::hasattr(v, "__float__")) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", v.cast<double>());
    return buf;
  }
  throw std::invalid_argument(key + ": unsupported value of type " +
                              py::str(py::type::of(v)).cast<std::string>());
}

ClientOptions options_from(const py::dict& d) {
  ClientOptions o;
  // The variant first: `config` overrides start from its RuleConfig.
  if (d.contains("variant") && !d["variant"].is_none()) o.variant = d["variant"].cast<std::string>();
  for (auto [k, v] : d) {
    const std::string key = py::str(k).cast<std::string>();
    if (v.is_none()) continue;
    if (key == "theta" && py::isinstance<py::bytes>(v)) {
      const std::string b = v.cast<std::string>();
      o.theta_bytes.assign(b.begin(), b.end());
    } else if (key == "config") {
      RuleConfig base = o.variant == "celo2-base" ? RuleConfig::celo2_base() : RuleConfig{};
      const flax::Value cfg = to_flax(v, "config");
      // Keys given override the variant's defaults; config_from_value starts from Celo2's.
      RuleConfig c = config_from_value(cfg);
      if (!cfg.find("orthogonalize")) c.orthogonalize = base.orthogonalize;
      o.rule = c;
    } else {
      set_client_option(o, key, option_text(key, v));
    }
  }
  return o;
}

std::shared_ptr<Communicator> communicator_from(py::handle c);

// A communicator Python can hold and pass to several optimizers (and use itself: the demo
// averages its AdamW baseline's gradients over the same MPI ranks).
struct PyComm {
  std::shared_ptr<Communicator> comm;
};

std::shared_ptr<Communicator> communicator_from(py::handle c) {
  if (c.is_none()) return client_communicator("auto");
  if (py::isinstance<py::str>(c)) return client_communicator(c.cast<std::string>());
  if (py::isinstance<PyComm>(c)) return c.cast<PyComm&>().comm;
  return std::make_shared<python::PyCommunicator>(py::reinterpret_borrow<py::object>(c));
}

py::dict report_dict(const StepReport& r, double seconds) {
  py::dict d;
  d["step"] = r.step;
  d["lr"] = r.lr;
  d["skipped"] = r.skipped;
  d["nonfinite"] = r.nonfinite;
  d["update_rms"] = py::make_tuple(r.update_rms[0], r.update_rms[1], r.update_rms[2]);
  d["grad_norm"] = py::make_tuple(r.grad_norm[0], r.grad_norm[1], r.grad_norm[2]);
  d["grad_norm_total"] = r.grad_norm_total;  // before clipping
  d["clip_scale"] = r.clip_scale;
  d["no_grad_tensors"] = r.no_grad_tensors;
  d["masters_reseeded"] = r.masters_reseeded;
  d["nonfinite_update"] = r.nonfinite_update;
  d["seconds"] = seconds;
  return d;
}

py::dict status_dict(Client& c) {
  const ClientStatus s = c.status();
  py::dict d;
  d["step"] = s.step;
  d["skipped"] = s.skipped;
  d["lr"] = s.lr;
  d["rank"] = s.rank;
  d["world_size"] = s.world_size;
  d["backend"] = s.backend;
  d["num_tensors"] = s.num_tensors;
  d["total_elements"] = s.total_elements;
  d["local_range"] = py::make_tuple(s.local_lo, s.local_hi);
  d["schedule"] = s.schedule;
  d["rules"] = s.rules;
  d["theta_sha256"] = s.theta_sha256;
  d["control_address"] = s.control_address;
  d["last_step_seconds"] = s.last_step_seconds;
  d["total_step_seconds"] = s.total_step_seconds;
  d["grad_norm"] = s.grad_norm;
  d["max_grad_norm"] = s.max_grad_norm;
  py::dict by;
  by["celo2"] = s.label_elements[0];
  by["adamw"] = s.label_elements[1];
  by["frozen"] = s.label_elements[2];
  d["elements_by_label"] = by;
  return d;
}

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<int64_t> shape) {
  py::array_t<float> a(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(float));
  return a;
}

// The checkpoint file as Python values (inspection, tests, converters).
py::dict state_file_dict(const py::bytes& b) {
  const std::string s = b;
  const StateFile f = parse_state_file(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()), "<bytes>");
  py::dict d, ts;
  d["step"] = f.step;
  d["skipped"] = f.skipped;
  d["theta_sha256"] = f.theta_sha256;
  for (const TensorStateRecord& r : f.tensors) {
    py::dict t;
    t["shape"] = py::tuple(py::cast(r.shape));
    t["label"] = label_name(r.label);
    t["iteration"] = r.iteration;
    t["count"] = r.count;
    auto planes = [&](const std::vector<float>& v, int64_t k) {
      std::vector<int64_t> shape{k};
      shape.insert(shape.end(), r.shape.begin(), r.shape.end());
      return to_numpy(v, shape);
    };
    if (!r.m.empty()) t["m"] = planes(r.m, kMom);
    if (!r.rms.empty()) t["rms"] = planes(r.rms, kRms);
    if (!r.v_diag.empty()) t["v_diag"] = planes(r.v_diag, kFac);
    if (!r.v_row.empty()) t["v_row"] = to_numpy(r.v_row, {static_cast<int64_t>(r.v_row.size())});
    if (!r.v_col.empty()) t["v_col"] = to_numpy(r.v_col, {static_cast<int64_t>(r.v_col.size())});
    if (!r.mu.empty()) t["mu"] = to_numpy(r.mu, r.shape);
    if (!r.nu.empty()) t["nu"] = to_numpy(r.nu, r.shape);
    if (!r.master.empty()) t["master"] = to_numpy(r.master, r.shape);
    ts[py::str(r.name)] = t;
  }
  d["tensors"] = ts;
  return d;
}

// The Python-visible optimizer: the Client plus references that keep tensors alive.
class PyOptimizer {
 public:
  PyOptimizer(const py::dict& options, py::handle communicator) {
    ClientOptions o = options_from(options);
    comm_ = communicator_from(communicator);
    client_ = std::make_unique<Client>(std::move(o), comm_);
  }
  ~PyOptimizer() {
    // Collectives inside the destructors (the control plane's finish) may call back into
    // Python communicators; the GIL is held here, which is what they need.
    client_.reset();
  }

  void add_tensor(const std::string& name, const std::vector<int64_t>& shape, uintptr_t params,
                  uintptr_t grads, const std::string& dtype, py::object keepalive) {
    const DType d = parse_dtype(dtype);  // of the parameters; gradients are float32
    int64_t n = 1;
    for (int64_t s : shape) {
      if (s < 0) throw std::invalid_argument("add_tensor('" + name + "'): negative dimension");
      n *= s;
    }
    if (n > 0 && (params == 0 || grads == 0))
      throw std::invalid_argument("add_tensor('" + name + "'): null params or grads pointer");
    if (params % dtype_bytes(d) || grads % alignof(float))
      throw std::invalid_argument("add_tensor('" + name + "'): pointers not aligned (params " + dtype +
                                  ", grads float32)");
    client_->add_tensor(name, shape, reinterpret_cast<void*>(params), d, reinterpret_cast<const float*>(grads));
    keep_.push_back(std::move(keepalive));
  }

  void add_array(const std::string& name, py::array params, py::array grads) {
    auto ok = [](const py::array& a) {
      return a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style);
    };
    if (!ok(params) || !ok(grads))
      throw std::invalid_argument("add_array('" + name + "'): params and grads must be C-contiguous float32 arrays");
    if (!params.writeable()) throw std::invalid_argument("add_array('" + name + "'): params are read-only");
    if (params.size() != grads.size())
      throw std::invalid_argument("add_array('" + name + "'): params and grads differ in size");
    std::vector<int64_t> shape(params.shape(), params.shape() + params.ndim());
    client_->add_tensor(name, shape, static_cast<float*>(params.mutable_data()),
                        static_cast<const float*>(grads.data()));
    keep_.push_back(params);
    keep_.push_back(grads);
  }

  py::dict step(std::optional<double> loss, std::optional<double> lr, std::optional<py::bytes> has_grad) {
    StepReport r;
    std::vector<uint8_t> mask;
    if (has_grad) {
      const std::string b = *has_grad;
      mask.assign(b.begin(), b.end());
    }
    {
      py::gil_scoped_release nogil;  // a Python communicator takes it back per collective
      r = client_->step(loss, lr, has_grad ? &mask : nullptr);
    }
    return report_dict(r, client_->status().last_step_seconds);
  }

  py::bytes state_bytes() {
    std::vector<uint8_t> b;
    {
      py::gil_scoped_release nogil;
      b = client_->state_bytes();
    }
    return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
  }

  void load_state_bytes(const py::bytes& bytes) {
    const std::string s = bytes;
    py::gil_scoped_release nogil;
    client_->load_state_bytes(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  }

  template <class F>
  void collective(F&& f) {
    py::gil_scoped_release nogil;
    f();
  }

  Client& client() { return *client_; }
  std::shared_ptr<Communicator> comm() { return comm_; }

 private:
  std::shared_ptr<Communicator> comm_;
  std::unique_ptr<Client> client_;
  std::vector<py::object> keep_;
};

template <class T>
void check_array(const py::array& a, const char* what) {
  if (!a.dtype().is(py::dtype::of<T>()) || !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(what) + ": expected a writeable C-contiguous " +
                                py::str(py::dtype::of<T>()).cast<std::string>() + " array");
}


}  // namespace

PYBIND11_MODULE(_celo2, m) {
  m.doc() = "celo2: the Celo2 learned optimizer engine (C++), without PyTorch";
  m.attr("__version__") = CELO2_VERSION;

  static py::exception<flax::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  static py::exception<CommError> comm_error(m, "CommError", PyExc_RuntimeError);
  static py::exception<UnsupportedError> unsupported(m, "UnsupportedError", PyExc_NotImplementedError);
  static py::exception<NonFiniteGradientError> nonfinite(m, "NonFiniteGradientError", PyExc_FloatingPointError);
  // A file that cannot be opened, read or written: an OSError, and a FormatError for code
  // that caught those before (flax::IoError).
  static py::object file_error = py::module_::import("builtins").attr("type")(
      "FileError", py::make_tuple(format_error, py::handle(PyExc_OSError)),
      py::dict(py::arg("__module__") = "celo2._celo2"));
  m.attr("FileError") = file_error;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const flax::IoError& e) {
      PyErr_SetString(file_error.ptr(), e.what());
    } catch (const flax::FormatError& e) {
      format_error(e.what());
    } catch (const CommError& e) {
      comm_error(e.what());
    } catch (const UnsupportedError& e) {
      unsupported(e.what());
    } catch (const NonFiniteGradientError& e) {
      nonfinite(e.what());
    }
  });

  py::class_<PyComm>(m, "Communicator", R"(The engine's communicator: "auto" (MPI under an MPI
launcher with more than one rank, else local), "local" or "mpi". Its collectives work on
NumPy arrays in place; pass it to several optimizers to share one.)")
      .def(py::init([](const std::string& kind) { return PyComm{client_communicator(kind)}; }),
           py::arg("kind") = "auto")
      .def_property_readonly("rank", [](PyComm& c) { return c.comm->rank(); })
      .def_property_readonly("size", [](PyComm& c) { return c.comm->size(); })
      .def_property_readonly("backend", [](PyComm& c) { return c.comm->backend(); })
      .def("all_reduce_sum",
           [](PyComm& c, py::array a) {
             if (a.dtype().is(py::dtype::of<double>())) {
               check_array<double>(a, "all_reduce_sum");
               double* p = static_cast<double*>(a.mutable_data());
               py::gil_scoped_release nogil;
               c.comm->all_reduce_sum(p, a.size());
             } else {
               check_array<float>(a, "all_reduce_sum");
               float* p = static_cast<float*>(a.mutable_data());
               py::gil_scoped_release nogil;
               c.comm->all_reduce_sum(p, a.size());
             }
           },
           "Sum over ranks, in place (float32 or float64).")
      .def("all_gather",
           [](PyComm& c, py::array send, py::array recv, std::vector<int64_t> counts) {
             check_array<float>(send, "send");
             check_array<float>(recv, "recv");
             if (static_cast<int>(counts.size()) != c.comm->size())
               throw std::invalid_argument("all_gather: one count per rank");
             int64_t total = 0;
             for (int64_t x : counts) total += x;
             if (send.size() != counts[c.comm->rank()] || recv.size() != total)
               throw std::invalid_argument("all_gather: array sizes do not match counts");
             py::gil_scoped_release nogil;
             c.comm->all_gather(static_cast<const float*>(send.data()), static_cast<float*>(recv.mutable_data()), counts);
           })
      .def("reduce_scatter_sum",
           [](PyComm& c, py::array send, py::array recv, std::vector<int64_t> counts) {
             check_array<float>(send, "send");
             check_array<float>(recv, "recv");
             if (static_cast<int>(counts.size()) != c.comm->size())
               throw std::invalid_argument("reduce_scatter_sum: one count per rank");
             int64_t total = 0;
             for (int64_t x : counts) total += x;
             if (send.size() != total || recv.size() != counts[c.comm->rank()])
               throw std::invalid_argument("reduce_scatter_sum: array sizes do not match counts");
             py::gil_scoped_release nogil;
             c.comm->reduce_scatter_sum(static_cast<const float*>(send.data()), static_cast<float*>(recv.mutable_data()),
                                        counts);
           })
      .def("broadcast_bytes",
           [](PyComm& c, py::bytes data, int root) {
             std::string s = data;
             int64_t n = static_cast<int64_t>(s.size());
             {
               py::gil_scoped_release nogil;
               c.comm->broadcast(&n, sizeof(n), root);
               s.resize(static_cast<size_t>(n));
               c.comm->broadcast(s.data(), n, root);
             }
             return py::bytes(s);
           },
           py::arg("data"), py::arg("root") = 0, "Root's bytes on every rank.")
      .def("barrier", [](PyComm& c) {
        py::gil_scoped_release nogil;
        c.comm->barrier();
      });

  py::class_<PyOptimizer>(m, "Optimizer", "The sharded Celo2 engine on this rank (celo2/client.h).")
      .def(py::init<const py::dict&, py::handle>(), py::arg("options"), py::arg("communicator") = py::none())
      .def("add_tensor", &PyOptimizer::add_tensor, py::arg("name"), py::arg("shape"), py::arg("params_ptr"),
           py::arg("grads_ptr"), py::arg("dtype") = "float32", py::arg("keepalive") = py::none(),
           "Register a tensor by data pointers (float32, C order); `keepalive` is held while the "
           "optimizer lives.")
      .def("add_array", &PyOptimizer::add_array, py::arg("name"), py::arg("params"), py::arg("grads"))
      .def("step", &PyOptimizer::step, py::arg("loss") = py::none(), py::arg("lr") = py::none(),
           py::arg("has_grad") = py::none())
      .def("save", [](PyOptimizer& o, const std::string& p) { o.collective([&] { o.client().save(p); }); })
      .def("load", [](PyOptimizer& o, const std::string& p) { o.collective([&] { o.client().load(p); }); })
      .def("state_bytes", &PyOptimizer::state_bytes)
      .def("load_state_bytes", &PyOptimizer::load_state_bytes)
      .def("set_schedule", [](PyOptimizer& o, const std::string& s) { o.client().set_schedule(s); })
      .def("set_rules", [](PyOptimizer& o, const std::string& s) { o.client().set_rules(s); })
      .def("set_theta_file", [](PyOptimizer& o, const std::string& s) { o.client().set_theta_file(s); })
      .def("set_weight_decay", [](PyOptimizer& o, double v) { o.client().set_weight_decay(v); })
      .def("set_mult_1d", [](PyOptimizer& o, double v) { o.client().set_mult_1d(v); })
      .def(
          "set_group",
          [](PyOptimizer& o, const std::string& name, double lr_scale, std::optional<double> wd) {
            TensorGroup g;
            g.lr_scale = lr_scale;
            g.weight_decay = wd;
            o.client().set_group(name, g);
          },
          py::arg("name"), py::arg("lr_scale") = 1.0, py::arg("weight_decay") = py::none(),
          "A tensor's param group: lr multiplier and weight decay (None: the recipe's)")
      .def("set_max_grad_norm", [](PyOptimizer& o, double v) { o.client().set_max_grad_norm(v); })
      .def("gather_params", [](PyOptimizer& o) { o.collective([&] { o.client().gather_params(); }); })
      .def("grad_ready", [](PyOptimizer& o, size_t i) { o.client().grad_ready(i); }, py::arg("index"),
           "overlap_grad_reduce: tensor `index` (registration order) has its final gradient for this step")
      .def("overlapping", [](PyOptimizer& o) { return o.client().engine().overlapping(); },
           "whether grad_ready() overlaps the gradient reduce-scatter with backward (option set, MPI)")
      .def("start_control", [](PyOptimizer& o) { o.collective([&] { o.client().start_control(); }); })
      .def_property_readonly("control_address", [](PyOptimizer& o) { return o.client().control_address(); })
      .def("status", [](PyOptimizer& o) { return status_dict(o.client()); })
      .def("routing_table", [](PyOptimizer& o) { return o.client().routing_table(); })
      .def("plan_report", [](PyOptimizer& o) { return o.client().plan_report(); })
      .def("phase_seconds",
           [](PyOptimizer& o) { return o.client().engine().last_phase_stats().seconds; })
      .def("phase_bytes", [](PyOptimizer& o) { return o.client().engine().last_phase_stats().bytes; })
      .def("local_range",
           [](PyOptimizer& o) {
             o.client().engine().owner_plan();  // the slice plan, even before the first step
             return o.client().engine().local_range();
           })
      .def("offset_of", [](PyOptimizer& o, size_t i) { return o.client().engine().offset_of(i); })
      .def("label_of", [](PyOptimizer& o, size_t i) { return std::string(label_name(o.client().engine().label_of(i))); })
      .def_property_readonly("rank", [](PyOptimizer& o) { return o.comm()->rank(); })
      .def_property_readonly("world_size", [](PyOptimizer& o) { return o.comm()->size(); })
      .def_property_readonly("backend", [](PyOptimizer& o) { return o.comm()->backend(); })
      .def_property_readonly("communicator", [](PyOptimizer& o) { return PyComm{o.comm()}; });

  m.def("read_state_file", &state_file_dict, py::arg("data"),
        "Parse checkpoint bytes (what Optimizer.save writes) into Python values; raises "
        "FormatError on a bad file.");
  m.def("theta_sha256", [](const std::string& path) {
    const flax::Value v = flax::decode(flax::read_file(path));
    const RuleConfig cfg = config_for_theta(v);
    return sha256_hex(theta_to_bytes(theta_from_value(v, cfg)));
  });
  m.def("control_supported", &Client::control_supported);
  m.def("wrap_communicator",
        [](py::object impl) { return PyComm{std::make_shared<python::PyCommunicator>(std::move(impl))}; },
        py::arg("impl"), "A Communicator over a Python object with the collectives (TorchCommunicator).");

  // The loaded OpenBLAS's thread pool. One object per soname per process: a process that
  // loaded the system's default OpenBLAS first (Debian's python3-torch links it) shares that
  // one with this module (docs/OPERATIONS.md, "BLAS").
  m.def("blas_threading", [] { return std::string(blas_threading()); },
        "The thread pool of the BLAS this process loaded: openmp (shared with the rule's "
        "OpenMP loops), pthread (its own) or sequential.");

  m.def("abort_mpi_world", &abort_mpi_world, py::arg("code"), py::arg("reason"),
        "In a job of 2+ MPI ranks: print the reason and MPI_Abort the world (does not return); "
        "else False.");

  // Whether this build has the engine's "cuda" backend (celo2.torch.Celo2 on CUDA tensors).
  m.def("gpu_engine_supported", &cuda_backend_supported,
        "Whether this build has the engine's cuda backend (CUDA kernels, NCCL).");
}
