// theta.state loading and saving: the golden and published layouts load, round trips are
// bit-exact, every wrong file (Celo v1, wrong sizes, missing/extra names, non-finite
// weights, random corruption) is refused with a message that names the problem.
#include "celo2/theta_io.h"

#include <gtest/gtest.h>
#include <msgpack.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

namespace celo2 {
namespace {

using flax::FormatError;
using flax::NdArray;
using flax::Value;

std::string golden(const std::string& name) { return std::string(CELO2_GOLDEN_DIR) + "/" + name; }
std::string shared(const std::string& rel) { return std::string(CELO2_SHARED_DIR) + "/" + rel; }

bool exists(const std::string& path) { return std::filesystem::exists(path); }

// The message of what `f` throws (FormatError or std::invalid_argument), or "" if nothing.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const FormatError& e) {
    return e.what();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

void expect_same_theta(const Theta& a, const Theta& b) {
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const DenseLayer& x = a.layers[l];
    const DenseLayer& y = b.layers[l];
    ASSERT_EQ(x.in, y.in);
    ASSERT_EQ(x.out, y.out);
    ASSERT_EQ(x.w.size(), y.w.size());
    ASSERT_EQ(x.b.size(), y.b.size());
    EXPECT_EQ(std::memcmp(x.w.data(), y.w.data(), x.w.size() * 4), 0) << "layer " << l;
    EXPECT_EQ(std::memcmp(x.b.data(), y.b.data(), x.b.size() * 4), 0) << "layer " << l;
  }
}

// ff_mod_stack/~ of a decoded theta, for tests that edit it.
Value& params_of(Value& root) { return root.map.at("ff_mod_stack").map.at("~"); }

TEST(ThetaIo, LoadsGoldenThetaInFeatureChannelOrder) {
  const Value root = flax::decode(flax::read_file(golden("theta_random.state")));
  const Theta t = theta_from_value(root, RuleConfig{});
  ASSERT_EQ(t.layers.size(), 3u);
  EXPECT_EQ(t.hidden(), 8);
  EXPECT_EQ(t.hidden_layers(), 2);
  EXPECT_EQ(t.layers[0].in, kChannels);
  EXPECT_EQ(t.layers[0].out, 8);
  EXPECT_EQ(t.layers[1].in, 8);
  EXPECT_EQ(t.layers[1].out, 8);
  EXPECT_EQ(t.layers[2].in, 8);
  EXPECT_EQ(t.layers[2].out, kOutputs);
  // Row r of layer 0 is channel r: the rows of w0__0, then w0__1, ...
  const Value& p = root.at("ff_mod_stack").at("~");
  int row = 0;
  for (int g = 0; g < kFeatureGroups; ++g) {
    const NdArray& block = p.at("w0__" + std::to_string(g)).as_array();
    for (int r = 0; r < kGroupWidth[g]; ++r, ++row) {
      for (int h = 0; h < 8; ++h) {
        ASSERT_EQ(t.layers[0].w[row * 8 + h], block.data[r * 8 + h]) << "group " << g;
      }
    }
  }
  EXPECT_EQ(row, kChannels);
  EXPECT_EQ(t.layers[0].b, p.at("b0").as_array().data);
  EXPECT_EQ(t.layers[1].w, p.at("w1").as_array().data);
  EXPECT_EQ(t.layers[2].w, p.at("w2").as_array().data);
  EXPECT_EQ(t.layers[2].b, p.at("b2").as_array().data);
}

TEST(ThetaIo, RoundTripIsBitExact) {
  const Theta golden_theta = load_theta(golden("theta_random.state"), RuleConfig{});
  expect_same_theta(theta_from_bytes(theta_to_bytes(golden_theta), RuleConfig{}), golden_theta);

  RuleConfig wide;
  wide.ff_hidden_size = 16;
  wide.ff_hidden_layers = 3;
  const Theta r = Theta::random(wide, 99);
  expect_same_theta(theta_from_bytes(theta_to_bytes(r), wide), r);

  const std::string dir =
      std::string(CELO2_BINARY_DIR) + "/theta_io_test_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  save_theta(dir + "/theta.state", r);
  expect_same_theta(load_theta(dir + "/theta.state", wide), r);
  std::filesystem::remove_all(dir);
}

TEST(ThetaIo, SavedLayoutMatchesThePublishedOne) {
  const Value original = flax::decode(flax::read_file(golden("theta_random.state")));
  const Value ours = theta_to_value(theta_from_value(original, RuleConfig{}));
  const Value& a = original.at("ff_mod_stack").at("~");
  const Value& b = ours.at("ff_mod_stack").at("~");
  ASSERT_EQ(a.map.size(), b.map.size());
  for (const auto& [name, v] : a.map) {
    EXPECT_EQ(v.as_array().shape, b.at(name).as_array().shape) << name;
    EXPECT_EQ(v.as_array().data, b.at(name).as_array().data) << name;
  }
  EXPECT_EQ(ours.map.size(), 1u);
}

TEST(ThetaIo, KeyOrderDoesNotMatter) {
  const Value root = flax::decode(flax::read_file(golden("theta_random.state")));
  const Value& params = root.at("ff_mod_stack").at("~");
  std::vector<std::string> names;
  for (const auto& [k, v] : params.map) names.push_back(k);
  const Theta reference = theta_from_value(root, RuleConfig{});
  std::mt19937 rng(3);
  for (int trial = 0; trial < 4; ++trial) {
    std::shuffle(names.begin(), names.end(), rng);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "ff_mod_stack", 12);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "~", 1);
    msgpack_pack_map(&pk, names.size());
    for (const auto& n : names) {
      msgpack_pack_str_with_body(&pk, n.data(), n.size());
      const std::vector<uint8_t> ext = flax::encode(params.at(n));
      msgpack_sbuffer_write(&sb, reinterpret_cast<const char*>(ext.data()), ext.size());
    }
    const std::vector<uint8_t> bytes(reinterpret_cast<uint8_t*>(sb.data),
                                     reinterpret_cast<uint8_t*>(sb.data) + sb.size);
    msgpack_sbuffer_destroy(&sb);
    expect_same_theta(theta_from_bytes(bytes, RuleConfig{}), reference);
  }
}

