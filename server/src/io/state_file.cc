// Optimizer-state checkpoints (see state_file.h).
#include "celo2/state_file.h"

#include <algorithm>
#include <cmath>

#include "celo2/flax_msgpack.h"
#include "celo2/rule.h"
#include "celo2/theta_io.h"

namespace celo2 {
namespace {

constexpr const char* kStateFormat = "celo2-optimizer-state/1";

flax::Value list_of_ints(const std::vector<int64_t>& v) {
  flax::Value out;
  out.kind = flax::Value::Kind::kList;
  for (int64_t x : v) out.list.push_back(flax::Value::of_int(x));
  return out;
}

std::vector<int64_t> with_lead(int64_t lead, const std::vector<int64_t>& shape) {
  std::vector<int64_t> s{lead};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

std::vector<float> floats(const flax::Value& t, const std::string& key) {
  const flax::Value* v = t.find(key);
  if (!v) return {};
  const flax::NdArray& a = v->as_array();
  for (float x : a.data)
    if (!std::isfinite(x)) throw flax::FormatError(t.where + "/" + key + ": non-finite value");
  return a.data;
}

}  // namespace

void write_state_file(const std::string& path, const StateFile& s) {
  flax::Value payload = flax::Value::of_map();
  payload.map["format"] = flax::Value::of_string(kStateFormat);
  payload.map["step"] = flax::Value::of_int(s.step);
  payload.map["skipped"] = flax::Value::of_int(s.skipped);
  payload.map["theta_sha256"] = flax::Value::of_string(s.theta_sha256);
  flax::Value tensors = flax::Value::of_map();
  for (const TensorStateRecord& r : s.tensors) {
    flax::Value t = flax::Value::of_map();
    t.map["shape"] = list_of_ints(r.shape);
    t.map["label"] = flax::Value::of_string(label_name(r.label));
    if (r.label == Label::kCelo2) {
      const Geometry geo = Geometry::of(r.shape);
      t.map["iteration"] = flax::Value::of_int(r.iteration);
      t.map["m"] = flax::Value::of_array(with_lead(kMom, r.shape), r.m);
      t.map["rms"] = flax::Value::of_array(with_lead(kRms, r.shape), r.rms);
      if (geo.factored) {
        t.map["v_row"] = flax::Value::of_array({kFac, geo.row_count}, r.v_row);
        t.map["v_col"] = flax::Value::of_array({kFac, geo.col_count}, r.v_col);
      } else {
        t.map["v_diag"] = flax::Value::of_array(with_lead(kFac, r.shape), r.v_diag);
      }
    } else if (r.label == Label::kAdamW) {
      t.map["count"] = flax::Value::of_int(r.count);
      t.map["mu"] = flax::Value::of_array(r.shape, r.mu);
      t.map["nu"] = flax::Value::of_array(r.shape, r.nu);
    }
    if (!r.master.empty()) t.map["master"] = flax::Value::of_array(r.shape, r.master);
    tensors.map[r.name] = std::move(t);
  }
  payload.map["tensors"] = std::move(tensors);
  const std::vector<uint8_t> body = flax::encode(payload);
  flax::Value root = flax::Value::of_map();
  root.map["celo2_state"] = std::move(payload);
  root.map["sha256"] = flax::Value::of_string(sha256_hex(body));
  flax::write_file_atomic(path, flax::encode(root));
}

StateFile read_state_file(const std::string& path) {
  return parse_state_file(flax::read_file(path), path);
}

StateFile parse_state_file(std::span<const uint8_t> bytes, const std::string& path) {
  auto fail = [&](const std::string& m) -> void {
    throw flax::FormatError("optimizer state " + path + ": " + m);
  };
  flax::Value root;
  try {
    root = flax::decode(bytes);
  } catch (const flax::FormatError& e) {
    fail(std::string("not a celo2 checkpoint (") + e.what() + ")");
  }
  if (!root.is_map() || !root.find("celo2_state") || !root.find("sha256"))
    fail("not a celo2 optimizer checkpoint (no celo2_state/sha256)");
  StateFile out;
  try {
    const flax::Value& payload = root.at("celo2_state");
    if (sha256_hex(flax::encode(payload)) != root.at("sha256").as_string())
      fail("checksum mismatch: the file is corrupt");
    if (payload.at("format").as_string() != kStateFormat)
      fail("format '" + payload.at("format").as_string() + "', expected " + kStateFormat);
    out.step = static_cast<int64_t>(payload.at("step").as_number());
    out.skipped = static_cast<int64_t>(payload.at("skipped").as_number());
    if (out.step < 0 || out.skipped < 0) fail("negative step counter");
    out.theta_sha256 = payload.at("theta_sha256").as_string();
    for (const auto& [name, t] : payload.at("tensors").map) {
      TensorStateRecord r;
      r.name = name;
      for (const auto& d : t.at("shape").list) r.shape.push_back(static_cast<int64_t>(d.as_number()));
      r.label = parse_label(t.at("label").as_string());
      if (r.label == Label::kCelo2) r.iteration = static_cast<int64_t>(t.at("iteration").as_number());
      if (r.label == Label::kAdamW) r.count = static_cast<int64_t>(t.at("count").as_number());
      r.m = floats(t, "m");
      r.rms = floats(t, "rms");
      r.v_row = floats(t, "v_row");
      r.v_col = floats(t, "v_col");
      r.v_diag = floats(t, "v_diag");
      r.mu = floats(t, "mu");
      r.nu = floats(t, "nu");
      r.master = floats(t, "master");
      out.tensors.push_back(std::move(r));
    }
  } catch (const flax::FormatError& e) {
    const std::string m = e.what();
    if (m.rfind("optimizer state ", 0) == 0) throw;
    fail(m);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  return out;
}

const TensorStateRecord* find_record(const StateFile& s, const std::string& name) {
  for (const auto& r : s.tensors)
    if (r.name == name) return &r;
  return nullptr;
}

void check_state_record(const std::string& path, const TensorStateRecord& r,
                        const std::vector<int64_t>& shape, Label label) {
  const std::string where = "optimizer state " + path + ": tensors/" + r.name + ": ";
  auto fail = [&](const std::string& m) { throw flax::FormatError(where + m); };
  Geometry want;
  try {
    want = Geometry::of(shape);
    if (r.shape != shape)
      fail("shape " + Geometry::of(r.shape).shape_str() + " in the file, " + want.shape_str() +
           " registered");
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  if (r.label != label)
    fail(std::string("labelled ") + label_name(r.label) + " in the file, " + label_name(label) +
         " by the current rules");
  auto size_is = [&](const std::vector<float>& v, int64_t n, const char* key) {
    if (static_cast<int64_t>(v.size()) != n)
      fail(std::string(key) + ": expected " + std::to_string(n) + " elements, got " +
           std::to_string(v.size()));
  };
  if (!r.master.empty()) size_is(r.master, want.numel, "master");
  if (label == Label::kCelo2) {
    if (r.iteration < 0) fail("negative iteration");
    size_is(r.m, kMom * want.numel, "m");
    size_is(r.rms, kRms * want.numel, "rms");
    // The arrays the tensor's geometry does not use must be absent (empty).
    size_is(r.v_row, want.factored ? kFac * want.row_count : 0, "v_row");
    size_is(r.v_col, want.factored ? kFac * want.col_count : 0, "v_col");
    size_is(r.v_diag, want.factored ? 0 : kFac * want.numel, "v_diag");
  } else if (label == Label::kAdamW) {
    if (r.count < 0) fail("negative count");
    size_is(r.mu, want.numel, "mu");
    size_is(r.nu, want.numel, "nu");
  }
}

}  // namespace celo2
