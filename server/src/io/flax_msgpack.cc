// Flax MessagePack over msgpack-c (see flax_msgpack.h).
//
// Decoding is two passes over untrusted bytes:
//  1. prevalidate() walks only the MessagePack headers. It checks that every claimed
//     str/bin/ext length fits in the bytes that remain, that the elements every open
//     container still owes (each needs at least one byte) fit too, and bounds nesting.
//     msgpack-c allocates a container's element array as soon as it reads the header, so
//     without this a 5-byte "array of 2^32 elements" would ask for ~100 GB.
//  2. msgpack_unpack_next() builds the object tree (strings and bins point into the input),
//     and to_value() turns it into a Value, decoding flax arrays (ext types 1 and 3) and
//     reassembling chunked arrays. Every error names the byte offset or the tree path.
#include "celo2/config.h"
#include "celo2/flax_msgpack.h"

#include <dirent.h>
#include <fcntl.h>
#include <msgpack.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <utility>

namespace celo2::flax {
namespace {

// msgpack-c's unpacker keeps at most MSGPACK_EMBED_STACK_SIZE (32, msgpack/unpack_define.h)
// open containers and fails beyond that; checking the same limit first gives a clear error.
constexpr size_t kMaxDepth = 32;

// flax's ext type codes.
constexpr int8_t kExtNdarray = 1;
constexpr int8_t kExtNativeComplex = 2;
constexpr int8_t kExtNpScalar = 3;

constexpr const char* kChunkedKey = "__msgpack_chunked_array__";

std::string where_or_root(const std::string& where) {
  return where.empty() ? std::string("<root>") : where;
}

std::string join_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "/" + key;
}

[[noreturn]] void fail_at(size_t offset, const std::string& what) {
  throw FormatError("MessagePack: " + what + " at byte " + std::to_string(offset));
}

[[noreturn]] void fail_in(const std::string& where, const std::string& what) {
  throw FormatError(where_or_root(where) + ": " + what);
}

const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::kNil:
      return "nil";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "string";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kMap:
      return "map";
    case Value::Kind::kArray:
      return "array";
  }
  return "?";
}


// ---- pass 1: header walk --------------------------------------------------------------