TEST(ThetaIo, PublishedWeightsLoad) {
  for (const char* rel : {"weights/celo2/theta.state", "weights/celo2-base/theta.state"}) {
    const std::string path = shared(rel);
    if (!exists(path)) continue;
    SCOPED_TRACE(path);
    const Theta t = load_theta(path, RuleConfig{});
    EXPECT_EQ(t.hidden(), 8);
    EXPECT_EQ(t.hidden_layers(), 2);
    const Value root = flax::decode(flax::read_file(path));
    const RuleConfig inferred = config_for_theta(root);
    EXPECT_EQ(inferred.ff_hidden_size, 8);
    EXPECT_EQ(inferred.ff_hidden_layers, 2);
  }
  if (!exists(shared("weights/celo2/theta.state"))) GTEST_SKIP() << "published weights absent";
}

TEST(ThetaIo, CeloV1IsRefusedByName) {
  const std::string path = shared("weights/celo-v1/theta.state");
  if (!exists(path)) GTEST_SKIP() << path << " absent";
  const std::string msg = error_of([&] { load_theta(path, RuleConfig{}); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "Celo v1");
  EXPECT_HAS(msg, "'lstm_init_state', 'rnn_params'");
  EXPECT_HAS(msg, "ff_mod_stack/~/w0__0: expected shape (1, 8), got (1, 1, 4)");
  // Even with the sizes read from the file itself it is refused.
  const Value root = flax::decode(flax::read_file(path));
  const RuleConfig cfg = config_for_theta(root);
  EXPECT_EQ(cfg.ff_hidden_size, 4);
  const std::string msg2 = error_of([&] { theta_from_value(root, cfg); });
  EXPECT_HAS(msg2, "Celo v1");
  EXPECT_HAS(msg2, "w0__0: expected shape (1, 4), got (1, 1, 4)");
  // The MLP alone, without the LSTM keys, is still recognised by its leading axis.
  Value mlp_only = Value::of_map();
  mlp_only.map["ff_mod_stack"] = root.at("ff_mod_stack");
  EXPECT_HAS(error_of([&] { theta_from_value(mlp_only, RuleConfig{}); }), "Celo v1");
}

TEST(ThetaIo, WrongSizesNameTheArrays) {
  const std::string path = golden("theta_random.state");
  RuleConfig cfg;
  cfg.ff_hidden_size = 16;
  const std::string msg = error_of([&] { load_theta(path, cfg); });
  EXPECT_HAS(msg, "theta_random.state: ff_mod_stack/~/w0__0: expected shape (1, 16), got (1, 8)");
  EXPECT_EQ(msg.find("Celo v1"), std::string::npos) << msg;
  cfg = RuleConfig{};
  cfg.ff_hidden_layers = 3;
  const std::string msg3 = error_of([&] { load_theta(path, cfg); });
  EXPECT_HAS(msg3, "ff_mod_stack/~/w2: expected shape (8, 8), got (8, 3)");
  EXPECT_HAS(msg3, "w3: missing");
}

TEST(ThetaIo, MissingExtraAndNonFiniteArraysAreRefused) {
  const Value original = flax::decode(flax::read_file(golden("theta_random.state")));
  {
    Value root = original;
    params_of(root).map.erase("w1");
    EXPECT_HAS(error_of([&] { theta_from_value(root, RuleConfig{}); }),
               "ff_mod_stack/~/w1: missing");
  }
  {
    Value root = original;
    params_of(root).map["w3"] = Value::of_array({8, 3}, std::vector<float>(24, 0.0f));
    EXPECT_HAS(error_of([&] { theta_from_value(root, RuleConfig{}); }), "unexpected array 'w3'");
  }
  {
    Value root = original;
    root.map["step"] = Value::of_int(5);
    EXPECT_HAS(error_of([&] { theta_from_value(root, RuleConfig{}); }),
               "unexpected top-level key 'step'");
  }
  {
    Value root = original;
    params_of(root).map["w1"] = Value::of_string("not an array");
    EXPECT_HAS(error_of([&] { theta_from_value(root, RuleConfig{}); }),
               "ff_mod_stack/~/w1: expected an array");
  }
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Value root = original;
    std::vector<float> w = root.at("ff_mod_stack").at("~").at("w1").as_array().data;
    w[5] = bad;
    params_of(root).map["w1"] = Value::of_array({8, 8}, w);
    const std::string msg = error_of([&] { theta_from_value(root, RuleConfig{}); });
    EXPECT_HAS(msg, "ff_mod_stack/~/w1: non-finite weight");
    EXPECT_HAS(msg, "index 5");
  }
  EXPECT_HAS(error_of([&] { theta_from_value(Value::of_int(3), RuleConfig{}); }), "expected a map");
  EXPECT_HAS(error_of([&] { theta_from_value(Value::of_map(), RuleConfig{}); }),
             "missing 'ff_mod_stack'");
}

