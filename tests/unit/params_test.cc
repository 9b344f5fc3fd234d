// The environment tunables (celo2/params.h) and the launcher detector (celo2/launch.h):
// docs/OPERATIONS.md lists exactly the code's tunables with the same defaults (its tables are
// the code's, as `celo2-tool params --markdown` prints them), defaults and values parse,
// values are read once, malformed values are refused with the variable and value named, and
// detect_launch() reads torchrun, Slurm, Open MPI and no launcher. In-process: setenv, then
// param::reload().
#include "celo2/params.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/launch.h"

namespace {

namespace param = celo2::param;

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

const char* kLaunchVars[] = {"RANK",
                             "WORLD_SIZE",
                             "LOCAL_RANK",
                             "LOCAL_WORLD_SIZE",
                             "MASTER_ADDR",
                             "MASTER_PORT",
                             "SLURM_PROCID",
                             "SLURM_NTASKS",
                             "SLURM_LOCALID",
                             "SLURM_NTASKS_PER_NODE",
                             "SLURM_JOB_NODELIST",
                             "SLURM_NODELIST",
                             "OMPI_COMM_WORLD_RANK",
                             "OMPI_COMM_WORLD_SIZE",
                             "OMPI_COMM_WORLD_LOCAL_RANK",
                             "OMPI_COMM_WORLD_LOCAL_SIZE",
                             "PMIX_RANK",
                             "PMIX_SIZE",
                             "PMI_RANK",
                             "PMI_SIZE"};

// Every test starts with no tunable and no launcher variable set.
class Env : public ::testing::Test {
 protected:
  void SetUp() override { clear(); }
  void TearDown() override { clear(); }
  static void clear() {
    for (const param::Info& p : param::table()) ::unsetenv(p.env);
    for (const char* v : kLaunchVars) ::unsetenv(v);
    param::reload();
  }
  static void set(const char* k, const std::string& v) { ::setenv(k, v.c_str(), 1); }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const std::string kOperations = std::string(CELO2_GOLDEN_DIR) + "/../../docs/OPERATIONS.md";

// The text between "<!-- NAME:begin -->" and "<!-- NAME:end -->" (each on its own line).
std::string section(const std::string& doc, const std::string& name) {
  const std::string begin = "<!-- " + name + ":begin -->\n", end = "<!-- " + name + ":end -->";
  const size_t a = doc.find(begin);
  if (a == std::string::npos) return "(no " + begin + ")";
  const size_t b = doc.find(end, a);
  if (b == std::string::npos) return "(no " + end + ")";
  return doc.substr(a + begin.size(), b - a - begin.size());
}

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '`')) s.pop_back();
  size_t i = 0;
  while (i < s.size() && (s[i] == ' ' || s[i] == '`')) ++i;
  return s.substr(i);
}

// The rows of a markdown table: cells, without the header and the |---| line.
std::vector<std::vector<std::string>> rows(const std::string& table) {
  std::vector<std::vector<std::string>> out;
  std::istringstream in(table);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != '|') continue;
    if (n++ < 2) continue;  // header, separator
    std::vector<std::string> cells;
    std::string cell;
    for (size_t i = 1; i < line.size(); ++i) {
      if (line[i] == '|')
        cells.push_back(trim(cell)), cell.clear();
      else
        cell += line[i];
    }
    out.push_back(cells);
  }
  return out;
}