uint64_t read_be(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

// What one MessagePack header says: its own length, the bytes of payload that follow it
// (str/bin/ext bodies, scalar bodies), and the number of child objects (2n for a map).
struct Header {
  size_t header_len = 1;
  uint64_t payload = 0;
  uint64_t children = 0;
};

// Returns the header at `pos`, or throws when its length bytes are cut off. `base` is the
// offset of `data` in the outermost input (for messages).
Header read_header(const uint8_t* data, size_t size, size_t pos, size_t base) {
  const uint8_t b = data[pos];
  Header h;
  // Length-prefixed forms: `len_bytes` bytes of big-endian length after the type byte,
  // then (for ext) one type byte, then the body.
  auto sized = [&](int len_bytes, bool ext) {
    h.header_len = 1 + len_bytes + (ext ? 1 : 0);
    if (size - pos < h.header_len) fail_at(base + pos, "truncated header");
    h.payload = read_be(data + pos + 1, len_bytes);
  };
  auto counted = [&](int len_bytes, uint64_t per_entry) {
    h.header_len = 1 + len_bytes;
    if (size - pos < h.header_len) fail_at(base + pos, "truncated header");
    h.children = read_be(data + pos + 1, len_bytes) * per_entry;
  };
  // A table reads better one form per line.
  // clang-format off
  if (b <= 0x7f || b >= 0xe0) return h;                        // fixint
  if (b <= 0x8f) { h.children = 2u * (b & 0x0f); return h; }  // fixmap
  if (b <= 0x9f) { h.children = b & 0x0f; return h; }          // fixarray
  if (b <= 0xbf) { h.payload = b & 0x1f; return h; }           // fixstr
  switch (b) {
    case 0xc0: case 0xc2: case 0xc3: return h;  // nil, false, true
    case 0xc1: fail_at(base + pos, "reserved type byte 0xc1");
    case 0xc4: sized(1, false); return h;  // bin 8/16/32
    case 0xc5: sized(2, false); return h;
    case 0xc6: sized(4, false); return h;
    case 0xc7: sized(1, true); return h;   // ext 8/16/32
    case 0xc8: sized(2, true); return h;
    case 0xc9: sized(4, true); return h;
    case 0xca: h.payload = 4; return h;    // float 32/64
    case 0xcb: h.payload = 8; return h;
    case 0xcc: case 0xd0: h.payload = 1; return h;  // (u)int 8/16/32/64
    case 0xcd: case 0xd1: h.payload = 2; return h;
    case 0xce: case 0xd2: h.payload = 4; return h;
    case 0xcf: case 0xd3: h.payload = 8; return h;
    case 0xd4: h.header_len = 2; h.payload = 1; return h;  // fixext 1/2/4/8/16
    case 0xd5: h.header_len = 2; h.payload = 2; return h;
    case 0xd6: h.header_len = 2; h.payload = 4; return h;
    case 0xd7: h.header_len = 2; h.payload = 8; return h;
    case 0xd8: h.header_len = 2; h.payload = 16; return h;
    case 0xd9: sized(1, false); return h;  // str 8/16/32
    case 0xda: sized(2, false); return h;
    case 0xdb: sized(4, false); return h;
    case 0xdc: counted(2, 1); return h;    // array 16/32
    case 0xdd: counted(4, 1); return h;
    case 0xde: counted(2, 2); return h;    // map 16/32
    case 0xdf: counted(4, 2); return h;
    default: break;
  }
  // clang-format on
  fail_at(base + pos, "unknown type byte");
}

// Checks that `bytes` hold exactly one MessagePack object whose claimed sizes all fit.
// `base` is the offset of `bytes` in the outermost buffer, so offsets name file positions.
void prevalidate(std::span<const uint8_t> bytes, size_t base) {
  const uint8_t* data = bytes.data();
  const size_t size = bytes.size();
  if (size == 0) fail_at(base, "empty input");
  std::vector<uint64_t> open;  // elements still owed by each open container, innermost last
  uint64_t owed = 1;           // objects still to read, over all open containers and the root
  size_t pos = 0;
  while (owed > 0) {
    while (!open.empty() && open.back() == 0) open.pop_back();
    if (pos >= size)
      fail_at(base + pos, "truncated input (" + std::to_string(owed) + " more object(s) expected)");
    const Header h = read_header(data, size, pos, base);
    const size_t start = pos;
    if (h.header_len > size - pos) fail_at(base + pos, "truncated header");  // fixext
    pos += h.header_len;
    if (h.payload > size - pos) {
      fail_at(base + start, "object claims " + std::to_string(h.payload) + " bytes but only " +
                                std::to_string(size - pos) + " remain");
    }
    pos += static_cast<size_t>(h.payload);
    --owed;
    if (!open.empty()) --open.back();
    if (h.children > 0) {
      // Every element takes at least one byte, so all that is owed must fit in what is left.
      if (owed > size - pos || h.children > size - pos - owed) {
        fail_at(base + start, "container claims " + std::to_string(h.children) +
                                  " entries but only " + std::to_string(size - pos) +
                                  " bytes remain");
      }
      if (open.size() >= kMaxDepth) {
        fail_at(base + start, "nesting deeper than " + std::to_string(kMaxDepth));
      }
      open.push_back(h.children);
      owed += h.children;
    }
  }
  if (pos != size) {
    fail_at(base + pos, std::to_string(size - pos) + " trailing byte(s) after the object");
  }
}

// RAII over msgpack_unpacked; the constructor runs prevalidate() before msgpack-c sees a byte.
class Unpacked {
 public:
  Unpacked(std::span<const uint8_t> bytes, size_t base) {
    prevalidate(bytes, base);
    msgpack_unpacked_init(&u_);
    size_t off = 0;
    const auto rc =
        msgpack_unpack_next(&u_, reinterpret_cast<const char*>(bytes.data()), bytes.size(), &off);
    if (rc != MSGPACK_UNPACK_SUCCESS || off != bytes.size()) {
      msgpack_unpacked_destroy(&u_);
      fail_at(base + off, "msgpack-c could not parse the input (code " + std::to_string(rc) + ")");
    }
  }
  ~Unpacked() { msgpack_unpacked_destroy(&u_); }
  Unpacked(const Unpacked&) = delete;
  Unpacked& operator=(const Unpacked&) = delete;
  const msgpack_object& root() const { return u_.data; }

 private:
  msgpack_unpacked u_;
};

// ---- element conversion ---------------------------------------------------------------

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float32.
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, or NaN keeping its payload
  } else {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

// double -> float with IEEE round-to-nearest overflow to ±inf. A plain cast of an
// out-of-range double is undefined behaviour in C++.
float narrow_to_float(double d) {
  constexpr double kOverflow = 0x1.ffffffp127;  // FLT_MAX + half an ulp: ties go to inf
  if (std::isnan(d)) return std::numeric_limits<float>::quiet_NaN();
  if (std::fabs(d) >= kOverflow) {
    return d > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  }
  return static_cast<float>(d);
}

// Little-endian loads that also work on a big-endian host (std::byteswap is C++23).
template <typename U>
U byte_swap(U v) {
  if constexpr (sizeof(U) == 2) return __builtin_bswap16(v);
  if constexpr (sizeof(U) == 4) return __builtin_bswap32(v);
  if constexpr (sizeof(U) == 8) return __builtin_bswap64(v);
}

template <typename U>
U load_le(const uint8_t* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big) v = byte_swap(v);
  return v;
}

