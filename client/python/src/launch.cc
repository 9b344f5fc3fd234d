// The launcher and rank detector (celo2/launch.h) and the tunables' table (celo2/params.h)
// for Python: celo2.distributed calls the C++ detect_launch(), so Python and C++ read the
// launchers' variables through one piece of code.
//
// Compiled into the _celo2 extension. register_launch(m) adds the functions to a module;
// the same shared object also answers to the module name celo2._launch (PyInit__launch
// below), which celo2/distributed.py loads from _celo2's file, so this works without a line
// in module.cc. When module.cc calls register_launch(m), the functions are also on _celo2.
#include "celo2/launch.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "celo2/communicator.h"
#include "celo2/params.h"

namespace py = pybind11;

namespace celo2::python {

void register_launch(py::module_& m) {
  m.attr("HANG_FIX") = kHangFix;  // celo2/communicator.h: one text for every transport
  m.def(
      "detect_launch",
      [] {
        const LaunchInfo l = detect_launch();
        py::dict d;
        d["launcher"] = l.launcher;
        d["rank"] = l.rank;
        d["size"] = l.size;
        d["local_rank"] = l.local_rank;
        d["local_size"] = l.local_size;
        d["rank_from"] = l.rank_from;
        d["size_from"] = l.size_from;
        d["local_rank_from"] = l.local_rank_from;
        d["local_size_from"] = l.local_size_from;
        d["mpi_launcher"] = l.mpi_launcher;
        d["mpi_variables"] = l.mpi_variables();
        d["mpi_rank"] = l.mpi_rank;
        d["mpi_size"] = l.mpi_size;
        d["mpi_size_from"] = l.mpi_size_from;
        d["master_addr"] = l.master_addr;
        d["master_port"] = l.master_port;
        d["slurm_nodelist"] = l.slurm_nodelist;
        d["describe"] = l.describe();
        return d;
      },
      "The launcher that started this process and where the process sits in the job, as a dict "
      "(celo2/launch.h). Raises celo2.CommError for a malformed or inconsistent variable.");
  m.def(
      "launcher_table",
      [] {
        py::list out;
        for (const LauncherVars& v : launcher_table())
          out.append(py::make_tuple(v.launcher, v.rank, v.size, v.local_rank, v.local_size));
        return out;
      },
      "(launcher, rank, size, local rank, local size) variable names, in detection order.");
  m.def(
      "param_table",
      [] {
        py::list out;
        for (const param::Info& p : param::table())
          out.append(py::make_tuple(p.env, param::kind_text(p), p.default_value, p.meaning));
        return out;
      },
      "(variable, type, default, meaning) of every environment tunable (celo2/params.h).");
  m.def(
      "param_value",
      [](const std::string& env) -> py::object {
        // The C++ accessor of that row: the value in effect, parsed and checked once for the
        // whole process, so Python never reads a tunable on its own.
#define CELO2_PARAM_VALUE(name, var, kind, def, choices, meaning)                        \
  if (env == var) {                                                                     \
    if (param::Kind::kind == param::Kind::kSecret)                                      \
      throw std::invalid_argument(std::string(var) + " is a secret; not readable here"); \
    return py::cast(param::name());                                                     \
  }
        CELO2_PARAMS(CELO2_PARAM_VALUE)
#undef CELO2_PARAM_VALUE
        throw std::invalid_argument("'" + env + "' is not a celo2 tunable (celo2/params.h)");
      },
      py::arg("variable"),
      "The value in effect of an environment tunable (celo2/params.h), typed by its kind "
      "(seconds: float, port: int, bool, text: str). A malformed value raises ValueError "
      "naming the variable and the value.");
}

}  // namespace celo2::python

PYBIND11_MODULE(_launch, m) {
  m.doc() =
      "celo2's launcher and rank detector (celo2/launch.h), loaded from _celo2's shared object";
  celo2::python::register_launch(m);
}