TEST(ParamsTable, WellFormed) {
  std::set<std::string> names, envs;
  for (const param::Info& p : param::table()) {
    EXPECT_TRUE(std::string(p.env).rfind("CELO2_", 0) == 0) << p.env;
    EXPECT_TRUE(names.insert(p.name).second) << "accessor twice: " << p.name;
    EXPECT_TRUE(envs.insert(p.env).second) << "variable twice: " << p.env;
    const std::string meaning = p.meaning;
    EXPECT_FALSE(meaning.empty()) << p.env;
    EXPECT_FALSE(has(meaning, "|") || has(meaning, "\n")) << p.env << ": one line, no '|'";
    EXPECT_EQ(std::string(p.choices).empty(), p.kind != param::Kind::kChoice) << p.env;
    EXPECT_EQ(&param::info(p.env), &p);
  }
  EXPECT_THROW(param::info("CELO2_NO_SUCH_THING"), std::out_of_range);
  EXPECT_EQ(param::kind_text(param::info("CELO2_NCCL_BOOTSTRAP")), "mpi, tcp or auto");
}

TEST(ParamsTable, DocsListExactlyTheCodesTunables) {
  const std::string doc = read_file(kOperations);
  ASSERT_FALSE(doc.empty()) << "cannot read " << kOperations;
  const std::string table = section(doc, "celo2-params");
  std::map<std::string, std::string> documented;  // variable -> default ("" = unset)
  std::vector<std::string> order;
  for (const auto& r : rows(table)) {
    ASSERT_EQ(r.size(), 4u)
        << "a row of docs/OPERATIONS.md's tunables is not | variable | type | default | "
           "meaning |";
    EXPECT_TRUE(documented.emplace(r[0], r[2] == "unset" ? "" : r[2]).second)
        << r[0] << " listed twice";
    order.push_back(r[0]);
  }
  std::vector<std::string> code_order;
  for (const param::Info& p : param::table()) {
    code_order.push_back(p.env);
    const auto it = documented.find(p.env);
    if (it == documented.end()) {
      ADD_FAILURE() << p.env << " is not in docs/OPERATIONS.md's table of tunables";
      continue;
    }
    EXPECT_EQ(it->second, p.default_value) << p.env << ": docs and code disagree on the default";
    documented.erase(it);
  }
  for (const auto& [v, d] : documented)
    ADD_FAILURE() << v << " is documented but not in celo2/params.h";
  EXPECT_EQ(order, code_order) << "order differs";
  // The whole table, meaning included, is the code's.
  EXPECT_EQ(table, param::markdown_table())
      << "docs/OPERATIONS.md's table of tunables differs from the code's: replace the lines "
         "between "
         "<!-- celo2-params:begin --> and <!-- celo2-params:end --> with `celo2-tool params "
         "--markdown`'s "
         "first table:\n"
      << param::markdown_table();
}

TEST(ParamsTable, DocsListTheDetectorsLaunchers) {
  const std::string doc = read_file(kOperations);
  const std::string tables = section(doc, "celo2-launchers");
  EXPECT_EQ(tables, celo2::launch_markdown_tables())
      << "docs/OPERATIONS.md's launcher tables differ from celo2/launch.h's: replace the lines "
         "between "
         "<!-- celo2-launchers:begin --> and <!-- celo2-launchers:end --> with:\n"
      << celo2::launch_markdown_tables();
}

TEST_F(Env, Defaults) {
  EXPECT_EQ(param::comm_timeout_s(), 600.0);
  EXPECT_EQ(celo2::comm_timeout_seconds(), 600.0);
  EXPECT_EQ(param::nccl_bootstrap(), "auto");
  EXPECT_EQ(param::bootstrap_addr(), "");
  EXPECT_EQ(param::bootstrap_port(), 0);
  EXPECT_EQ(param::bootstrap_bind(), "");
  EXPECT_TRUE(param::slurm_mpi());
  EXPECT_EQ(param::control_token(), "");
  EXPECT_EQ(param::control_addr(), "");
  EXPECT_EQ(param::fashion_mnist_dir(), "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(param::digits_csv(),
            "/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz");
  for (const param::Info& p : param::table()) EXPECT_FALSE(param::is_set(p)) << p.env;
  EXPECT_FALSE(has(param::describe(), "INVALID"));
}