TEST(ThetaIo, OtherDtypesLoad) {
  // A theta stored as float64 (as a meta-trainer in x64 mode would) loads to the same floats.
  Value root = flax::decode(flax::read_file(golden("theta_random.state")));
  const std::vector<float> b0 = root.at("ff_mod_stack").at("~").at("b0").as_array().data;
  auto a = std::make_shared<NdArray>();
  a->shape = {8};
  a->dtype = "float64";
  a->data = b0;
  a->f64.assign(b0.begin(), b0.end());
  params_of(root).map["b0"].array = a;
  EXPECT_EQ(theta_from_value(root, RuleConfig{}).layers[0].b, b0);
}

TEST(ThetaIo, MalformedThetaIsNotSaved) {
  Theta t = Theta::random(RuleConfig{}, 1);
  t.layers[1].w.pop_back();
  EXPECT_THROW(theta_to_bytes(t), std::invalid_argument);
  EXPECT_THROW(theta_to_bytes(Theta{}), std::invalid_argument);
  Theta wrong_in = Theta::random(RuleConfig{}, 1);
  wrong_in.layers[0].in = 15;
  wrong_in.layers[0].w.resize(15 * 8);
  EXPECT_THROW(theta_to_bytes(wrong_in), std::invalid_argument);
}

TEST(ThetaIo, ConfigFromGoldenFiles) {
  const Value rule = flax::decode(flax::read_file(golden("rule_celo2.msgpack")));
  const RuleConfig c = config_from_value(rule.at("config"));
  const RuleConfig d;
  EXPECT_EQ(c.ff_hidden_size, d.ff_hidden_size);
  EXPECT_EQ(c.ff_hidden_layers, d.ff_hidden_layers);
  EXPECT_EQ(c.mom_decays, d.mom_decays);
  EXPECT_EQ(c.rms_decays, d.rms_decays);
  EXPECT_EQ(c.fac_decays, d.fac_decays);
  EXPECT_EQ(c.exp_mult, d.exp_mult);
  EXPECT_EQ(c.rmsmult, d.rmsmult);
  EXPECT_EQ(c.ns_coeffs, d.ns_coeffs);
  EXPECT_EQ(c.ns_iters, d.ns_iters);
  EXPECT_EQ(c.ns_eps, d.ns_eps);
  EXPECT_EQ(c.orthogonalize, d.orthogonalize);
  EXPECT_EQ(c.mlp_activation, Activation::kRelu);
  EXPECT_EQ(c.normalize_input, d.normalize_input);

  EXPECT_EQ(config_from_value(
                flax::decode(flax::read_file(golden("rule_variant_tanh.msgpack"))).at("config"))
                .mlp_activation,
            Activation::kTanh);
  EXPECT_FALSE(config_from_value(
                   flax::decode(flax::read_file(golden("rule_celo2_base.msgpack"))).at("config"))
                   .orthogonalize);

  // Every golden file's theta fits its own config.
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(CELO2_GOLDEN_DIR)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("rule_", 0) != 0 && name.rfind("optimizer_", 0) != 0) continue;
    SCOPED_TRACE(name);
    const Value root = flax::decode(flax::read_file(entry.path().string()));
    const RuleConfig cfg = config_from_value(root.at("config"));
    const Theta t = theta_from_value(root.at("theta"), cfg);
    EXPECT_EQ(t.hidden(), cfg.ff_hidden_size);
    const RuleConfig sizes = config_for_theta(root.at("theta"));
    EXPECT_EQ(sizes.ff_hidden_size, cfg.ff_hidden_size);
    EXPECT_EQ(sizes.ff_hidden_layers, cfg.ff_hidden_layers);
    ++files;
  }
  EXPECT_GE(files, 13);

  const Value wide = flax::decode(flax::read_file(golden("rule_variant_deeper_wider.msgpack")));
  const std::string msg = error_of([&] { theta_from_value(wide.at("theta"), RuleConfig{}); });
  EXPECT_HAS(msg, "theta/ff_mod_stack/~/w0__0: expected shape (1, 8), got (1, 16)");
}

