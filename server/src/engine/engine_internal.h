// The engine's checkpoint helpers, shared by its own files only (not user API; the public
// interface is celo2/engine.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "celo2/communicator.h"
#include "celo2/labels.h"
#include "celo2/state_file.h"

namespace celo2 {

// Collective: rank 0's `local_error` (empty: none) thrown on every rank as flax::FormatError
// (flax::IoError when rank 0 says `io`: the file could not be opened, read or written), so
// that every rank reaches the same verdict about a file only rank 0 read or wrote.
void agree_on_error(Communicator& comm, const std::string& local_error, bool io = false);

// Collective: rank 0 reads the checkpoint at `path`, every rank parses the same bytes (and so
// reaches the same verdict) and gets, for each registered tensor (names, shapes, labels in
// registration order), its checked record in `f` (celo2/state_file.h). Throws
// flax::FormatError naming the file and the problem; nothing is changed by a failure.
struct TensorIdentity {
  const std::string* name;
  const std::vector<int64_t>* shape;
  Label label;
};
std::vector<const TensorStateRecord*> read_state_collective(Communicator& comm, const std::string& path,
                                                            const std::vector<TensorIdentity>& tensors,
                                                            StateFile& f);

}  // namespace celo2