int dtype_itemsize(const std::string& dtype) {
  if (dtype == "float32") return 4;
  if (dtype == "float64") return 8;
  if (dtype == "bfloat16" || dtype == "float16") return 2;
  return 0;
}

std::string_view bytes_of(const msgpack_object& o) {
  if (o.type == MSGPACK_OBJECT_STR) return {o.via.str.ptr, o.via.str.size};
  return {o.via.bin.ptr, o.via.bin.size};
}

bool is_bytes(const msgpack_object& o) {
  return o.type == MSGPACK_OBJECT_STR || o.type == MSGPACK_OBJECT_BIN;
}

// Element count of `shape`, refusing negative entries and overflow.
int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& where) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) fail_in(where, "negative dimension in shape " + format_shape(shape));
    if (__builtin_mul_overflow(n, d, &n)) {
      fail_in(where, "shape " + format_shape(shape) + " has too many elements");
    }
  }
  return n;
}

// Decodes a flax ndarray payload: MessagePack [shape list, dtype name, raw C-order bytes].
std::shared_ptr<NdArray> decode_ndarray(std::span<const uint8_t> payload, size_t base,
                                        const std::string& where) {
  Unpacked u(payload, base);
  const msgpack_object& o = u.root();
  if (o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size != 3) {
    fail_in(where, "array payload is not [shape, dtype, bytes]");
  }
  const msgpack_object& shape_o = o.via.array.ptr[0];
  const msgpack_object& dtype_o = o.via.array.ptr[1];
  const msgpack_object& data_o = o.via.array.ptr[2];
  if (shape_o.type != MSGPACK_OBJECT_ARRAY) fail_in(where, "array shape is not a list");
  auto arr = std::make_shared<NdArray>();
  for (uint32_t i = 0; i < shape_o.via.array.size; ++i) {
    const msgpack_object& d = shape_o.via.array.ptr[i];
    if (d.type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
      fail_in(where, "negative dimension " + std::to_string(d.via.i64) + " in array shape");
    }
    if (d.type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
        d.via.u64 > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail_in(where, "array shape entry " + std::to_string(i) + " is not a valid integer");
    }
    arr->shape.push_back(static_cast<int64_t>(d.via.u64));
  }
  if (!is_bytes(dtype_o)) fail_in(where, "array dtype is not a string");
  arr->dtype = std::string(bytes_of(dtype_o));
  const int itemsize = dtype_itemsize(arr->dtype);
  if (itemsize == 0) {
    // Printable names only: a corrupt dtype should not put control bytes in a log line.
    std::string shown;
    for (char c : arr->dtype.substr(0, 32)) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
    fail_in(where,
            "unsupported dtype '" + shown + "' (expected float32, float64, bfloat16 or float16)");
  }
  if (!is_bytes(data_o)) fail_in(where, "array data is not a byte string");
  const std::string_view raw = bytes_of(data_o);
  const int64_t numel = checked_numel(arr->shape, where);
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(itemsize), &nbytes) ||
      static_cast<uint64_t>(nbytes) != raw.size()) {
    fail_in(where, "shape " + format_shape(arr->shape) + " of " + arr->dtype + " needs " +
                       std::to_string(numel) + " x " + std::to_string(itemsize) +
                       " bytes, the array holds " + std::to_string(raw.size()));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(raw.data());
  const size_t n = static_cast<size_t>(numel);
  arr->data.resize(n);
  if (arr->dtype == "float32") {
    if constexpr (std::endian::native == std::endian::little) {
      if (n) std::memcpy(arr->data.data(), p, n * 4);
    } else {
      for (size_t i = 0; i < n; ++i)
        arr->data[i] = std::bit_cast<float>(load_le<uint32_t>(p + 4 * i));
    }
  } else if (arr->dtype == "float64") {
    arr->f64.resize(n);
    for (size_t i = 0; i < n; ++i) {
      arr->f64[i] = std::bit_cast<double>(load_le<uint64_t>(p + 8 * i));
      arr->data[i] = narrow_to_float(arr->f64[i]);
    }
  } else if (arr->dtype == "bfloat16") {
    for (size_t i = 0; i < n; ++i) arr->data[i] = bf16_to_f32(load_le<uint16_t>(p + 2 * i));
  } else {
    for (size_t i = 0; i < n; ++i) arr->data[i] = f16_to_f32(load_le<uint16_t>(p + 2 * i));
  }
  return arr;
}

