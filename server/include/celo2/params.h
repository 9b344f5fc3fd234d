// Every environment tunable of celo2, in one table (in the style of NCCL's NCCL_PARAM): the
// accessor's name, the variable, its kind, its default and one line of meaning. Code reads a
// tunable only through its accessor (celo2::param::comm_timeout_s(), ...), never through
// getenv; docs/OPERATIONS.md ("Environment tunables") carries the same table, rendered by
// markdown_table() (`celo2-tool params --markdown`) and checked by tests/unit/params_test.cc.
//
// Each accessor reads its variable once, at its first call, and keeps the value for the life
// of the process (the environment of a job does not change under it). An empty variable is
// unset. A malformed value is refused: the accessor throws ParamError naming the variable
// and the value, at that call and every later one, rather than falling back to the default.
//
// The variables of the launchers (RANK, WORLD_SIZE, SLURM_*, OMPI_COMM_WORLD_*, PMIX_*,
// PMI_*, MASTER_ADDR, MASTER_PORT) are not tunables: celo2/launch.h reads them.
//
// Adding a tunable: one X(...) line below, then `celo2-tool params --markdown` into
// docs/OPERATIONS.md. No other file (params.cc included) needs a change.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace celo2 {

// A tunable set to a value its kind does not accept; what() names the variable and value.
class ParamError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace param {

// How a value is parsed (and what the accessor returns).
enum class Kind {
  kSeconds,  // double: a finite number >= 0
  kPort,     // int: a TCP port 1..65535; unset: 0
  kInt,      // int: a whole number >= 0; unset: 0
  kBool,     // bool: 1/0, true/false, yes/no, on/off (any case)
  kChoice,   // std::string: one of the entry's choices ("a|b|c")
  kString,   // std::string: any text
  kPath,     // std::string: a file or directory
  kSecret,   // std::string: any text, never printed
};

// X(accessor, VARIABLE, Kind, default ("" = unset), choices (kChoice: "a|b|c"), meaning)
// clang-format off
#define CELO2_PARAMS(X)                                                                          \
  X(comm_timeout_s, "CELO2_COMM_TIMEOUT_S", kSeconds, "600", "",                                 \
    "Seconds a collective or a bootstrap step may take before the job stops with an error "      \
    "naming the cause (a rank gone, or alive in another collective); every transport (MPI, "     \
    "NCCL, torch/gloo, the TCP bootstrap); 0: no limit")                                         \
  X(nccl_bootstrap, "CELO2_NCCL_BOOTSTRAP", kChoice, "auto", "mpi|tcp|auto",                     \
    "How rank 0's ncclUniqueId reaches the other ranks: MPI_Bcast, celo2's TCP store, or auto "  \
    "(mpi when MPI is initialized or an MPI launcher started these ranks, else tcp)")            \
  X(bootstrap_addr, "CELO2_BOOTSTRAP_ADDR", kString, "", "",                                     \
    "Host of rank 0 for the TCP bootstrap; unset: MASTER_ADDR, the first host of "               \
    "SLURM_JOB_NODELIST, or 127.0.0.1 when Open MPI runs every rank on one node")                \
  X(bootstrap_port, "CELO2_BOOTSTRAP_PORT", kPort, "", "",                                       \
    "Port of the TCP bootstrap on rank 0; unset: MASTER_PORT+1, else 29510")                     \
  X(bootstrap_bind, "CELO2_BOOTSTRAP_BIND", kString, "", "",                                     \
    "Address rank 0 binds for the TCP bootstrap; unset: every address")                          \
  X(slurm_mpi, "CELO2_SLURM_MPI", kBool, "1", "",                                                \
    "Under srun without PMIx/PMI variables, take Slurm's tasks for MPI ranks (auto transport); " \
    "0 for srun + torchrun jobs")                                                                \
  X(control_token, "CELO2_CONTROL_TOKEN", kSecret, "", "",                                       \
    "Control-plane bearer token when no token or token file is given (trainer and celo2ctl)")   \
  X(control_addr, "CELO2_CONTROL_ADDR", kString, "", "",                                         \
    "celo2ctl's server address (host:port) when --addr is not given")                            \
  X(mpi_reduce_scatter, "CELO2_MPI_REDUCE_SCATTER", kChoice, "ring", "ring|mpi",                 \
    "The MPI transport's reduce-scatter (the gradients): celo2's ring of MPI_Sendrecv in "       \
    "windows of 4 MiB (ring), or MPI_Reduce_scatter (mpi), which in Open MPI 4.1 took about "    \
    "5x as long on 2 ranks of one node (docs/PERF.md)")                                          \
  X(ns_method, "CELO2_NS_METHOD", kChoice, "auto", "auto|standard|gram",                          \
    "Newton-Schulz on the CPU: standard (auto) or gram (the Gram iteration with restarts every " \
    "2 iterations, for every matrix; fewer FLOPs on wide matrices, docs/PERF.md)")               \
  X(ns_split, "CELO2_NS_SPLIT", kInt, "", "",                                                   \
    "Newton-Schulz groups of the flat plan: unset or 0, chosen by cost (a matrix is split over "  \
    "a group of ranks only where the largest matrices bound the step); 1, one owner per "        \
    "matrix; g >= 2, every matrix split over groups of g ranks (tests); g >= 2 is refused "      \
    "with an error on the whole-tensor plan (the cuda and reference backends), which does not "  \
    "split")                                                                                     \
  X(ns_split_poly, "CELO2_NS_SPLIT_POLY", kChoice, "auto", "auto|on|off",                      \
    "Newton-Schulz groups: the polynomial B = bA + cA^2 formed redundantly by every member "      \
    "(off) or split by rows and all-gathered (on); auto, where the cost model says it pays")      \
  X(ns_split_apply, "CELO2_NS_SPLIT_APPLY", kChoice, "auto", "auto|product|polynomial",          \
    "Newton-Schulz groups without a split polynomial: each member applies it as two products "   \
    "with A (product) or through B = bA + cA^2 (polynomial); auto, products where the member's " \
    "block has fewer columns than the matrix has rows (fewer FLOPs)")                             \
  X(cpu_isa, "CELO2_CPU_ISA", kChoice, "auto", "auto|avx512|avx2|base",                         \
    "Which copy of the CPU rule's vector loops runs: auto (the best this CPU supports), or one "  \
    "forced (to compare them; a set this CPU lacks is an error at engine start)")                \
  X(cpu_prefetch, "CELO2_CPU_PREFETCH", kBool, "1", "",                                          \
    "Whether the CPU rule's passes prefetch their arrays in software, 3 KiB ahead (0 to compare; " \
    "the results are the same either way)")                                                      \
  X(fashion_mnist_dir, "CELO2_FASHION_MNIST_DIR", kPath,                                         \
    "/usr/share/datasets/fashion-mnist", "",                                                     \
    "Directory of the Fashion-MNIST files (celo2-train, celo2-metatrain eval)")                  \
  X(digits_csv, "CELO2_DIGITS_CSV", kPath,                                                       \
    "/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz", "",                    \
    "scikit-learn's digits.csv.gz, the data of celo2-metatrain's tasks")
// clang-format on

// One row of the table.
struct Info {
  const char* name;  // the accessor: celo2::param::<name>()
  const char* env;   // the environment variable
  Kind kind;
  const char* default_value;  // "" = unset
  const char* choices;        // kChoice: "a|b|c"; else ""
  const char* meaning;        // one line
};

// The table, in the order above.
const std::vector<Info>& table();
// The row of an environment variable; throws std::out_of_range for one not in the table.
const Info& info(const std::string& env);
// "seconds", "port", "bool", "mpi, tcp or auto", "string", "path", "secret".
std::string kind_text(const Info& p);

// The accessors' value types.
template <Kind K>
struct ValueOf {
  using type = std::string;
};
template <>
struct ValueOf<Kind::kSeconds> {
  using type = double;
};
template <>
struct ValueOf<Kind::kPort> {
  using type = int;
};
template <>
struct ValueOf<Kind::kInt> {
  using type = int;
};
template <>
struct ValueOf<Kind::kBool> {
  using type = bool;
};

// One accessor per row: double comm_timeout_s(); std::string nccl_bootstrap(); ...
#define CELO2_PARAM_DECLARE(name, env, kind, def, choices, meaning) \
  ValueOf<Kind::kind>::type name();
CELO2_PARAMS(CELO2_PARAM_DECLARE)
#undef CELO2_PARAM_DECLARE

// True when the variable is set (non-empty) in the environment, whatever its value.
bool is_set(const Info& p);

// Forgets every parsed value: the next access reads the environment again. For tests that
// change the environment in-process; a job never needs it.
void reload();

// A listing for people (celo2-tool params): each tunable, its value in effect and where it
// came from (environment or default; secrets shown as set/unset; a malformed value as its
// error). Never throws ParamError.
std::string describe();

// The table of docs/OPERATIONS.md, one row per tunable:
// | variable | type | default | meaning |
std::string markdown_table();

}  // namespace param
}  // namespace celo2
