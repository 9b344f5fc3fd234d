// What every control command is checked against before it is queued (control_impl.h). A
// command that passes here cannot fail when the ranks apply it, except for I/O (checkpoints),
// so a rejected command never leaves ranks disagreeing.
#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "celo2/schedule.h"
#include "celo2/theta_io.h"
#include "control_impl.h"

namespace celo2::control {

namespace fs = std::filesystem;

namespace {

grpc::Status invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// Bounds on numbers arriving from clients (beyond Schedule::validate): step counts stay far
// from int64 overflow in the schedule arithmetic.
constexpr int64_t kMaxSteps = 1'000'000'000'000'000;  // 1e15
constexpr double kMaxMult1d = 1e4;
constexpr double kMaxWeightDecay = 100.0;
constexpr size_t kMaxScheduleText = 1024;
constexpr size_t kMaxRulesText = 64 * 1024;
constexpr size_t kMaxRules = 1024;
constexpr size_t kMaxPath = 4096;

// Is `p` (lexically normal, absolute) `root` or inside it? Compared by path components, so
// "/a/bc" is not inside "/a/b".
bool inside(const fs::path& p, const fs::path& root) {
  auto pi = p.begin();
  for (auto ri = root.begin(); ri != root.end(); ++ri, ++pi) {
    if (ri->empty() && std::next(ri) == root.end()) break;  // trailing separator
    if (pi == p.end() || *pi != *ri) return false;
  }
  return true;
}

}  // namespace

// Length of the well-formed UTF-8 sequence starting at s[i] (2-4 bytes), or 0.
static size_t utf8_sequence(const std::string& s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  const size_t n = c >= 0xc2 && c <= 0xdf   ? 2
                   : c >= 0xe0 && c <= 0xef ? 3
                   : c >= 0xf0 && c <= 0xf4 ? 4
                                            : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return 0;
  return n;
}

std::string printable(const std::string& s, size_t max_chars) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_chars; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else if (const size_t n = c >= 0x80 ? utf8_sequence(s, i) : 0; n > 0) {
      out.append(s, i, n);  // our own messages use a few (an en dash, a section sign)
      i += n - 1;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > max_chars) out += "...";
  return out;
}

std::string quoted(const std::string& s, size_t max_chars) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < max_chars; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > max_chars) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out + "'";
}