// Parses a map {"0": x0, "1": x1, ...} into a vector, requiring exactly those keys.
std::vector<const Value*> numbered_entries(const Value& m, const std::string& where) {
  if (!m.is_map()) fail_in(where, std::string("expected a map, got ") + kind_name(m.kind));
  std::vector<const Value*> out(m.map.size(), nullptr);
  for (const auto& [key, val] : m.map) {
    size_t idx = 0;
    const bool digits =
        !key.empty() && key.size() <= 18 &&
        std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (digits) idx = std::stoull(key);
    if (!digits || idx >= out.size() || (key.size() > 1 && key[0] == '0')) {
      fail_in(where, "unexpected key '" + key + "' (expected \"0\".. \"" +
                         std::to_string(out.size() - 1) + "\")");
    }
    out[idx] = &val;
  }
  return out;
}

// flax's form for arrays over 2^30 bytes: {"__msgpack_chunked_array__": true,
// "shape": {"0": d0, ...}, "chunks": {"0": flat array, ...}}.
std::shared_ptr<NdArray> unchunk(const Value& m, const std::string& where) {
  for (const auto& [key, val] : m.map) {
    if (key != kChunkedKey && key != "shape" && key != "chunks") {
      fail_in(where, "unexpected key '" + key + "' in a chunked array");
    }
  }
  const Value* shape_v = m.find("shape");
  const Value* chunks_v = m.find("chunks");
  if (!shape_v || !chunks_v) fail_in(where, "chunked array without 'shape' or 'chunks'");
  auto arr = std::make_shared<NdArray>();
  for (const Value* d : numbered_entries(*shape_v, join_path(where, "shape"))) {
    if (d->kind != Value::Kind::kInt || d->i < 0) {
      fail_in(join_path(where, "shape"), "entries must be non-negative integers");
    }
    arr->shape.push_back(d->i);
  }
  const int64_t numel = checked_numel(arr->shape, where);
  const auto chunks = numbered_entries(*chunks_v, join_path(where, "chunks"));
  int64_t total = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!chunks[c]->is_array()) {
      fail_in(join_path(where, "chunks/" + std::to_string(c)), "chunk is not an array");
    }
    const NdArray& a = *chunks[c]->array;
    if (c == 0) arr->dtype = a.dtype;
    if (a.dtype != arr->dtype) {
      fail_in(where, "chunks mix dtypes " + arr->dtype + " and " + a.dtype);
    }
    total += static_cast<int64_t>(a.data.size());  // each chunk's size is bounded by the input
    if (total > numel) break;
  }
  if (total != numel) {
    fail_in(where, "chunks hold " + std::to_string(total) + (total > numel ? "+" : "") +
                       " elements, shape " + format_shape(arr->shape) + " needs " +
                       std::to_string(numel));
  }
  arr->data.reserve(static_cast<size_t>(numel));
  if (arr->dtype == "float64") arr->f64.reserve(static_cast<size_t>(numel));
  for (const Value* c : chunks) {
    const NdArray& a = *c->array;
    arr->data.insert(arr->data.end(), a.data.begin(), a.data.end());
    if (arr->dtype == "float64") arr->f64.insert(arr->f64.end(), a.f64.begin(), a.f64.end());
  }
  return arr;
}

