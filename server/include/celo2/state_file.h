// Optimizer-state checkpoints, shared by the single-process Optimizer and the sharded
// Engine. The file holds world-size-independent state: whole tensors by name, so a job saved
// on W ranks resumes on W' ranks. Layout (flax MessagePack):
//   {"celo2_state": {"format": "celo2-optimizer-state/1", "step", "skipped", "theta_sha256",
//                    "tensors": {name: {"shape", "label", ...state arrays...,
//                                       optional "master" (bf16/fp16 parameters)}}},
//    "sha256": hex SHA-256 of the encoded celo2_state}
// Writes are atomic (temporary file, fsync, rename). Reads check the checksum, the format
// and every array's size, and throw flax::FormatError naming the file and the problem.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "celo2/labels.h"

namespace celo2 {

struct TensorStateRecord {
  std::string name;
  std::vector<int64_t> shape;
  Label label = Label::kCelo2;
  // celo2
  int64_t iteration = 0;
  std::vector<float> m, rms, v_row, v_col, v_diag;  // planar, as RuleState
  // adamw
  int64_t count = 0;
  std::vector<float> mu, nu;
  // bf16/fp16 parameters (any label): the float32 master of the whole tensor; empty for
  // float32 parameters and in checkpoints written without masters (then re-seeded).
  std::vector<float> master;
};

struct StateFile {
  int64_t step = 0;
  int64_t skipped = 0;
  std::string theta_sha256;
  std::vector<TensorStateRecord> tensors;  // sorted by name on read
};

void write_state_file(const std::string& path, const StateFile& s);
StateFile read_state_file(const std::string& path);
// Parse bytes already read (e.g. broadcast from rank 0); `path` only names the source.
StateFile parse_state_file(std::span<const uint8_t> bytes, const std::string& path);

// Checks that `rec` fits a registered tensor (name, shape, label, array sizes); throws
// flax::FormatError "<path>: tensors/<name>: ..." otherwise.
void check_state_record(const std::string& path, const TensorStateRecord& rec,
                        const std::vector<int64_t>& shape, Label label);
// Find by name; nullptr if absent.
const TensorStateRecord* find_record(const StateFile& s, const std::string& name);

}  // namespace celo2
