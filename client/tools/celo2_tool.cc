// celo2-tool: operator utilities that need no running job.
//   celo2-tool theta info FILE [--json]   what a theta.state holds, or why it is unusable
//   celo2-tool golden FILE... [--engine local|reference|sharded] [--tol T] [--verbose]
//                                         check an engine against golden vectors
//   celo2-tool params [--markdown]        the environment tunables in effect and the launch
//                                         detected (--markdown: docs/OPERATIONS.md's tables)
// Every failure is one line on stderr and a non-zero exit status, so scripts can rely on it.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "celo2/flax_msgpack.h"
#include "celo2/launch.h"
#include "celo2/params.h"
#include "celo2/theta_io.h"
#include "golden.h"  // tests/support: the golden-file runner (celo2_golden)

namespace celo2 {
namespace {

struct ArrayStats {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
  double min = 0, max = 0, rms = 0;
  int64_t numel = 0;
};

// "w" + 3 -> "w3" (spelled out: GCC 12 warns falsely on `"w" + std::to_string(i)`).
std::string indexed_name(const char* prefix, int i) {
  std::string s = prefix;
  s += std::to_string(i);
  return s;
}

// Array names in layer order: w0__0..w0__13, b0, w1, b1, ..., wL, bL.
std::vector<std::string> names_in_layer_order(const RuleConfig& cfg) {
  std::vector<std::string> names;
  for (int g = 0; g < kFeatureGroups; ++g) names.push_back(indexed_name("w0__", g));
  names.push_back("b0");
  for (int l = 1; l <= cfg.ff_hidden_layers; ++l) {
    names.push_back(indexed_name("w", l));
    names.push_back(indexed_name("b", l));
  }
  return names;
}

ArrayStats stats_of(const std::string& name, const flax::NdArray& a) {
  ArrayStats s;
  s.name = name;
  s.shape = a.shape;
  s.dtype = a.dtype;
  s.numel = static_cast<int64_t>(a.data.size());
  if (a.data.empty()) return s;
  s.min = std::numeric_limits<double>::infinity();
  s.max = -s.min;
  double sq = 0;
  for (float x : a.data) {
    s.min = std::min<double>(s.min, x);
    s.max = std::max<double>(s.max, x);
    sq += static_cast<double>(x) * x;
  }
  s.rms = std::sqrt(sq / static_cast<double>(a.data.size()));
  return s;
}


int theta_info(const std::string& path, bool json) {
  const std::vector<uint8_t> bytes = flax::read_file(path);
  const std::string sha = sha256_hex(bytes);
  RuleConfig cfg;
  flax::Value root;
  try {
    root = flax::decode(bytes);
    cfg = config_for_theta(root);
    theta_from_value(root, cfg);  // full check: names, shapes, finiteness; v1 refused here
  } catch (const flax::FormatError& e) {
    throw flax::FormatError(path + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
  const RuleConfig def;
  const bool fits_default =
      cfg.ff_hidden_size == def.ff_hidden_size && cfg.ff_hidden_layers == def.ff_hidden_layers;
  const flax::Value& params = root.at("ff_mod_stack").at("~");
  std::vector<ArrayStats> arrays;
  int64_t total = 0;
  for (const std::string& name : names_in_layer_order(cfg)) {
    arrays.push_back(stats_of(name, params.at(name).as_array()));
    total += arrays.back().numel;
  }

  if (json) {
    nlohmann::ordered_json out;
    out["file"] = path;
    out["bytes"] = bytes.size();
    out["sha256"] = sha;
    out["ff_hidden_size"] = cfg.ff_hidden_size;
    out["ff_hidden_layers"] = cfg.ff_hidden_layers;
    out["fits_default_config"] = fits_default;
    out["total_parameters"] = total;
    out["arrays"] = nlohmann::ordered_json::array();
    for (const ArrayStats& a : arrays)
      out["arrays"].push_back({{"name", a.name}, {"shape", a.shape}, {"dtype", a.dtype},
                               {"min", a.min}, {"max", a.max}, {"rms", a.rms}});
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }

  std::printf("file:    %s (%zu bytes)\n", path.c_str(), bytes.size());
  std::printf("sha256:  %s\n", sha.c_str());
  std::printf("fits:    ff_hidden_size %d, ff_hidden_layers %d%s\n", cfg.ff_hidden_size,
              cfg.ff_hidden_layers,
              fits_default ? " (the default Celo2 config)" : " (not the default config)");
  std::printf("%-8s %-10s %-9s %13s %13s %13s\n", "array", "shape", "dtype", "min", "max", "rms");
  for (const ArrayStats& a : arrays) {
    std::printf("%-8s %-10s %-9s %13.6g %13.6g %13.6g\n", a.name.c_str(),
                format_shape(a.shape).c_str(), a.dtype.c_str(), a.min, a.max, a.rms);
  }
  std::printf("total parameters: %lld\n", static_cast<long long>(total));
  return 0;
}

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) {
  CLI::App app{"celo2-tool: inspect Celo2 weights and check the engine against golden vectors"};
  app.require_subcommand(1);

  CLI::App* theta = app.add_subcommand("theta", "Celo2 MLP weights (theta.state files)");
  theta->require_subcommand(1);
  CLI::App* info =
      theta->add_subcommand("info", "Summarize a theta.state, or say why it is unusable");
  std::string theta_file;
  bool json = false;
  info->add_option("FILE", theta_file, "theta.state file")->required();
  info->add_flag("--json", json, "Print one JSON object instead of a table");

  CLI::App* golden = app.add_subcommand("golden", "Check the engine against golden vector files");
  std::vector<std::string> golden_files;
  std::string engine = "local";
  double tol = 1e-4;
  bool verbose = false;
  golden->add_option("FILE", golden_files, "rule_*.msgpack / optimizer_*.msgpack files")
      ->required();
  golden
      ->add_option("--engine", engine,
                   "local: the fast CPU engine; reference: the spec's reference rule; "
                   "sharded: the MPI-sharded engine (run under mpirun -np N)")
      ->check(CLI::IsMember({"local", "reference", "sharded"}))
      ->capture_default_str();
  golden->add_option("--tol", tol, "Max |error| / RMS(expected) per tensor")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  golden->add_flag("--verbose", verbose, "Print every tensor's error");

  CLI::App* params = app.add_subcommand(
      "params", "The environment tunables (CELO2_*) in effect, and the launch detected");
  bool markdown = false;
  params->add_flag("--markdown", markdown,
                   "Print docs/OPERATIONS.md's tables of tunables and launcher variables instead");

  CLI11_PARSE(app, argc, argv);

  try {
    if (info->parsed()) return celo2::theta_info(theta_file, json);
    if (params->parsed()) {
      if (markdown) {
        std::printf("%s\n%s", celo2::param::markdown_table().c_str(),
                    celo2::launch_markdown_tables().c_str());
        return 0;
      }
      std::printf("%s\nlaunch: %s\n", celo2::param::describe().c_str(),
                  celo2::detect_launch().describe().c_str());
      return 0;
    }
    if (golden->parsed()) {
      const auto which = engine == "reference" ? celo2::GoldenEngine::kReference
                         : engine == "sharded" ? celo2::GoldenEngine::kSharded
                                               : celo2::GoldenEngine::kFast;
      return celo2::run_golden_cli(golden_files, tol, verbose, which);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "celo2-tool: error: %s\n", e.what());
    return 1;
  }
  return 2;
}