std::string map_key(const msgpack_object& k, const std::string& where) {
  switch (k.type) {
    case MSGPACK_OBJECT_STR:
    case MSGPACK_OBJECT_BIN:
      return std::string(bytes_of(k));
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      return std::to_string(k.via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
      return std::to_string(k.via.i64);
    default:
      break;
  }
  fail_in(where, "map key is neither a string nor an integer");
}

// Converts a msgpack-c object tree to a Value. `base` maps pointers into `buf` back to
// offsets in the outermost input (used for nested ext payloads' error offsets).
struct Converter {
  const uint8_t* buf;
  size_t base;

  size_t offset_of(const char* p) const {
    return base + static_cast<size_t>(reinterpret_cast<const uint8_t*>(p) - buf);
  }

  Value convert(const msgpack_object& o, const std::string& where) const {
    Value v;
    v.where = where;
    switch (o.type) {
      case MSGPACK_OBJECT_NIL:
        break;
      case MSGPACK_OBJECT_BOOLEAN:
        v.kind = Value::Kind::kBool;
        v.b = o.via.boolean;
        break;
      case MSGPACK_OBJECT_POSITIVE_INTEGER:
        if (o.via.u64 > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          fail_in(where, "integer " + std::to_string(o.via.u64) + " does not fit in int64");
        }
        v.kind = Value::Kind::kInt;
        v.i = static_cast<int64_t>(o.via.u64);
        break;
      case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        v.kind = Value::Kind::kInt;
        v.i = o.via.i64;
        break;
      case MSGPACK_OBJECT_FLOAT32:
      case MSGPACK_OBJECT_FLOAT64:
        v.kind = Value::Kind::kFloat;
        v.f = o.via.f64;
        break;
      case MSGPACK_OBJECT_STR:
      case MSGPACK_OBJECT_BIN:  // Value has no bytes kind; a bin outside an array is rare
        v.kind = Value::Kind::kString;
        v.s = std::string(bytes_of(o));
        break;
      case MSGPACK_OBJECT_ARRAY:
        v.kind = Value::Kind::kList;
        v.list.reserve(o.via.array.size);
        for (uint32_t i = 0; i < o.via.array.size; ++i) {
          v.list.push_back(convert(o.via.array.ptr[i], join_path(where, std::to_string(i))));
        }
        break;
      case MSGPACK_OBJECT_MAP: {
        v.kind = Value::Kind::kMap;
        for (uint32_t i = 0; i < o.via.map.size; ++i) {
          const msgpack_object_kv& kv = o.via.map.ptr[i];
          std::string key = map_key(kv.key, where);
          const std::string child = join_path(where, key);
          if (v.map.count(key)) fail_in(where, "duplicate key '" + key + "'");
          v.map.emplace(std::move(key), convert(kv.val, child));
        }
        if (v.map.count(kChunkedKey)) {
          Value a;
          a.kind = Value::Kind::kArray;
          a.where = where;
          a.array = unchunk(v, where);
          return a;
        }
        break;
      }
      case MSGPACK_OBJECT_EXT: {
        const msgpack_object_ext& e = o.via.ext;
        if (e.type == kExtNdarray || e.type == kExtNpScalar) {
          v.kind = Value::Kind::kArray;
          v.array = decode_ndarray({reinterpret_cast<const uint8_t*>(e.ptr), e.size},
                                   offset_of(e.ptr), where);
        } else if (e.type == kExtNativeComplex) {
          fail_in(where, "complex numbers (ext type 2) are not supported");
        } else {
          fail_in(where, "unknown MessagePack extension type " + std::to_string(e.type));
        }
        break;
      }
      default:
        fail_in(where, "unsupported MessagePack object");
    }
    return v;
  }
};

// ---- encoding -------------------------------------------------------------------------

void check_pack(int rc) {
  if (rc != 0) throw std::runtime_error("MessagePack encoding failed (out of memory?)");
}

void pack_string(msgpack_packer* pk, const std::string& s) {
  check_pack(msgpack_pack_str_with_body(pk, s.data(), s.size()));
}

// One float32 ndarray ext (type 1) holding `n` elements from `data` with `shape`.
void pack_ndarray(msgpack_packer* pk, const std::vector<int64_t>& shape, const float* data,
                  size_t n) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer inner;
  msgpack_packer_init(&inner, &sb, msgpack_sbuffer_write);
  int rc = msgpack_pack_array(&inner, 3);
  rc |= msgpack_pack_array(&inner, shape.size());
  for (int64_t d : shape) rc |= msgpack_pack_int64(&inner, d);
  static const std::string kF32 = "float32";
  rc |= msgpack_pack_str_with_body(&inner, kF32.data(), kF32.size());
  rc |= msgpack_pack_bin(&inner, n * 4);
  if constexpr (std::endian::native == std::endian::little) {
    if (n) rc |= msgpack_pack_bin_body(&inner, data, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      const uint32_t le = byte_swap(std::bit_cast<uint32_t>(data[i]));
      rc |= msgpack_pack_bin_body(&inner, &le, 4);
    }
  }
  if (rc == 0) rc = msgpack_pack_ext_with_body(pk, sb.data, sb.size, kExtNdarray);
  msgpack_sbuffer_destroy(&sb);
  check_pack(rc);
}

