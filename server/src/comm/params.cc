// The table of environment tunables and their accessors (celo2/params.h). Standard library
// only: celo2ctl compiles this file into itself without the rest of the server library.
#include "celo2/params.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <variant>

namespace celo2::param {
namespace {

// Index of each row, in table order.
enum Index : size_t {
#define CELO2_PARAM_INDEX(name, env, kind, def, choices, meaning) k_##name,
  CELO2_PARAMS(CELO2_PARAM_INDEX)
#undef CELO2_PARAM_INDEX
      kCount
};

using Value = std::variant<double, int, bool, std::string>;

struct Slot {
  bool parsed = false;
  Value value;
  std::string error;  // non-empty: the variable's value was refused
};

std::mutex& mu() {
  static std::mutex m;
  return m;
}

Slot* slots() {
  static Slot s[kCount];
  return s;
}

std::vector<std::string> split_choices(const char* choices) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* c = choices; *c; ++c) {
    if (*c == '|') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += *c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The environment's value; nullptr when unset or empty.
const char* raw_env(const Info& p) {
  const char* s = std::getenv(p.env);
  return (s && *s) ? s : nullptr;
}

[[noreturn]] void refuse(const Info& p, const std::string& raw, const std::string& expected) {
  throw ParamError("environment variable " + std::string(p.env) + "='" + raw + "': expected " +
                   expected);
}

// `text` is the variable's value or, when unset, the default.
Value parse(const Info& p, const std::string& text) {
  switch (p.kind) {
    case Kind::kSeconds: {
      if (text.empty()) return 0.0;
      char* end = nullptr;
      errno = 0;
      const double v = std::strtod(text.c_str(), &end);
      if (errno != 0 || end == text.c_str() || *end != '\0' || !std::isfinite(v) || v < 0)
        refuse(p, text, "a number of seconds >= 0");
      return v;
    }
    case Kind::kPort: {
      if (text.empty()) return 0;
      char* end = nullptr;
      errno = 0;
      const long v = std::strtol(text.c_str(), &end, 10);
      if (errno != 0 || end == text.c_str() || *end != '\0' || v < 1 || v > 65535)
        refuse(p, text, "a TCP port (1-65535)");
      return static_cast<int>(v);
    }
    case Kind::kInt: {
      if (text.empty()) return 0;
      char* end = nullptr;
      errno = 0;
      const long v = std::strtol(text.c_str(), &end, 10);
      if (errno != 0 || end == text.c_str() || *end != '\0' || v < 0 || v > (1 << 30))
        refuse(p, text, "a whole number >= 0");
      return static_cast<int>(v);
    }
    case Kind::kBool: {
      const std::string s = lower(text);
      if (s == "1" || s == "true" || s == "yes" || s == "on") return true;
      if (s == "0" || s == "false" || s == "no" || s == "off") return false;
      refuse(p, text, "0 or 1 (or true/false, yes/no, on/off)");
    }
    case Kind::kChoice: {
      for (const std::string& c : split_choices(p.choices))
        if (text == c) return text;
      refuse(p, text, kind_text(p));
    }
    case Kind::kString:
    case Kind::kPath:
    case Kind::kSecret:
      return text;
  }
  return text;
}

template <class T>
T get(Index i) {
  std::lock_guard<std::mutex> lock(mu());
  Slot& s = slots()[i];
  if (!s.parsed) {
    const Info& p = table()[i];
    const char* env = raw_env(p);
    s.error.clear();
    try {
      s.value = parse(p, env ? env : p.default_value);
    } catch (const ParamError& e) {
      s.error = e.what();
    }
    s.parsed = true;
  }
  if (!s.error.empty()) throw ParamError(s.error);
  return std::get<T>(s.value);
}

std::string value_text(const Info& p, const Value& v) {
  if (p.kind == Kind::kSecret) return std::get<std::string>(v).empty() ? "" : "(hidden)";
  if (const double* d = std::get_if<double>(&v)) {
    std::ostringstream o;
    o << *d;
    return o.str();
  }
  if (const int* n = std::get_if<int>(&v)) return *n ? std::to_string(*n) : "";
  if (const bool* b = std::get_if<bool>(&v)) return *b ? "1" : "0";
  return std::get<std::string>(v);
}

}  // namespace

const std::vector<Info>& table() {
  static const std::vector<Info> t = {
#define CELO2_PARAM_ROW(name, env, kind, def, choices, meaning) \
  {#name, env, Kind::kind, def, choices, meaning},
      CELO2_PARAMS(CELO2_PARAM_ROW)
#undef CELO2_PARAM_ROW
  };
  return t;
}

const Info& info(const std::string& env) {
  for (const Info& p : table())
    if (env == p.env) return p;
  throw std::out_of_range("'" + env + "' is not a celo2 tunable (celo2-tool params lists them)");
}

std::string kind_text(const Info& p) {
  switch (p.kind) {
    case Kind::kSeconds:
      return "seconds";
    case Kind::kPort:
      return "port";
    case Kind::kInt:
      return "integer";
    case Kind::kBool:
      return "bool";
    case Kind::kChoice: {
      const std::vector<std::string> c = split_choices(p.choices);
      std::string s;
      for (size_t i = 0; i < c.size(); ++i)
        s += (i == 0 ? "" : i + 1 == c.size() ? " or " : ", ") + c[i];
      return s;
    }
    case Kind::kString:
      return "string";
    case Kind::kPath:
      return "path";
    case Kind::kSecret:
      return "secret";
  }
  return "?";
}

#define CELO2_PARAM_DEFINE(name, env, kind, def, choices, meaning) \
  ValueOf<Kind::kind>::type name() { return get<ValueOf<Kind::kind>::type>(k_##name); }
CELO2_PARAMS(CELO2_PARAM_DEFINE)
#undef CELO2_PARAM_DEFINE

bool is_set(const Info& p) { return raw_env(p) != nullptr; }

void reload() {
  std::lock_guard<std::mutex> lock(mu());
  for (size_t i = 0; i < kCount; ++i) slots()[i] = Slot{};
}

std::string describe() {
  std::ostringstream o;
  for (const Info& p : table()) {
    const char* env = raw_env(p);
    std::string shown;
    try {
      shown = value_text(p, parse(p, env ? env : p.default_value));
      if (shown.empty()) shown = "(unset)";
      shown += env ? "  [environment]" : "  [default]";
    } catch (const ParamError& e) {
      shown = std::string("INVALID: ") + e.what();
    }
    o << p.env << " = " << shown << "\n    " << kind_text(p) << "; " << p.meaning << "\n";
  }
  return o.str();
}

std::string markdown_table() {
  std::ostringstream o;
  o << "| variable | type | default | meaning |\n|---|---|---|---|\n";
  for (const Info& p : table()) {
    o << "| `" << p.env << "` | " << kind_text(p) << " | ";
    if (*p.default_value)
      o << '`' << p.default_value << '`';
    else
      o << "unset";
    o << " | " << p.meaning << " |\n";
  }
  return o.str();
}

}  // namespace celo2::param
