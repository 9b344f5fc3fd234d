// Label rules (spec/celo2.md §5): an ordered list of (match -> label); the first match wins,
// else the default (the seed's: adamw if ndim <= 1 or the name contains "embed", else celo2).
// A match is a regular expression on the tensor's name (RE2, searched anywhere in the name;
// anchor with ^ and $) or a predicate: ndim<=1, first_matrix, last_matrix (the first/last
// registered tensor with ndim >= 2; some harnesses route input and output layers to AdamW).
//
// Text form, one rule per line or separated by ';':   <match> => <label>
//   re:<regex> => adamw        ndim<=1 => adamw        last_matrix => adamw     * => celo2
// Labels: celo2, adamw (alias adam), frozen.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace re2 {
class RE2;
}

namespace celo2 {

enum class Label { kCelo2, kAdamW, kFrozen };
const char* label_name(Label l);
Label parse_label(const std::string& s);  // throws std::invalid_argument

struct TensorDesc {
  std::string name;
  std::vector<int64_t> shape;
};

class LabelRules {
 public:
  // Bounds on the cost of regex rules (RE2): memory per regex, compiled instructions per
  // regex and per rule set. docs/OPERATIONS.md lists them with the control plane's limits.
  static constexpr int64_t kMaxRegexMemory = int64_t{1} << 20;
  static constexpr int kMaxRegexProgram = 2000;
  static constexpr int64_t kMaxRulesProgram = 10000;
  enum class Match { kRegex, kNdimLe1, kFirstMatrix, kLastMatrix, kAny };
  struct Rule {
    Match match = Match::kAny;
    std::string pattern;  // kRegex only
    Label label = Label::kCelo2;
    std::shared_ptr<const re2::RE2> re;
  };

  LabelRules() = default;  // no rules: the seed's default applies to everything
  // Parse the text form; throws std::invalid_argument naming the bad rule (bad regex,
  // unknown label or predicate).
  static LabelRules parse(const std::string& text);
  static LabelRules seed_default();
  // The original meta-training: "/b$" -> adamw, everything else celo2.
  static LabelRules metatrain_default();
  // Celo2-base recipe: everything celo2.
  static LabelRules all_celo2();

  void add(Match match, const std::string& pattern, Label label);
  // Labels of every tensor, in registration order; `routed_by` (optional): the index of the
  // rule that decided each tensor, -1 for the seed's default.
  std::vector<Label> assign(const std::vector<TensorDesc>& tensors, std::vector<int>* routed_by = nullptr) const;
  // The rules that route no tensor, as "'<rule>' matches no tensor" or "'<rule>' matches only
  // tensors an earlier rule routes": a rule written for names the model does not have (e.g.
  // re:embed for nanoGPT's wte / wpe) is a silent misrouting otherwise.
  std::vector<std::string> unused(const std::vector<TensorDesc>& tensors) const;
  static std::string rule_text(const Rule& r);
  std::string to_string() const;
  const std::vector<Rule>& rules() const { return rules_; }

 private:
  static bool matches(const Rule& r, const TensorDesc& t, int64_t index, int64_t first_matrix,
                      int64_t last_matrix);
  std::vector<Rule> rules_;
};

// The routing table: name, shape, label, elements, bytes (float32), then totals per label
// and, given the rules, one "unused rule: ..." line per rule that routes no tensor.
std::string format_routing_table(const std::vector<TensorDesc>& tensors,
                                 const std::vector<Label>& labels, const LabelRules* rules = nullptr);

}  // namespace celo2