void pack_value(msgpack_packer* pk, const Value& v, size_t max_chunk_bytes) {
  switch (v.kind) {
    case Value::Kind::kNil:
      check_pack(msgpack_pack_nil(pk));
      return;
    case Value::Kind::kBool:
      check_pack(v.b ? msgpack_pack_true(pk) : msgpack_pack_false(pk));
      return;
    case Value::Kind::kInt:
      check_pack(msgpack_pack_int64(pk, v.i));
      return;
    case Value::Kind::kFloat:
      check_pack(msgpack_pack_double(pk, v.f));
      return;
    case Value::Kind::kString:
      pack_string(pk, v.s);
      return;
    case Value::Kind::kList:
      check_pack(msgpack_pack_array(pk, v.list.size()));
      for (const Value& x : v.list) pack_value(pk, x, max_chunk_bytes);
      return;
    case Value::Kind::kMap:
      check_pack(msgpack_pack_map(pk, v.map.size()));
      for (const auto& [k, x] : v.map) {  // std::map: sorted keys, deterministic bytes
        pack_string(pk, k);
        pack_value(pk, x, max_chunk_bytes);
      }
      return;
    case Value::Kind::kArray: {
      if (!v.array) throw std::invalid_argument("encode: array value without data");
      const NdArray& a = *v.array;
      const int64_t numel = checked_numel(a.shape, v.where);
      if (static_cast<uint64_t>(numel) != a.data.size()) {
        throw std::invalid_argument("encode: " + where_or_root(v.where) + ": shape " +
                                    format_shape(a.shape) + " does not match " +
                                    std::to_string(a.data.size()) + " elements");
      }
      const size_t n = a.data.size();
      if (n * 4 <= max_chunk_bytes) {
        pack_ndarray(pk, a.shape, a.data.data(), n);
        return;
      }
      // Chunked exactly as flax's _chunk: flat 1-d chunks of max_chunk_bytes / itemsize.
      const size_t per_chunk = std::max<size_t>(1, max_chunk_bytes / 4);
      const size_t n_chunks = (n + per_chunk - 1) / per_chunk;
      check_pack(msgpack_pack_map(pk, 3));
      pack_string(pk, kChunkedKey);
      check_pack(msgpack_pack_true(pk));
      pack_string(pk, "chunks");
      check_pack(msgpack_pack_map(pk, n_chunks));
      for (size_t c = 0; c < n_chunks; ++c) {
        const size_t len = std::min(per_chunk, n - c * per_chunk);
        pack_string(pk, std::to_string(c));
        pack_ndarray(pk, {static_cast<int64_t>(len)}, a.data.data() + c * per_chunk, len);
      }
      pack_string(pk, "shape");
      check_pack(msgpack_pack_map(pk, a.shape.size()));
      for (size_t i = 0; i < a.shape.size(); ++i) {
        pack_string(pk, std::to_string(i));
        check_pack(msgpack_pack_int64(pk, a.shape[i]));
      }
      return;
    }
  }
}

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