TEST_F(Env, Values) {
  set("CELO2_COMM_TIMEOUT_S", "2.5");
  set("CELO2_NCCL_BOOTSTRAP", "tcp");
  set("CELO2_BOOTSTRAP_PORT", "31000");
  set("CELO2_SLURM_MPI", "Off");
  set("CELO2_BOOTSTRAP_ADDR", "10.0.0.5");
  set("CELO2_FASHION_MNIST_DIR", "/data/fm");
  set("CELO2_CONTROL_TOKEN", "s3cret-token-0123456789");
  EXPECT_EQ(param::comm_timeout_s(), 2.5);
  EXPECT_EQ(param::nccl_bootstrap(), "tcp");
  EXPECT_EQ(param::bootstrap_port(), 31000);
  EXPECT_FALSE(param::slurm_mpi());
  EXPECT_EQ(param::bootstrap_addr(), "10.0.0.5");
  EXPECT_EQ(param::fashion_mnist_dir(), "/data/fm");
  EXPECT_EQ(param::control_token(), "s3cret-token-0123456789");
  EXPECT_TRUE(param::is_set(param::info("CELO2_CONTROL_TOKEN")));
  const std::string listing = param::describe();
  EXPECT_TRUE(has(listing, "CELO2_COMM_TIMEOUT_S = 2.5  [environment]")) << listing;
  EXPECT_TRUE(has(listing, "CELO2_CONTROL_TOKEN = (hidden)")) << listing;
  EXPECT_FALSE(has(listing, "s3cret")) << "the listing shows a secret";
  set("CELO2_COMM_TIMEOUT_S", "0");  // 0 disables the timeout
  set("CELO2_SLURM_MPI", "");        // empty = unset: the default
  param::reload();
  EXPECT_EQ(param::comm_timeout_s(), 0.0);
  EXPECT_TRUE(param::slurm_mpi());
}

TEST_F(Env, ReadOnce) {
  set("CELO2_COMM_TIMEOUT_S", "30");
  EXPECT_EQ(param::comm_timeout_s(), 30.0);
  set("CELO2_COMM_TIMEOUT_S", "45");
  EXPECT_EQ(param::comm_timeout_s(), 30.0) << "a tunable is read once";
  param::reload();
  EXPECT_EQ(param::comm_timeout_s(), 45.0);
}

TEST_F(Env, MalformedValuesAreRefusedNamingVariableAndValue) {
  const std::vector<std::pair<const char*, std::string>> bad = {
      {"CELO2_COMM_TIMEOUT_S", "abc"},   {"CELO2_COMM_TIMEOUT_S", "-1"},
      {"CELO2_COMM_TIMEOUT_S", "10s"},   {"CELO2_COMM_TIMEOUT_S", "nan"},
      {"CELO2_COMM_TIMEOUT_S", "inf"},   {"CELO2_BOOTSTRAP_PORT", "0"},
      {"CELO2_BOOTSTRAP_PORT", "65536"}, {"CELO2_BOOTSTRAP_PORT", "x1"},
      {"CELO2_SLURM_MPI", "maybe"},      {"CELO2_NCCL_BOOTSTRAP", "carrier-pigeon"},
      {"CELO2_NCCL_BOOTSTRAP", "MPI"}};
  for (const auto& [var, value] : bad) {
    clear();
    set(var, value);
    auto access = [&, v = std::string(var)] {
      if (v == "CELO2_COMM_TIMEOUT_S") return (void)param::comm_timeout_s();
      if (v == "CELO2_BOOTSTRAP_PORT") return (void)param::bootstrap_port();
      if (v == "CELO2_SLURM_MPI") return (void)param::slurm_mpi();
      (void)param::nccl_bootstrap();
    };
    for (int attempt = 0; attempt < 2; ++attempt) {  // refused at every access, not only the first
      try {
        access();
        ADD_FAILURE() << var << "='" << value << "' was accepted";
      } catch (const celo2::ParamError& e) {
        EXPECT_TRUE(has(e.what(), std::string(var) + "='" + value + "'")) << e.what();
      }
    }
    EXPECT_TRUE(has(param::describe(), "INVALID")) << var;  // the listing reports, never throws
  }
  clear();
  set("CELO2_NCCL_BOOTSTRAP", "carrier-pigeon");
  try {
    param::nccl_bootstrap();
  } catch (const celo2::ParamError& e) {
    EXPECT_STREQ(
        e.what(),
        "environment variable CELO2_NCCL_BOOTSTRAP='carrier-pigeon': expected mpi, tcp or auto");
  }
  clear();
  set("CELO2_COMM_TIMEOUT_S", "soon");
  EXPECT_THROW(celo2::comm_timeout_seconds(), celo2::ParamError);
  EXPECT_THROW(celo2::comm_timeout_seconds(), std::invalid_argument);
}