grpc::Status read_file_under_root(const fs::path& root, const std::string& requested,
                                  int64_t max_bytes, std::vector<uint8_t>* bytes,
                                  std::string* resolved) {
  if (requested.empty()) return invalid("weights path is empty");
  if (requested.size() > kMaxPath) return invalid("weights path is longer than 4096 bytes");
  if (requested.find('\0') != std::string::npos)
    return invalid("weights path " + quoted(requested) + " contains a NUL byte");
  fs::path p(requested);
  if (p.is_relative()) p = root / p;
  p = p.lexically_normal();
  if (!inside(p, root))
    return invalid("weights path " + quoted(requested) + " is outside the weights root " +
                   quoted(root.string()));
  std::error_code ec;
  const fs::path canon = fs::canonical(p, ec);
  if (ec) return invalid("weights path " + quoted(requested) + ": " + ec.message());
  if (!inside(canon, root))
    return invalid("weights path " + quoted(requested) +
                   " resolves (through a symbolic link) outside the weights root " +
                   quoted(root.string()));
  // Open what we checked, refuse a link swapped in since, then check again what was opened
  // (/proc/self/fd names the file actually open), so a rename race cannot escape the root.
  // O_NONBLOCK: opening a FIFO must not hang the server.
  const int fd = ::open(canon.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return invalid("weights path " + quoted(requested) + ": " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return invalid("weights path " + quoted(requested) + " is not a regular file");
  if (st.st_size > max_bytes)
    return invalid("weights file " + quoted(requested) + " has " + std::to_string(st.st_size) +
                   " bytes, more than the limit of " + std::to_string(max_bytes));
  const fs::path proc = "/proc/self/fd/" + std::to_string(fd);
  const fs::path opened = fs::read_symlink(proc, ec);
  if (!ec && !inside(opened.lexically_normal(), root))
    return invalid("weights path " + quoted(requested) + " changed to a file outside the root");
  bytes->resize(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < bytes->size()) {
    const ssize_t n = ::read(fd, bytes->data() + got, bytes->size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return invalid("weights path " + quoted(requested) + ": read failed");
    got += static_cast<size_t>(n);
  }
  *resolved = canon.string();
  return grpc::Status::OK;
}

void summarize_theta(const Theta& theta, v1::WeightsSummary* summary) {
  summary->set_hidden_size(theta.hidden());
  summary->set_hidden_layers(theta.hidden_layers());
  int64_t params = 0;
  summary->clear_layers();
  for (const DenseLayer& d : theta.layers) {
    params += static_cast<int64_t>(d.w.size() + d.b.size());
    summary->add_layers(std::to_string(d.in) + "x" + std::to_string(d.out));
  }
  summary->set_parameters(params);
}

grpc::Status check_weights(std::span<const uint8_t> bytes, const std::string& source,
                           const RuleConfig& rule, std::string* canonical,
                           v1::WeightsSummary* summary) {
  if (bytes.empty()) return invalid("weights (" + source + ") are empty");
  // Peak memory: the decoded tree lives only inside theta_from_bytes, which also checks the
  // weights against the rule (Theta::check_fits: shapes, finiteness, the canary); the Theta
  // is dropped once its tree is built, and that tree once it is encoded.
  flax::Value tree;
  try {
    Theta theta = theta_from_bytes(bytes, rule);
    summarize_theta(theta, summary);
    tree = theta_to_value(theta);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    return invalid("weights (" + source + ") rejected: " + e.what());
  }
  {
    const std::vector<uint8_t> enc = flax::encode(tree);
    tree = flax::Value();
    summary->set_canonical_sha256(sha256_hex(enc));
    canonical->assign(enc.begin(), enc.end());
  }
  summary->set_sha256(sha256_hex(bytes));
  summary->set_bytes(static_cast<int64_t>(bytes.size()));
  summary->set_source(source);
  return grpc::Status::OK;
}

Schedule schedule_from_proto(const v1::Schedule& p) {
  Schedule s;
  switch (p.kind()) {
    case v1::Schedule::LINEAR:
      s.kind = Schedule::Kind::kLinear;
      break;
    case v1::Schedule::COSINE:
      s.kind = Schedule::Kind::kCosine;
      break;
    case v1::Schedule::WSD:
      s.kind = Schedule::Kind::kWsd;
      break;
    default:
      s.kind = Schedule::Kind::kConstant;
      break;
  }
  s.lr = p.lr();
  s.warmup_steps = p.warmup_steps();
  s.total_steps = p.total_steps();
  s.decay_steps = p.decay_steps();
  s.final_frac = p.final_frac();
  return s;
}

void schedule_to_proto(const Schedule& s, v1::Schedule* out) {
  switch (s.kind) {
    case Schedule::Kind::kConstant:
      out->set_kind(v1::Schedule::CONSTANT);
      break;
    case Schedule::Kind::kLinear:
      out->set_kind(v1::Schedule::LINEAR);
      break;
    case Schedule::Kind::kCosine:
      out->set_kind(v1::Schedule::COSINE);
      break;
    case Schedule::Kind::kWsd:
      out->set_kind(v1::Schedule::WSD);
      break;
  }
  out->set_lr(s.lr);
  out->set_warmup_steps(s.warmup_steps);
  out->set_total_steps(s.total_steps);
  out->set_decay_steps(s.decay_steps);
  out->set_final_frac(s.final_frac);
  out->set_text(s.to_string());
}

grpc::Status check_schedule_request(const v1::SetScheduleRequest& req, v1::ScheduleChange* out) {
  out->Clear();
  if (req.schedule_spec_case() == v1::SetScheduleRequest::SCHEDULE_SPEC_NOT_SET &&
      !req.has_mult_1d() && !req.has_weight_decay() && !req.has_max_grad_norm())
    return invalid("nothing to set: give a schedule, mult_1d, weight_decay or max_grad_norm");
  Schedule s;
  bool have_schedule = true;
  try {
    switch (req.schedule_spec_case()) {
      case v1::SetScheduleRequest::kScheduleText: {
        const std::string& text = req.schedule_text();
        if (text.size() > kMaxScheduleText)
          return invalid("schedule text is longer than " + std::to_string(kMaxScheduleText) +
                         " bytes");
        s = Schedule::parse(text);
        break;
      }
      case v1::SetScheduleRequest::kSchedule: {
        const v1::Schedule& p = req.schedule();
        const int kind = static_cast<int>(p.kind());
        if (kind < v1::Schedule::CONSTANT || kind > v1::Schedule::WSD)
          return invalid("schedule kind " + std::to_string(kind) +
                         " is not one of CONSTANT, LINEAR, COSINE, WSD");
        s = schedule_from_proto(p);
        break;
      }
      default:
        have_schedule = false;
    }
    if (have_schedule) {
      for (int64_t n : {s.warmup_steps, s.total_steps, s.decay_steps})
        if (n < 0 || n > kMaxSteps)
          return invalid("invalid schedule: step counts must be in [0, 1e15]");
      s.validate();
    }
  } catch (const std::invalid_argument& e) {
    return invalid(e.what());
  }
  if (have_schedule) schedule_to_proto(s, out->mutable_schedule());
  if (req.has_mult_1d()) {
    const double m = req.mult_1d();
    if (!std::isfinite(m) || m < 0 || m > kMaxMult1d)
      return invalid("mult_1d must be finite and in [0, 1e4], got " + std::to_string(m));
    out->set_mult_1d(m);
  }
  if (req.has_weight_decay()) {
    const double wd = req.weight_decay();
    if (!std::isfinite(wd) || wd < 0 || wd > kMaxWeightDecay)
      return invalid("weight_decay must be finite and in [0, 100], got " + std::to_string(wd));
    out->set_weight_decay(wd);
  }
  if (req.has_max_grad_norm()) {
    const double v = req.max_grad_norm();
    if (!std::isfinite(v) || v < 0 || v > 1e6)
      return invalid("max_grad_norm must be finite and in [0, 1e6] (0: no clipping), got " + std::to_string(v));
    out->set_max_grad_norm(v);
  }
  return grpc::Status::OK;
}

grpc::Status check_rules(const std::string& text, LabelRules* rules) {
  if (text.size() > kMaxRulesText)
    return invalid("rules text is longer than " + std::to_string(kMaxRulesText) + " bytes");
  if (text.find('\0') != std::string::npos) return invalid("rules text contains a NUL byte");
  try {
    *rules = LabelRules::parse(text);
  } catch (const std::invalid_argument& e) {
    return invalid(printable(e.what(), 400));
  }
  if (rules->rules().empty())
    return invalid("no label rules given (e.g. 're:/b$ => adamw; * => celo2')");
  if (rules->rules().size() > kMaxRules)
    return invalid("more than " + std::to_string(kMaxRules) + " label rules");
  return grpc::Status::OK;
}

void routing_table_to_proto(const std::vector<TensorDesc>& tensors,
                            const std::vector<Label>& labels, v1::RoutingTable* out,
                            const LabelRules* rules) {
  out->Clear();
  int64_t count[3] = {}, elements[3] = {};
  for (size_t i = 0; i < tensors.size(); ++i) {
    v1::TensorRoute* r = out->add_tensors();
    r->set_name(tensors[i].name);
    int64_t n = 1;
    for (int64_t d : tensors[i].shape) {
      r->add_shape(d);
      n *= d;
    }
    r->set_label(label_name(labels[i]));
    r->set_elements(n);
    r->set_bytes(4 * n);
    const int l = static_cast<int>(labels[i]);
    count[l] += 1;
    elements[l] += n;
  }
  for (int l = 0; l < 3; ++l) {
    v1::LabelTotal* t = out->add_totals();
    t->set_label(label_name(static_cast<Label>(l)));
    t->set_tensors(count[l]);
    t->set_elements(elements[l]);
    t->set_bytes(4 * elements[l]);
  }
  out->set_text(format_routing_table(tensors, labels, rules));
}

grpc::Status check_checkpoint_name(const std::string& name) {
  if (name.size() > 200) return invalid("checkpoint name is longer than 200 characters");
  if (!name.empty() && name[0] == '.')
    return invalid("checkpoint name " + quoted(name) + " starts with '.'");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok)
      return invalid("checkpoint name " + quoted(name) +
                     " must be one plain file name of [A-Za-z0-9._-]");
  }
  return grpc::Status::OK;
}

bool token_matches(const std::string& presented, const std::string& expected) {
  // Hashing first makes the comparison length-independent; CRYPTO_memcmp does not stop at
  // the first difference.
  const std::string a =
      sha256_hex({reinterpret_cast<const uint8_t*>(presented.data()), presented.size()});
  const std::string b =
      sha256_hex({reinterpret_cast<const uint8_t*>(expected.data()), expected.size()});
  return !expected.empty() && a.size() == b.size() &&
         CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace celo2::control