// ---- NdArray / Value ------------------------------------------------------------------

int64_t NdArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Value Value::of_array(std::vector<int64_t> shape, std::vector<float> data) {
  Value v;
  v.kind = Kind::kArray;
  auto a = std::make_shared<NdArray>();
  a->shape = std::move(shape);
  a->dtype = "float32";
  a->data = std::move(data);
  int64_t n = 1;
  for (int64_t d : a->shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) {
      throw std::invalid_argument("Value::of_array: bad shape " + format_shape(a->shape));
    }
  }
  if (static_cast<uint64_t>(n) != a->data.size()) {
    throw std::invalid_argument("Value::of_array: shape " + format_shape(a->shape) + " needs " +
                                std::to_string(n) + " elements, got " +
                                std::to_string(a->data.size()));
  }
  v.array = std::move(a);
  return v;
}

const Value* Value::find(const std::string& key) const {
  if (kind != Kind::kMap) return nullptr;
  auto it = map.find(key);
  return it == map.end() ? nullptr : &it->second;
}

const Value& Value::at(const std::string& key) const {
  if (kind != Kind::kMap) {
    fail_in(where,
            std::string("expected a map (looking up '") + key + "'), got " + kind_name(kind));
  }
  auto it = map.find(key);
  if (it == map.end()) throw FormatError("missing key '" + key + "' in " + where_or_root(where));
  return it->second;
}

const NdArray& Value::as_array() const {
  if (kind != Kind::kArray || !array) {
    fail_in(where, std::string("expected an array, got ") + kind_name(kind));
  }
  return *array;
}

double Value::as_number() const {
  if (kind == Kind::kInt) return static_cast<double>(i);
  if (kind == Kind::kFloat) return f;
  fail_in(where, std::string("expected a number, got ") + kind_name(kind));
}

const std::string& Value::as_string() const {
  if (kind != Kind::kString)
    fail_in(where, std::string("expected a string, got ") + kind_name(kind));
  return s;
}

bool Value::as_bool() const {
  if (kind != Kind::kBool) fail_in(where, std::string("expected a bool, got ") + kind_name(kind));
  return b;
}

// ---- decode / encode ------------------------------------------------------------------

Value decode(std::span<const uint8_t> bytes) {
  Unpacked u(bytes, 0);
  return Converter{bytes.data(), 0}.convert(u.root(), "");
}

std::vector<uint8_t> encode_with_chunk_limit(const Value& v, size_t max_chunk_bytes) {
  if (max_chunk_bytes < 4) throw std::invalid_argument("encode: chunk limit below one float");
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  std::vector<uint8_t> out;
  try {
    pack_value(&pk, v, max_chunk_bytes);
    out.assign(reinterpret_cast<const uint8_t*>(sb.data),
               reinterpret_cast<const uint8_t*>(sb.data) + sb.size);
  } catch (...) {
    msgpack_sbuffer_destroy(&sb);
    throw;
  }
  msgpack_sbuffer_destroy(&sb);
  return out;
}

std::vector<uint8_t> encode(const Value& v) { return encode_with_chunk_limit(v, kMaxChunkBytes); }

// ---- files ----------------------------------------------------------------------------

