// Label rules: parsing, matching, the default rule sets.
#include "celo2/labels.h"

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
    RE2::Options o;
    o.set_log_errors(false);
    auto re = std::make_shared<RE2>(pattern, o);
    if (!re->ok())
      throw std::invalid_argument("bad regular expression '" + pattern + "': " + re->error());
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

std::vector<Label> LabelRules::assign(const std::vector<TensorDesc>& tensors) const {
  int64_t first_matrix = -1, last_matrix = -1;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].shape.size() >= 2) {
      if (first_matrix < 0) first_matrix = static_cast<int64_t>(i);
      last_matrix = static_cast<int64_t>(i);
    }
  std::vector<Label> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorDesc& t = tensors[i];
    bool done = false;
    for (const Rule& r : rules_) {
      bool hit = false;
      switch (r.match) {
        case Match::kRegex: hit = RE2::PartialMatch(t.name, *r.re); break;
        case Match::kNdimLe1: hit = t.shape.size() <= 1; break;
        case Match::kFirstMatrix: hit = static_cast<int64_t>(i) == first_matrix; break;
        case Match::kLastMatrix: hit = static_cast<int64_t>(i) == last_matrix; break;
        case Match::kAny: hit = true; break;
      }
      if (hit) {
        out.push_back(r.label);
        done = true;
        break;
      }
    }
    if (!done) {  // the seed's default
      const bool adam = t.shape.size() <= 1 || t.name.find("embed") != std::string::npos;
      out.push_back(adam ? Label::kAdamW : Label::kCelo2);
    }
  }
  return out;
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
                                 const std::vector<Label>& labels) {
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
  return s.str();
}

}  // namespace celo2