// ------------------------------------------------------------------ the launch detector

TEST_F(Env, DetectNone) {
  const celo2::LaunchInfo l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "none");
  EXPECT_EQ(l.rank, 0);
  EXPECT_EQ(l.size, 1);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_EQ(l.local_size, 1);
  EXPECT_EQ(l.mpi_launcher, "");
  EXPECT_FALSE(l.mpi_variables());
  EXPECT_EQ(l.mpi_size, -1);
  EXPECT_EQ(celo2::make_communicator("auto")->backend(), "local");
}

TEST_F(Env, DetectTorchrun) {
  set("RANK", "5");
  set("WORLD_SIZE", "8");
  set("LOCAL_RANK", "1");
  set("LOCAL_WORLD_SIZE", "4");
  set("MASTER_ADDR", "node0");
  set("MASTER_PORT", "29500");
  celo2::LaunchInfo l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "torchrun");
  EXPECT_EQ(l.rank, 5);
  EXPECT_EQ(l.size, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.local_size, 4);
  EXPECT_EQ(l.rank_from, "RANK");
  EXPECT_EQ(l.size_from, "WORLD_SIZE");
  EXPECT_EQ(l.local_rank_from, "LOCAL_RANK");
  EXPECT_EQ(l.local_size_from, "LOCAL_WORLD_SIZE");
  EXPECT_EQ(l.master_addr, "node0");
  EXPECT_EQ(l.master_port, "29500");
  EXPECT_EQ(l.mpi_launcher, "");
  EXPECT_TRUE(has(l.describe(), "torchrun: rank 5 of 8 (RANK, WORLD_SIZE)")) << l.describe();
  ::unsetenv("LOCAL_RANK");
  ::unsetenv("LOCAL_WORLD_SIZE");
  l = celo2::detect_launch();
  EXPECT_EQ(l.local_rank, 5) << "a missing local rank is the rank";
  EXPECT_EQ(l.local_rank_from, "");
  EXPECT_EQ(l.local_size, -1) << "a missing local world size is unknown";
  // torchrun wins over Slurm and Open MPI.
  set("SLURM_PROCID", "1");
  set("SLURM_NTASKS", "2");
  set("OMPI_COMM_WORLD_RANK", "0");
  set("OMPI_COMM_WORLD_SIZE", "3");
  l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "torchrun");
  EXPECT_EQ(l.mpi_launcher, "openmpi");
  EXPECT_EQ(l.mpi_size, 3);
}

