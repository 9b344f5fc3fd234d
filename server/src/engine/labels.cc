// Label rules: parsing, matching, the default rule sets.
#include "celo2/labels.h"

#include <algorithm>

#include "celo2/config.h"

#include <re2/re2.h>

#include <iomanip>
#include <sstream>
#include <stdexcept>

namespace celo2 {

const char* label_name(Label l) {
  switch (l) {
    case Label::kCelo2: return "celo2";
    case Label::kAdamW: return "adamw";
    case Label::kFrozen: return "frozen";
  }
  return "?";
}

Label parse_label(const std::string& s) {
  if (s == "celo2") return Label::kCelo2;
  if (s == "adamw" || s == "adam") return Label::kAdamW;
  if (s == "frozen") return Label::kFrozen;
  throw std::invalid_argument("unknown label '" + s + "' (expected celo2, adamw or frozen)");
}

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

}  // namespace

void LabelRules::add(Match match, const std::string& pattern, Label label) {
  Rule r;
  r.match = match;
  r.label = label;
  if (match == Match::kRegex) {
    // Bounded cost (issue 14 D3): a rule is compiled on every rank and matched against every
    // tensor name, so one regex may use at most kMaxRegexMemory bytes and kMaxRegexProgram
    // instructions, and one rule set kMaxRulesProgram in all (30 rules of re:\pL{400} took
    // 8 s and 185 MB per rank before).
    RE2::Options o;
    o.set_log_errors(false);
    o.set_max_mem(kMaxRegexMemory);
    auto re = std::make_shared<RE2>(pattern, o);
    const std::string shown = pattern.size() > 80 ? pattern.substr(0, 80) + "..." : pattern;
    if (re->error_code() == RE2::ErrorPatternTooLarge)
      throw std::invalid_argument("regular expression '" + shown + "' is too complex (more than " +
                                  std::to_string(kMaxRegexMemory >> 20) + " MiB compiled)");
    if (!re->ok())
      throw std::invalid_argument("bad regular expression '" + pattern + "': " + re->error());
    if (re->ProgramSize() > kMaxRegexProgram)
      throw std::invalid_argument("regular expression '" + shown + "' is too complex (" +
                                  std::to_string(re->ProgramSize()) + " instructions; at most " +
                                  std::to_string(kMaxRegexProgram) + ")");
    int64_t total = re->ProgramSize();
    for (const Rule& other : rules_)
      if (other.re) total += other.re->ProgramSize();
    if (total > kMaxRulesProgram)
      throw std::invalid_argument("label rules too complex in all (" + std::to_string(total) +
                                  " regex instructions; at most " + std::to_string(kMaxRulesProgram) + ")");
    r.pattern = pattern;
    r.re = std::move(re);
  }
  rules_.push_back(std::move(r));
}

LabelRules LabelRules::parse(const std::string& text) {
  LabelRules out;
  std::string item;
  std::vector<std::string> items;
  for (char ch : text) {
    if (ch == '\n' || ch == ';') {
      items.push_back(item);
      item.clear();
    } else {
      item += ch;
    }
  }
  items.push_back(item);
  int index = 0;
  for (const std::string& raw : items) {
    const std::string line = trim(raw);
    if (line.empty() || line[0] == '#') continue;
    ++index;
    const auto arrow = line.rfind("=>");
    if (arrow == std::string::npos)
      throw std::invalid_argument("label rule " + std::to_string(index) + " '" + line +
                                  "': expected '<match> => <label>'");
    const std::string match = trim(line.substr(0, arrow));
    const std::string label_text = trim(line.substr(arrow + 2));
    Label label;
    try {
      label = parse_label(label_text);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("label rule " + std::to_string(index) + ": " + e.what());
    }
    try {
      if (match.rfind("re:", 0) == 0) out.add(Match::kRegex, match.substr(3), label);
      else if (match == "ndim<=1") out.add(Match::kNdimLe1, "", label);
      else if (match == "first_matrix") out.add(Match::kFirstMatrix, "", label);
      else if (match == "last_matrix") out.add(Match::kLastMatrix, "", label);
      else if (match == "*") out.add(Match::kAny, "", label);
      else
        throw std::invalid_argument("unknown match '" + match +
                                    "' (expected re:<regex>, ndim<=1, first_matrix, "
                                    "last_matrix or *)");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("label rule " + std::to_string(index) + ": " + e.what());
    }
  }
  return out;
}

LabelRules LabelRules::seed_default() {
  LabelRules r;
  r.add(Match::kNdimLe1, "", Label::kAdamW);
  r.add(Match::kRegex, "embed", Label::kAdamW);
  r.add(Match::kAny, "", Label::kCelo2);
  return r;
}

LabelRules LabelRules::metatrain_default() {
  LabelRules r;
  r.add(Match::kRegex, "/b$", Label::kAdamW);
  r.add(Match::kAny, "", Label::kCelo2);
  return r;
}

LabelRules LabelRules::all_celo2() {
  LabelRules r;
  r.add(Match::kAny, "", Label::kCelo2);
  return r;
}

