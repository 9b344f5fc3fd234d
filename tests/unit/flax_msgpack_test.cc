// Flax MessagePack: decoding the golden files, bit-exact round trips, every dtype, chunked
// arrays, and hostile headers (which must fail with a FormatError naming where, never
// allocate what they claim).
#include "celo2/flax_msgpack.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <msgpack.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace celo2::flax {
namespace {

std::string golden(const std::string& name) { return std::string(CELO2_GOLDEN_DIR) + "/" + name; }

// Builds MessagePack by hand with msgpack-c, for inputs our encoder never writes.
class Packer {
 public:
  Packer() {
    msgpack_sbuffer_init(&sb_);
    msgpack_packer_init(&pk_, &sb_, msgpack_sbuffer_write);
  }
  ~Packer() { msgpack_sbuffer_destroy(&sb_); }
  Packer(const Packer&) = delete;
  Packer& operator=(const Packer&) = delete;

  Packer& map(size_t n) {
    msgpack_pack_map(&pk_, n);
    return *this;
  }
  Packer& list(size_t n) {
    msgpack_pack_array(&pk_, n);
    return *this;
  }
  Packer& str(const std::string& s) {
    msgpack_pack_str_with_body(&pk_, s.data(), s.size());
    return *this;
  }
  Packer& bin(const void* p, size_t n) {
    msgpack_pack_bin_with_body(&pk_, p, n);
    return *this;
  }
  Packer& i64(int64_t x) {
    msgpack_pack_int64(&pk_, x);
    return *this;
  }
  Packer& f64(double x) {
    msgpack_pack_double(&pk_, x);
    return *this;
  }
  Packer& boolean(bool b) {
    b ? msgpack_pack_true(&pk_) : msgpack_pack_false(&pk_);
    return *this;
  }
  Packer& ext(int8_t type, const std::vector<uint8_t>& payload) {
    msgpack_pack_ext_with_body(&pk_, payload.data(), payload.size(), type);
    return *this;
  }
  Packer& raw(const std::vector<uint8_t>& bytes) {
    msgpack_sbuffer_write(&sb_, reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return *this;
  }
  std::vector<uint8_t> bytes() const {
    return {reinterpret_cast<const uint8_t*>(sb_.data),
            reinterpret_cast<const uint8_t*>(sb_.data) + sb_.size};
  }

 private:
  msgpack_sbuffer sb_;
  msgpack_packer pk_;
};

// A flax ndarray ext: payload [shape, dtype, raw]; `as_str` stores dtype and raw as str
// (as files from msgpack without use_bin_type do).
std::vector<uint8_t> ndarray_ext(const std::vector<int64_t>& shape, const std::string& dtype,
                                 const std::vector<uint8_t>& raw, int8_t type = 1,
                                 bool as_str = false) {
  Packer payload;
  payload.list(3).list(shape.size());
  for (int64_t d : shape) payload.i64(d);
  if (as_str) {
    payload.str(dtype).str(std::string(raw.begin(), raw.end()));
  } else {
    payload.bin(dtype.data(), dtype.size()).bin(raw.data(), raw.size());
  }
  Packer outer;
  outer.ext(type, payload.bytes());
  return outer.bytes();
}

template <typename T>
std::vector<uint8_t> le_bytes(const std::vector<T>& xs) {
  static_assert(std::endian::native == std::endian::little, "tests assume a little-endian host");
  std::vector<uint8_t> out(xs.size() * sizeof(T));
  if (!xs.empty()) std::memcpy(out.data(), xs.data(), out.size());
  return out;
}

uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }

void expect_same_tree(const Value& a, const Value& b, const std::string& where = "<root>") {
  ASSERT_EQ(a.kind, b.kind) << where;
  switch (a.kind) {
    case Value::Kind::kNil:
      break;
    case Value::Kind::kBool:
      EXPECT_EQ(a.b, b.b) << where;
      break;
    case Value::Kind::kInt:
      EXPECT_EQ(a.i, b.i) << where;
      break;
    case Value::Kind::kFloat:
      EXPECT_EQ(std::bit_cast<uint64_t>(a.f), std::bit_cast<uint64_t>(b.f)) << where;
      break;
    case Value::Kind::kString:
      EXPECT_EQ(a.s, b.s) << where;
      break;
    case Value::Kind::kList:
      ASSERT_EQ(a.list.size(), b.list.size()) << where;
      for (size_t i = 0; i < a.list.size(); ++i)
        expect_same_tree(a.list[i], b.list[i], where + "/" + std::to_string(i));
      break;
    case Value::Kind::kMap: {
      ASSERT_EQ(a.map.size(), b.map.size()) << where;
      auto ib = b.map.begin();
      for (const auto& [k, v] : a.map) {
        ASSERT_EQ(k, ib->first) << where;
        expect_same_tree(v, ib->second, where + "/" + k);
        ++ib;
      }
      break;
    }
    case Value::Kind::kArray:
      ASSERT_EQ(a.array->shape, b.array->shape) << where;
      ASSERT_EQ(a.array->data.size(), b.array->data.size()) << where;
      for (size_t i = 0; i < a.array->data.size(); ++i) {
        ASSERT_EQ(bits(a.array->data[i]), bits(b.array->data[i])) << where << " element " << i;
      }
      break;
  }
}

// Expects decode() to throw a FormatError whose message contains every one of `parts`.
void expect_format_error(const std::vector<uint8_t>& bytes, const std::vector<std::string>& parts) {
  try {
    decode(bytes);
    ADD_FAILURE() << "decode succeeded, expected an error mentioning " << parts.at(0);
  } catch (const FormatError& e) {
    for (const auto& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

TEST(FlaxMsgpack, DecodesGoldenThetaLayout) {
  const Value root = decode(read_file(golden("theta_random.state")));
  const Value& params = root.at("ff_mod_stack").at("~");
  ASSERT_TRUE(params.is_map());
  EXPECT_EQ(params.map.size(), 19u);
  const int widths[] = {1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3};
  for (int g = 0; g < 14; ++g) {
    const NdArray& a = params.at("w0__" + std::to_string(g)).as_array();
    EXPECT_EQ(a.shape, (std::vector<int64_t>{widths[g], 8})) << g;
    EXPECT_EQ(a.dtype, "float32");
    EXPECT_EQ(a.data.size(), static_cast<size_t>(widths[g] * 8));
  }
  EXPECT_EQ(params.at("b0").as_array().shape, (std::vector<int64_t>{8}));
  EXPECT_EQ(params.at("w1").as_array().shape, (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(params.at("w2").as_array().shape, (std::vector<int64_t>{8, 3}));
  EXPECT_EQ(params.at("b2").as_array().shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(params.at("w1").where, "ff_mod_stack/~/w1");
}

TEST(FlaxMsgpack, DecodesGoldenRuleFile) {
  const Value root = decode(read_file(golden("rule_celo2.msgpack")));
  EXPECT_EQ(root.at("format").as_string(), "celo2-golden-rule/1");
  EXPECT_EQ(root.at("config").at("ff_hidden_size").as_number(), 8);
  EXPECT_FALSE(root.at("config").at("bias_correction").as_bool());
  EXPECT_EQ(root.at("initial_params").at("scalar").as_array().shape.size(), 0u);
  EXPECT_EQ(root.at("initial_params").at("scalar").as_array().numel(), 1);
  EXPECT_EQ(root.at("initial_params").at("conv").as_array().shape,
            (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_TRUE(root.at("steps").at("0").at("grads").is_map());
  try {
    root.at("steps").at("0").at("nope");
    ADD_FAILURE();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("missing key 'nope' in steps/0"), std::string::npos)
        << e.what();
  }
}

TEST(FlaxMsgpack, GoldenFilesRoundTripBitExact) {
  for (const char* name :
       {"theta_random.state", "rule_edge_values.msgpack", "optimizer_celo2.msgpack"}) {
    SCOPED_TRACE(name);
    const Value a = decode(read_file(golden(name)));
    const std::vector<uint8_t> bytes = encode(a);
    const Value b = decode(bytes);
    expect_same_tree(a, b);
    EXPECT_EQ(encode(b), bytes) << "encoding is not deterministic";
  }
}

TEST(FlaxMsgpack, RoundTripSpecialValuesBitExact) {
  const float nan_payload = std::bit_cast<float>(0x7fc01234u);
  std::vector<float> data = {0.0f,
                             -0.0f,
                             1.0f,
                             -2.5f,
                             std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity(),
                             nan_payload,
                             std::numeric_limits<float>::denorm_min(),
                             std::numeric_limits<float>::max(),
                             1e-40f,
                             3.14159f,
                             -1e30f};
  Value root = Value::of_map();
  root.map["matrix"] = Value::of_array({3, 4}, data);
  root.map["scalar"] = Value::of_array({}, {42.0f});
  root.map["empty"] = Value::of_array({0, 5}, {});
  root.map["int"] = Value::of_int(-123456789012345);
  root.map["big"] = Value::of_int(std::numeric_limits<int64_t>::max());
  root.map["float"] = Value::of_float(0.1);
  root.map["flag"] = Value::of_bool(true);
  root.map["name"] = Value::of_string(std::string("with\0nul", 8));
  Value list;
  list.kind = Value::Kind::kList;
  list.list = {Value::of_int(1), Value(), Value::of_string("x")};
  root.map["list"] = list;
  Value nested = Value::of_map();
  nested.map["deeper"] = root.map["matrix"];
  root.map["nested"] = nested;

  const std::vector<uint8_t> bytes = encode(root);
  const Value back = decode(bytes);
  expect_same_tree(root, back);
  EXPECT_EQ(back.at("nested").at("deeper").as_array().dtype, "float32");
  EXPECT_EQ(bits(back.at("matrix").as_array().data[6]), 0x7fc01234u);
  EXPECT_EQ(encode(back), bytes);
}

TEST(FlaxMsgpack, EncodesArraysExactlyAsFlax) {
  // flax: ExtType(1, packb((shape, dtype.name, bytes), use_bin_type=True)).
  const std::vector<float> data = {1.0f, 2.0f};
  // flax packs the dtype name as str and the bytes as bin; build that exact payload.
  Packer payload;
  payload.list(3).list(1).i64(2).str("float32");
  const auto raw = le_bytes(data);
  payload.bin(raw.data(), raw.size());
  Packer outer;
  outer.ext(1, payload.bytes());
  EXPECT_EQ(encode(Value::of_array({2}, data)), outer.bytes());

  // Every array we encode appears byte for byte in the flax-written golden theta.
  const std::vector<uint8_t> file = read_file(golden("theta_random.state"));
  const Value root = decode(file);
  for (const auto& [name, v] : root.at("ff_mod_stack").at("~").map) {
    const std::vector<uint8_t> ext = encode(v);
    EXPECT_NE(std::search(file.begin(), file.end(), ext.begin(), ext.end()), file.end()) << name;
  }
}

TEST(FlaxMsgpack, KeyOrderDoesNotMatter) {
  std::vector<std::string> keys = {"zeta", "alpha", "m", "b0", "w0__10", "w0__2", "~"};
  std::mt19937 rng(7);
  Value first;
  for (int trial = 0; trial < 5; ++trial) {
    std::shuffle(keys.begin(), keys.end(), rng);
    Packer p;
    p.map(keys.size());
    for (const auto& k : keys) p.str(k).i64(static_cast<int64_t>(k.size()));
    const Value v = decode(p.bytes());
    ASSERT_EQ(v.map.size(), keys.size());
    for (const auto& k : keys) EXPECT_EQ(v.at(k).i, static_cast<int64_t>(k.size()));
    if (trial == 0) first = v;
    EXPECT_EQ(encode(v), encode(first));
  }
}

TEST(FlaxMsgpack, IntegerKeysAreStringified) {
  Packer p;
  p.map(2).i64(3).str("three").i64(-1).str("minus one");
  const Value v = decode(p.bytes());
  EXPECT_EQ(v.at("3").as_string(), "three");
  EXPECT_EQ(v.at("-1").as_string(), "minus one");
}

TEST(FlaxMsgpack, DecodesFloat64) {
  const std::vector<double> x = {1.0, -0.1, 1e-3, 1e300, -1e300, 1e-320, 3.4028235e38};
  const Value v = decode(ndarray_ext({7}, "float64", le_bytes(x)));
  const NdArray& a = v.as_array();
  EXPECT_EQ(a.dtype, "float64");
  ASSERT_EQ(a.f64.size(), x.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(a.f64[i], x[i]);  // kept exactly
  EXPECT_EQ(a.data[0], 1.0f);
  EXPECT_EQ(a.data[1], -0.1f);
  EXPECT_EQ(a.data[2], 1e-3f);
  EXPECT_EQ(a.data[3], std::numeric_limits<float>::infinity());  // overflow rounds to inf
  EXPECT_EQ(a.data[4], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(a.data[5], 0.0f);                               // underflow
  EXPECT_EQ(a.data[6], std::numeric_limits<float>::max());  // just above FLT_MAX rounds down
}

TEST(FlaxMsgpack, DecodesFloat16IncludingSubnormalsInfNan) {
  const std::vector<uint16_t> h = {0x3c00, 0xc000, 0x0001, 0x03ff, 0x0400, 0x7bff,
                                   0x7c00, 0xfc00, 0x7e00, 0x8000, 0x3555, 0x8001};
  const NdArray a = decode(ndarray_ext({3, 4}, "float16", le_bytes(h)))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_EQ(a.dtype, "float16");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(a.data[0], 1.0f);
  EXPECT_EQ(a.data[1], -2.0f);
  EXPECT_EQ(a.data[2], std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(a.data[3], std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(a.data[4], std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(a.data[5], 65504.0f);                  // largest finite
  EXPECT_EQ(a.data[6], std::numeric_limits<float>::infinity());
  EXPECT_EQ(a.data[7], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(a.data[8]));
  EXPECT_EQ(bits(a.data[9]), 0x80000000u);  // -0
  EXPECT_EQ(a.data[10], 0x1.554p-2f);       // 0.333251953125
  EXPECT_EQ(a.data[11], -std::ldexp(1.0f, -24));
}

TEST(FlaxMsgpack, DecodesBfloat16) {
  const std::vector<uint16_t> h = {0x3f80, 0xc040, 0x0001, 0x7f80, 0xff80, 0x7fc0, 0x8000, 0x4049};
  const NdArray a = decode(ndarray_ext({8}, "bfloat16", le_bytes(h)))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_EQ(a.data[0], 1.0f);
  EXPECT_EQ(a.data[1], -3.0f);
  EXPECT_EQ(bits(a.data[2]), 0x00010000u);  // subnormal stays subnormal
  EXPECT_EQ(a.data[3], std::numeric_limits<float>::infinity());
  EXPECT_EQ(a.data[4], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(a.data[5]));
  EXPECT_EQ(bits(a.data[6]), 0x80000000u);
  EXPECT_EQ(a.data[7], 3.140625f);
}

TEST(FlaxMsgpack, AcceptsStrPayloadsAndNumpyScalars) {
  const std::vector<float> x = {2.5f};
  const NdArray a = decode(ndarray_ext({1}, "float32", le_bytes(x), 1, /*as_str=*/true))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_EQ(a.data, x);
  const NdArray s = decode(ndarray_ext({}, "float32", le_bytes(x), 3))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_TRUE(s.shape.empty());
  EXPECT_EQ(s.data, x);
}

TEST(FlaxMsgpack, ChunkedArraysRoundTrip) {
  std::vector<float> data(15);
  for (size_t i = 0; i < data.size(); ++i) data[i] = 0.5f * static_cast<float>(i) - 3.0f;
  Value root = Value::of_map();
  root.map["big"] = Value::of_array({3, 5}, data);
  root.map["small"] = Value::of_array({2}, {1.0f, 2.0f});
  // 16-byte chunks: 4 floats each, so 15 elements make chunks of 4, 4, 4, 3.
  const std::vector<uint8_t> bytes = encode_with_chunk_limit(root, 16);
  const Value back = decode(bytes);
  expect_same_tree(root, back);
  EXPECT_EQ(back.at("big").where, "big");

  // The bytes really hold the flax chunked form.
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  ASSERT_EQ(
      msgpack_unpack_next(&u, reinterpret_cast<const char*>(bytes.data()), bytes.size(), &off),
      MSGPACK_UNPACK_SUCCESS);
  const msgpack_object& big = u.data.via.map.ptr[0].val;  // keys sorted: "big" < "small"
  ASSERT_EQ(big.type, MSGPACK_OBJECT_MAP);
  ASSERT_EQ(big.via.map.size, 3u);
  EXPECT_EQ(std::string(big.via.map.ptr[0].key.via.str.ptr, big.via.map.ptr[0].key.via.str.size),
            "__msgpack_chunked_array__");
  EXPECT_EQ(big.via.map.ptr[1].val.via.map.size, 4u);  // chunks
  EXPECT_EQ(big.via.map.ptr[2].val.via.map.size, 2u);  // shape
  msgpack_unpacked_destroy(&u);

  EXPECT_EQ(encode(back), encode(root));  // unchunked again at the default limit
}

TEST(FlaxMsgpack, HandBuiltChunkedArray) {
  auto chunked = [](const std::vector<std::vector<float>>& chunks, std::vector<int64_t> shape) {
    Packer p;
    p.map(3).str("shape").map(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) p.str(std::to_string(i)).i64(shape[i]);
    p.str("__msgpack_chunked_array__").boolean(true).str("chunks").map(chunks.size());
    for (size_t c = chunks.size(); c-- > 0;) {  // reverse order: keys are not positions
      p.str(std::to_string(c))
          .raw(ndarray_ext({static_cast<int64_t>(chunks[c].size())}, "float32",
                           le_bytes(chunks[c])));
    }
    return p.bytes();
  };
  const NdArray a = decode(chunked({{1, 2, 3}, {4, 5, 6}, {7}}, {7}))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_EQ(a.data, (std::vector<float>{1, 2, 3, 4, 5, 6, 7}));
  const NdArray m = decode(chunked({{1, 2, 3, 4}, {5, 6}}, {2, 3}))
                        .as_array();  // a copy: the Value is a temporary
  EXPECT_EQ(m.shape, (std::vector<int64_t>{2, 3}));
  expect_format_error(chunked({{1, 2, 3}, {4}}, {2, 3}), {"chunks hold 4 elements", "(2, 3)"});
  expect_format_error(chunked({{1, 2, 3}, {4, 5, 6}, {7}}, {2, 3}), {"needs 6"});
}

TEST(FlaxMsgpack, ArrayPayloadErrorsNameThePath) {
  const std::vector<uint8_t> four(4, 0);
  auto in_tree = [](const std::vector<uint8_t>& ext) {
    Packer p;
    p.map(1).str("ff_mod_stack").map(1).str("w0__3").raw(ext);
    return p.bytes();
  };
  expect_format_error(in_tree(ndarray_ext({1}, "int32", four)), {"ff_mod_stack/w0__3", "'int32'"});
  expect_format_error(in_tree(ndarray_ext({2}, "float32", four)),
                      {"ff_mod_stack/w0__3", "holds 4"});
  expect_format_error(in_tree(ndarray_ext({-1}, "float32", four)), {"negative dimension"});
  expect_format_error(in_tree(ndarray_ext({int64_t{1} << 62, int64_t{1} << 62}, "float32", four)),
                      {"too many elements"});
  expect_format_error(in_tree(ndarray_ext({int64_t{1} << 62}, "float64", four)), {"holds 4"});
  Packer two;
  two.list(2).list(0).str("float32");
  Packer ext2;
  ext2.ext(1, two.bytes());
  expect_format_error(in_tree(ext2.bytes()), {"ff_mod_stack/w0__3", "[shape, dtype, bytes]"});
  Packer complex_ext;
  complex_ext.ext(2, Packer().list(2).f64(1).f64(2).bytes());
  expect_format_error(in_tree(complex_ext.bytes()), {"complex"});
  Packer unknown_ext;
  unknown_ext.ext(42, {1, 2, 3});
  expect_format_error(in_tree(unknown_ext.bytes()), {"extension type 42"});
}

TEST(FlaxMsgpack, HostileHeadersFailWithoutAllocating) {
  // array32 / map32 / str32 / bin32 / ext32 claiming ~4 GB in a few bytes.
  expect_format_error({0xdd, 0xff, 0xff, 0xff, 0xff, 0x00}, {"4294967295 entries", "byte 0"});
  expect_format_error({0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 0x61}, {"entries", "byte 0"});
  expect_format_error({0x91, 0xdb, 0xff, 0xff, 0xff, 0xff}, {"claims 4294967295 bytes", "byte 1"});
  expect_format_error({0xc6, 0xff, 0xff, 0xff, 0xff, 0x00}, {"claims"});
  expect_format_error({0xc9, 0x7f, 0xff, 0xff, 0xff, 0x01}, {"claims"});
  // The sum over open containers counts: [[x, y, z]] with one byte left.
  expect_format_error({0x92, 0x93, 0x01}, {"entries"});
  // Truncated headers and bodies.
  expect_format_error({0xcb, 0x00}, {"claims 8 bytes"});
  expect_format_error({0xdc, 0x00}, {"truncated header"});
  expect_format_error({0xd4}, {"truncated header"});
  expect_format_error({0x91, 0xc7}, {"truncated header", "byte 1"});
  expect_format_error({0x92, 0x01}, {"entries"});
  expect_format_error({}, {"empty input"});
  expect_format_error({0xc1}, {"0xc1"});
  expect_format_error({0x01, 0x02}, {"trailing", "byte 1"});
  // Deep nesting.
  std::vector<uint8_t> deep(100, 0x91);
  deep.push_back(0x01);
  expect_format_error(deep, {"nesting deeper than"});
  std::vector<uint8_t> ok_depth(31, 0x91);
  ok_depth.push_back(0x01);
  EXPECT_NO_THROW(decode(ok_depth));
  // A hostile header inside an ext payload names its offset in the outer buffer.
  Packer p;
  p.map(1).str("a").ext(1, {0xdd, 0xff, 0xff, 0xff, 0xff});
  expect_format_error(p.bytes(), {"entries", "byte 6"});
}

TEST(FlaxMsgpack, LookupErrors) {
  Packer p;
  p.map(2).str("n").i64(3).str("s").str("x");
  const Value v = decode(p.bytes());
  EXPECT_EQ(v.at("n").as_number(), 3.0);
  EXPECT_THROW(v.at("missing"), FormatError);
  EXPECT_THROW(v.at("n").as_string(), FormatError);
  EXPECT_THROW(v.at("s").as_number(), FormatError);
  EXPECT_THROW(v.at("s").as_array(), FormatError);
  EXPECT_THROW(v.at("s").as_bool(), FormatError);
  EXPECT_THROW(v.at("s").at("x"), FormatError);
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_THROW(Value::of_array({2, 2}, {1.0f}), std::invalid_argument);
  Packer dup;
  dup.map(2).str("k").i64(1).str("k").i64(2);
  expect_format_error(dup.bytes(), {"duplicate key 'k'"});
}

// A save killed between mkstemp and rename leaves "<path>.tmp.XXXXXX": the next save of the
// same path removes it, and nothing else (other targets' orphans, names of another shape,
// links, directories, and a temporary file whose writer is alive, i.e. holds its lock).
TEST(FlaxMsgpack, NextSaveRemovesOrphanTemporaryFiles) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::path(CELO2_BINARY_DIR) / ("flax_orphans_test_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "elsewhere");
  auto touch = [](const fs::path& p) { std::ofstream(p) << "partial"; };
  const std::vector<std::string> orphans = {"ck.state.tmp.AbC123", "ck.state.tmp.000000",
                                            "ck.state.tmp.zzzzzz"};
  const std::vector<std::string> kept = {
      "ck.state",              // the target itself (replaced, not removed)
      "ck.state.tmp.AbC12",    // 5 characters
      "ck.state.tmp.AbC1234",  // 7 characters
      "ck.state.tmp.AbC12-",   // not mkstemp's alphabet
      "ck.state.tmp.",         // nothing after the infix
      "ck.statetmp.AbC123",    // no dot
      "xck.state.tmp.AbC123",  // another target
      "other.state.tmp.XyZ789",
      "ck.state.TMP.AbC123",
      "ck.state.tmp.Live01",   // a writer that is alive
  };
  for (const auto& n : orphans) touch(dir / n);
  for (const auto& n : kept) touch(dir / n);
  touch(dir / "elsewhere/secret");
  fs::create_symlink(dir / "elsewhere/secret", dir / "ck.state.tmp.Link01");
  fs::create_directory(dir / "ck.state.tmp.Dir001");
  // The live writer: an exclusive lock, as write_file_atomic holds until its rename.
  const int live = ::open((dir / "ck.state.tmp.Live01").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(live, 0);
  ASSERT_EQ(::flock(live, LOCK_EX), 0);

  write_file_atomic((dir / "ck.state").string(), std::vector<uint8_t>{1, 2, 3});
  EXPECT_EQ(read_file((dir / "ck.state").string()), (std::vector<uint8_t>{1, 2, 3}));
  for (const auto& n : orphans) EXPECT_FALSE(fs::exists(fs::symlink_status(dir / n))) << n;
  for (const auto& n : kept) EXPECT_TRUE(fs::exists(dir / n)) << n;
  EXPECT_TRUE(fs::is_symlink(dir / "ck.state.tmp.Link01"));
  EXPECT_TRUE(fs::exists(dir / "elsewhere/secret"));
  EXPECT_TRUE(fs::is_directory(dir / "ck.state.tmp.Dir001"));
  // The new file left no temporary file of its own.
  int temps = 0;
  for (const auto& e : fs::directory_iterator(dir))
    temps += e.path().filename().string().rfind("ck.state.tmp.", 0) == 0;
  EXPECT_EQ(temps, 7);  // the 5 kept names above that start so, the link, the directory

  // Any target's orphans (what the control plane does to its checkpoint directory at start):
  // the other targets' go, the live writer's, the link and the odd names stay.
  const std::vector<std::string> removed = remove_orphan_temp_files(dir.string());
  EXPECT_EQ(std::set<std::string>(removed.begin(), removed.end()),
            (std::set<std::string>{"xck.state.tmp.AbC123", "other.state.tmp.XyZ789"}));
  EXPECT_TRUE(fs::exists(dir / "ck.state.tmp.Live01"));
  ::close(live);  // the writer "dies": now it is an orphan
  EXPECT_EQ(remove_orphan_temp_files(dir.string(), "ck.state"),
            std::vector<std::string>{"ck.state.tmp.Live01"});
  EXPECT_THROW(remove_orphan_temp_files((dir / "missing").string()), IoError);
  fs::remove_all(dir);
}

TEST(FlaxMsgpack, FilesAreWrittenAtomically) {
  const std::string dir =
      std::string(CELO2_BINARY_DIR) + "/flax_msgpack_test_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/out.msgpack";
  Value root = Value::of_map();
  root.map["x"] = Value::of_array({2}, {1.0f, 2.0f});
  const std::vector<uint8_t> bytes = encode(root);
  write_file_atomic(path, bytes);
  EXPECT_EQ(read_file(path), bytes);
  write_file_atomic(path, std::vector<uint8_t>{0x01});  // replaces
  EXPECT_EQ(read_file(path), std::vector<uint8_t>{0x01});
  // No temporary files left behind.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++entries;
  EXPECT_EQ(entries, 1);
  try {
    write_file_atomic(dir + "/no/such/dir/out.msgpack", bytes);
    ADD_FAILURE();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/dir/out.msgpack"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos)
        << e.what();
  }
  try {
    read_file(dir + "/missing.state");
    ADD_FAILURE();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.state"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos);
  }
  EXPECT_THROW(read_file(dir), std::runtime_error);  // a directory
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace celo2::flax