TEST_F(Env, DetectSlurm) {
  set("SLURM_PROCID", "3");
  set("SLURM_NTASKS", "8");
  set("SLURM_LOCALID", "1");
  set("SLURM_NTASKS_PER_NODE", "2");
  set("SLURM_NODELIST", "gpu[003-006]");
  celo2::LaunchInfo l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "slurm");
  EXPECT_EQ(l.rank, 3);
  EXPECT_EQ(l.size, 8);
  EXPECT_EQ(l.local_rank, 1);
  EXPECT_EQ(l.local_size, 2);
  EXPECT_EQ(l.slurm_nodelist, "gpu[003-006]");
  // Plain srun: no MPI variables, but srun may start MPI ranks (CELO2_SLURM_MPI=1).
  EXPECT_EQ(l.mpi_launcher, "srun");
  EXPECT_FALSE(l.mpi_variables());
  EXPECT_EQ(l.mpi_rank, 3);
  EXPECT_EQ(l.mpi_size, 8);
  set("SLURM_JOB_NODELIST", "a1,b2");
  EXPECT_EQ(celo2::detect_launch().slurm_nodelist, "a1,b2");
  // srun --mpi=pmix: PMIx's rank, Slurm's task count.
  set("PMIX_RANK", "3");
  l = celo2::detect_launch();
  EXPECT_EQ(l.mpi_launcher, "pmix");
  EXPECT_TRUE(l.mpi_variables());
  EXPECT_EQ(l.mpi_rank, 3);
  EXPECT_EQ(l.mpi_size, 8);
  EXPECT_EQ(l.mpi_size_from, "SLURM_NTASKS");
  // srun + torchrun: CELO2_SLURM_MPI=0, Slurm's tasks are not MPI ranks; auto is local.
  ::unsetenv("PMIX_RANK");
  set("CELO2_SLURM_MPI", "0");
  param::reload();
  l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "slurm");
  EXPECT_EQ(l.mpi_launcher, "");
  EXPECT_EQ(l.mpi_size, -1);
  EXPECT_EQ(celo2::make_communicator("auto")->backend(), "local");
}

TEST_F(Env, DetectOpenMpi) {
  set("OMPI_COMM_WORLD_RANK", "2");
  set("OMPI_COMM_WORLD_SIZE", "4");
  set("OMPI_COMM_WORLD_LOCAL_RANK", "0");
  set("OMPI_COMM_WORLD_LOCAL_SIZE", "2");
  set("PMIX_RANK", "2");  // Open MPI's mpirun sets both; Open MPI's variables come first
  const celo2::LaunchInfo l = celo2::detect_launch();
  EXPECT_EQ(l.launcher, "openmpi");
  EXPECT_EQ(l.rank, 2);
  EXPECT_EQ(l.size, 4);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_EQ(l.local_size, 2);
  EXPECT_EQ(l.local_size_from, "OMPI_COMM_WORLD_LOCAL_SIZE");
  EXPECT_EQ(l.mpi_launcher, "openmpi");
  EXPECT_EQ(l.mpi_rank, 2);
  EXPECT_EQ(l.mpi_size, 4);
  EXPECT_EQ(l.mpi_size_from, "OMPI_COMM_WORLD_SIZE");
}

TEST_F(Env, DetectRefusesMalformedAndInconsistentVariables) {
  auto error = [] {
    try {
      celo2::detect_launch();
    } catch (const celo2::CommError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  set("RANK", "x");
  set("WORLD_SIZE", "2");
  EXPECT_TRUE(has(error(), "RANK='x' is not a valid rank")) << error();
  set("RANK", "2");
  EXPECT_TRUE(has(error(), "torchrun environment: rank 2 is not below the world size 2"))
      << error();
  ::unsetenv("WORLD_SIZE");
  EXPECT_TRUE(has(error(), "torchrun environment incomplete: RANK and WORLD_SIZE must both be set"))
      << error();
  clear();
  set("SLURM_PROCID", "0");
  set("SLURM_NTASKS", "2");
  set("SLURM_LOCALID", "-1");
  EXPECT_TRUE(has(error(), "SLURM_LOCALID='-1'")) << error();
  clear();
  set("PMI_SIZE", "two");
  EXPECT_TRUE(has(error(), "PMI_SIZE='two'")) << error();
  clear();
  set("SLURM_PROCID", "0");
  set("SLURM_NTASKS", "2");
  set("CELO2_SLURM_MPI", "perhaps");
  EXPECT_THROW(celo2::detect_launch(), celo2::ParamError);
}

}  // namespace