std::vector<uint8_t> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open '" + path + "': " + errno_text(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw IoError("cannot stat '" + path + "': " + errno_text(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw IoError("cannot read '" + path + "': " + errno_text(EISDIR));
  }
  std::vector<uint8_t> out;
  if (st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  uint8_t buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw IoError("cannot read '" + path + "': " + errno_text(err));
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return out;
}

namespace {

constexpr char kTempInfix[] = ".tmp.";
constexpr size_t kTempSuffix = 6;  // mkstemp's XXXXXX

// "<target>.tmp.XXXXXX" with X in mkstemp's alphabet; target empty: any non-empty target.
bool is_temp_name(const std::string& name, const std::string& target) {
  constexpr size_t infix = sizeof kTempInfix - 1;
  if (name.size() < infix + kTempSuffix + 1) return false;
  const size_t at = name.size() - kTempSuffix - infix;
  if (name.compare(at, infix, kTempInfix) != 0) return false;
  if (!target.empty() && (at != target.size() || name.compare(0, at, target) != 0)) return false;
  for (size_t i = name.size() - kTempSuffix; i < name.size(); ++i) {
    const char c = name[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) return false;
  }
  return true;
}

}  // namespace

std::vector<std::string> remove_orphan_temp_files(const std::string& dir, const std::string& target) {
  std::vector<std::string> removed;
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throw IoError("cannot open directory '" + dir + "': " + errno_text(errno));
  DIR* d = ::fdopendir(dfd);
  if (!d) {
    const int err = errno;
    ::close(dfd);
    throw IoError("cannot read directory '" + dir + "': " + errno_text(err));
  }
  std::vector<std::string> candidates;
  while (const dirent* e = ::readdir(d))
    if (is_temp_name(e->d_name, target)) candidates.emplace_back(e->d_name);
  for (const std::string& name : candidates) {
    // A regular file (never through a symbolic link) that no writer holds: a writer keeps an
    // exclusive lock on its temporary file until it has renamed it.
    const int fd = ::openat(dfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat opened {}, now {};
    const bool orphan = ::fstat(fd, &opened) == 0 && S_ISREG(opened.st_mode) &&
                        ::flock(fd, LOCK_EX | LOCK_NB) == 0 &&
                        ::fstatat(dfd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) == 0 &&
                        now.st_dev == opened.st_dev && now.st_ino == opened.st_ino;
    if (orphan && ::unlinkat(dfd, name.c_str(), 0) == 0) removed.push_back(name);
    ::close(fd);
  }
  ::closedir(d);  // closes dfd
  return removed;
}

void write_file_atomic(const std::string& path, std::span<const uint8_t> bytes) {
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  // Temporary files of this target left by a save that was killed (best effort: a directory
  // that cannot be listed does not stop the save).
  try {
    remove_orphan_temp_files(dir, slash == std::string::npos ? path : path.substr(slash + 1));
  } catch (const IoError&) {
  }
  std::string tmp = path + kTempInfix + std::string(kTempSuffix, 'X');
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) {
    throw IoError("cannot create a temporary file next to '" + path +
                             "': " + errno_text(errno));
  }
  // Held until the file is renamed (released when fd closes, or when the process dies):
  // remove_orphan_temp_files leaves a locked temporary file alone.
  ::flock(fd, LOCK_EX);
  auto fail = [&](const std::string& what, int err, bool close_fd) {
    if (close_fd) ::close(fd);
    ::unlink(tmp.c_str());
    throw IoError("cannot write '" + path + "' (" + what + " '" + tmp +
                             "'): " + errno_text(err));
  };
  ::fchmod(fd, 0644);  // mkstemp makes 0600; checkpoints are meant to be shared read-only
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("write", errno, true);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) fail("fsync", errno, true);
  if (::close(fd) != 0) fail("close", errno, false);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename", errno, false);
  // Make the rename itself durable.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    throw IoError("cannot open directory '" + dir + "' to sync '" + path +
                             "': " + errno_text(errno));
  }
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) {
    throw IoError("cannot fsync directory '" + dir + "' after writing '" + path +
                             "': " + errno_text(err));
  }
}

}  // namespace celo2::flax
