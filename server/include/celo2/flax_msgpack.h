// Flax-serialized MessagePack (spec/celo2.md §7): the format of published theta.state files,
// golden vectors and our own checkpoints. A small value tree over msgpack-c.
//
// Arrays are MessagePack extension type 1 (type 3: numpy scalar) whose payload is itself
// MessagePack: [shape list, dtype name, raw C-order bytes]; dtypes float32, float64,
// bfloat16, float16 are decoded to float32 (float64 also kept exactly in `f64`). Arrays
// over 2^30 bytes may be stored as a map {"__msgpack_chunked_array__", "shape", "chunks"}
// and are reassembled on decode. Map key order is not significant.
//
// Hostile input: decode() never reads out of bounds, bounds nesting depth and claimed sizes
// by the bytes actually present, and throws FormatError naming where the problem is.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace celo2::flax {

class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A file that cannot be opened, read or written (missing, a directory, no permission, disk
// full): not a bad format. The C ABI reports CELO2_ERR_IO; Python raises celo2.FileError, an
// OSError (and a FormatError, for code that caught that before).
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct NdArray {
  std::vector<int64_t> shape;
  std::string dtype;        // as stored: float32, float64, bfloat16, float16
  std::vector<float> data;  // C order, converted to float32
  std::vector<double> f64;  // filled only when dtype == float64
  int64_t numel() const;
};

struct Value {
  enum class Kind { kNil, kBool, kInt, kFloat, kString, kList, kMap, kArray };
  Kind kind = Kind::kNil;
  bool b = false;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  std::vector<Value> list;
  std::map<std::string, Value> map;  // keys as strings (integer keys are stringified)
  std::shared_ptr<NdArray> array;
  // Where this value sits in the decoded tree ("steps/3/grads"; empty for the root and for
  // values built in code). Set by decode(); used only in error messages.
  std::string where;

  bool is_map() const { return kind == Kind::kMap; }
  bool is_array() const { return kind == Kind::kArray; }
  // Lookup helpers: throw FormatError("missing key 'x' in <where>") when absent or the
  // wrong kind.
  const Value& at(const std::string& key) const;
  const Value* find(const std::string& key) const;
  const NdArray& as_array() const;
  double as_number() const;  // int or float
  const std::string& as_string() const;
  bool as_bool() const;

  static Value of_map() { Value v; v.kind = Kind::kMap; return v; }
  static Value of_string(std::string s) { Value v; v.kind = Kind::kString; v.s = std::move(s); return v; }
  static Value of_int(int64_t x) { Value v; v.kind = Kind::kInt; v.i = x; return v; }
  static Value of_float(double x) { Value v; v.kind = Kind::kFloat; v.f = x; return v; }
  static Value of_bool(bool x) { Value v; v.kind = Kind::kBool; v.b = x; return v; }
  static Value of_array(std::vector<int64_t> shape, std::vector<float> data);  // float32
};

// Decode a whole buffer (must be exactly one MessagePack object).
Value decode(std::span<const uint8_t> bytes);
// Encode: maps with sorted keys, arrays as ext type 1 float32 (chunked above 2^30 bytes).
std::vector<uint8_t> encode(const Value& v);

// The largest array payload written unchunked (flax's MAX_CHUNK_SIZE).
inline constexpr size_t kMaxChunkBytes = size_t{1} << 30;
// encode() with a smaller chunk limit, so tests can exercise chunking on small arrays.
std::vector<uint8_t> encode_with_chunk_limit(const Value& v, size_t max_chunk_bytes);

// File helpers. read_file throws std::runtime_error naming the path on failure.
std::vector<uint8_t> read_file(const std::string& path);
// Atomic: write to a temporary file in the same directory ("<path>.tmp.XXXXXX", mkstemp,
// held under an exclusive flock until renamed), fsync, rename, fsync the dir. First removes
// the orphans of the same path (remove_orphan_temp_files) that a killed save left behind.
void write_file_atomic(const std::string& path, std::span<const uint8_t> bytes);

// Removes, in `dir`, the temporary files of write_file_atomic whose writer is gone: names
// exactly "<target>.tmp." followed by 6 characters of mkstemp's alphabet [A-Za-z0-9] (any
// non-empty <target> when `target` is empty), regular files only (a symbolic link is neither
// followed nor removed), and only those no live writer holds locked. Nothing else in `dir` is
// touched. Returns the names removed; throws IoError when `dir` cannot be read.
std::vector<std::string> remove_orphan_temp_files(const std::string& dir,
                                                  const std::string& target = "");

}  // namespace celo2::flax