TEST(ThetaIo, BadConfigsAreRefused) {
  const Value rule = flax::decode(flax::read_file(golden("rule_celo2.msgpack")));
  auto with = [&](const std::string& key, Value v) {
    Value c = rule.at("config");
    v.where = "config/" + key;
    c.map[key] = v;
    return error_of([&] { config_from_value(c); });
  };
  EXPECT_HAS(with("with_bias", Value::of_bool(true)), "unknown config key 'with_bias'");
  EXPECT_HAS(with("mlp_activation", Value::of_string("gelu")), "unknown mlp_activation 'gelu'");
  EXPECT_HAS(with("ff_hidden_size", Value::of_int(0)), "ff_hidden_size");
  EXPECT_HAS(with("ff_hidden_size", Value::of_float(8.0)), "expected an integer");
  EXPECT_HAS(with("ff_hidden_size", Value::of_int(int64_t{1} << 40)), "out of range");
  EXPECT_HAS(with("exp_mult", Value::of_float(1e300)), "float32 range");
  EXPECT_HAS(with("normalize_input", Value::of_int(1)), "expected a bool");
  Value two;
  two.kind = Value::Kind::kList;
  two.list = {Value::of_float(0.9), Value::of_float(0.99)};
  EXPECT_HAS(with("mom_decays", two), "expected a list of 3 numbers");
  EXPECT_HAS(error_of([&] { config_from_value(Value::of_int(1)); }), "config must be a map");
  // Missing keys keep their defaults.
  EXPECT_EQ(config_from_value(Value::of_map()).ff_hidden_size, 8);
}