std::vector<Label> LabelRules::assign(const std::vector<TensorDesc>& tensors,
                                      std::vector<int>* routed_by) const {
  int64_t first_matrix = -1, last_matrix = -1;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].shape.size() >= 2) {
      if (first_matrix < 0) first_matrix = static_cast<int64_t>(i);
      last_matrix = static_cast<int64_t>(i);
    }
  std::vector<Label> out;
  out.reserve(tensors.size());
  if (routed_by) routed_by->assign(tensors.size(), -1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorDesc& t = tensors[i];
    bool done = false;
    for (size_t k = 0; k < rules_.size() && !done; ++k) {
      const Rule& r = rules_[k];
      if (!matches(r, t, static_cast<int64_t>(i), first_matrix, last_matrix)) continue;
      out.push_back(r.label);
      if (routed_by) (*routed_by)[i] = static_cast<int>(k);
      done = true;
    }
    if (!done) {  // the seed's default
      const bool adam = t.shape.size() <= 1 || t.name.find("embed") != std::string::npos;
      out.push_back(adam ? Label::kAdamW : Label::kCelo2);
    }
  }
  return out;
}

bool LabelRules::matches(const Rule& r, const TensorDesc& t, int64_t index, int64_t first_matrix,
                         int64_t last_matrix) {
  switch (r.match) {
    case Match::kRegex: return RE2::PartialMatch(t.name, *r.re);
    case Match::kNdimLe1: return t.shape.size() <= 1;
    case Match::kFirstMatrix: return index == first_matrix;
    case Match::kLastMatrix: return index == last_matrix;
    case Match::kAny: return true;
  }
  return false;
}

std::vector<std::string> LabelRules::unused(const std::vector<TensorDesc>& tensors) const {
  std::vector<int> by;
  assign(tensors, &by);
  int64_t first_matrix = -1, last_matrix = -1;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].shape.size() >= 2) {
      if (first_matrix < 0) first_matrix = static_cast<int64_t>(i);
      last_matrix = static_cast<int64_t>(i);
    }
  std::vector<std::string> out;
  for (size_t k = 0; k < rules_.size(); ++k) {
    if (std::find(by.begin(), by.end(), static_cast<int>(k)) != by.end()) continue;
    bool any = false;
    for (size_t i = 0; i < tensors.size() && !any; ++i)
      any = matches(rules_[k], tensors[i], static_cast<int64_t>(i), first_matrix, last_matrix);
    std::string line = "'";  // built by appends: GCC 12 warns (-Wrestrict) on the + chain
    line += rule_text(rules_[k]);
    line += any ? "' matches only tensors an earlier rule routes" : "' matches no tensor";
    out.push_back(std::move(line));
  }
  return out;
}

std::string LabelRules::rule_text(const Rule& r) {
  std::string m;
  switch (r.match) {
    case Match::kRegex: m = "re:" + r.pattern; break;
    case Match::kNdimLe1: m = "ndim<=1"; break;
    case Match::kFirstMatrix: m = "first_matrix"; break;
    case Match::kLastMatrix: m = "last_matrix"; break;
    case Match::kAny: m = "*"; break;
  }
  return m + " => " + label_name(r.label);
}

std::string LabelRules::to_string() const {
  std::ostringstream s;
  for (const Rule& r : rules_) {
    switch (r.match) {
      case Match::kRegex: s << "re:" << r.pattern; break;
      case Match::kNdimLe1: s << "ndim<=1"; break;
      case Match::kFirstMatrix: s << "first_matrix"; break;
      case Match::kLastMatrix: s << "last_matrix"; break;
      case Match::kAny: s << "*"; break;
    }
    s << " => " << label_name(r.label) << "\n";
  }
  if (rules_.empty() || rules_.back().match != Match::kAny)
    s << "(default) ndim<=1 or name contains 'embed' => adamw, else celo2\n";
  return s.str();
}

std::string format_routing_table(const std::vector<TensorDesc>& tensors,
                                 const std::vector<Label>& labels, const LabelRules* rules) {
  std::ostringstream s;
  size_t w = 4;
  for (const auto& t : tensors) w = std::max(w, t.name.size());
  s << std::left << std::setw(static_cast<int>(w) + 2) << "name" << std::setw(20) << "shape"
    << std::setw(8) << "label" << std::right << std::setw(12) << "elements" << std::setw(14)
    << "bytes" << "\n";
  int64_t total[3] = {}, count[3] = {};
  for (size_t i = 0; i < tensors.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : tensors[i].shape) n *= d;
    s << std::left << std::setw(static_cast<int>(w) + 2) << tensors[i].name << std::setw(20)
      << format_shape(tensors[i].shape) << std::setw(8) << label_name(labels[i]) << std::right
      << std::setw(12) << n << std::setw(14) << 4 * n << "\n";
    total[static_cast<int>(labels[i])] += n;
    count[static_cast<int>(labels[i])] += 1;
  }
  for (int l = 0; l < 3; ++l)
    s << "total " << label_name(static_cast<Label>(l)) << ": " << count[l] << " tensors, "
      << total[l] << " elements\n";
  if (rules)
    for (const std::string& u : rules->unused(tensors)) s << "unused rule: " << u << "\n";
  return s.str();
}

}  // namespace celo2