TEST(ThetaIo, Sha256) {
  EXPECT_EQ(sha256_hex({}), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const std::string abc = "abc";
  EXPECT_EQ(sha256_hex({reinterpret_cast<const uint8_t*>(abc.data()), abc.size()}),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// Random damage to real files: decoding and loading must either succeed or throw
// FormatError / std::invalid_argument, never crash, hang or throw anything else.
TEST(ThetaIo, SurvivesRandomCorruption) {
  const std::vector<uint8_t> theta_file = flax::read_file(golden("theta_random.state"));
  const std::vector<uint8_t> rule_file = flax::read_file(golden("rule_variant_tanh.msgpack"));
  const std::vector<std::vector<uint8_t>> huge_headers = {
      {0xdd, 0xff, 0xff, 0xff, 0xff},                          // array32 of 2^32-1
      {0xdf, 0x7f, 0xff, 0xff, 0xff},                          // map32
      {0xdb, 0xff, 0xff, 0xff, 0xf0},                          // str32
      {0xc6, 0xff, 0xff, 0xff, 0xff},                          // bin32
      {0xc9, 0x7f, 0xff, 0xff, 0xff, 0x01},                    // ext32 type 1
      {0xdc, 0xff, 0xff},                                      // array16
      {0xde, 0xff, 0xff},                                      // map16
      {0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},  // uint64 max (as a dimension)
      {0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0},                       // int64 min
  };
  std::mt19937_64 rng(20261128);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  int loaded = 0, refused = 0;
  constexpr int kMutations = 3000;
  for (int i = 0; i < kMutations; ++i) {
    const bool is_theta = i % 2 == 0;
    std::vector<uint8_t> b = is_theta ? theta_file : rule_file;
    const int kind = static_cast<int>(pick(5));
    switch (kind) {
      case 0:  // truncate
        b.resize(pick(b.size()));
        break;
      case 1:  // flip a few bits
        for (size_t k = 1 + pick(8); k-- > 0;)
          b[pick(b.size())] ^= static_cast<uint8_t>(1u << pick(8));
        break;
      case 2:  // overwrite a few bytes
        for (size_t k = 1 + pick(16); k-- > 0;) b[pick(b.size())] = static_cast<uint8_t>(rng());
        break;
      case 3: {  // insert a huge length header
        const auto& h = huge_headers[pick(huge_headers.size())];
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(pick(b.size() + 1)), h.begin(), h.end());
        break;
      }
      case 4: {  // overwrite with a huge length header
        const auto& h = huge_headers[pick(huge_headers.size())];
        const size_t at = pick(b.size() - h.size());
        std::copy(h.begin(), h.end(), b.begin() + static_cast<std::ptrdiff_t>(at));
        break;
      }
    }
    try {
      if (is_theta) {
        theta_from_bytes(b, RuleConfig{});
      } else {
        const Value root = flax::decode(b);
        theta_from_value(root.at("theta"), config_from_value(root.at("config")));
      }
      ++loaded;
    } catch (const FormatError&) {
      ++refused;
    } catch (const std::invalid_argument&) {
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "mutation " << i << " (kind " << kind << ") threw " << typeid(e).name()
                    << ": " << e.what();
    }
  }
  EXPECT_EQ(loaded + refused, kMutations);
  EXPECT_GT(refused, kMutations / 2);
  std::printf("corruption: %d loaded, %d refused\n", loaded, refused);
}

}  // namespace
}  // namespace celo2
