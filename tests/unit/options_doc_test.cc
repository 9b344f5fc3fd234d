// The client's one option table (celo2/client.h): docs/OPERATIONS.md "Options" lists exactly
// the code's keys, with the same type and run-time flag; every key parses its own kind of
// value and refuses a bad one naming the key; an unknown key is refused listing the known
// ones; Client::set refuses keys that cannot change at run time.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "celo2/client.h"

namespace {

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// key -> "type|yes/no" from the docs' table.
std::map<std::string, std::string> documented() {
  std::ifstream f(std::string(CELO2_GOLDEN_DIR) + "/../../docs/OPERATIONS.md");
  EXPECT_TRUE(f.good()) << "docs/OPERATIONS.md not found";
  std::map<std::string, std::string> rows;
  std::string line;
  bool in = false;
  while (std::getline(f, line)) {
    if (line.rfind("## ", 0) == 0) in = line == "## Options";
    if (!in || line.rfind("| `", 0) != 0) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, '|')) cells.push_back(c);
    // "", " `key` ", " type ", " yes ", " meaning "
    auto trim = [](std::string s) {
      s.erase(0, s.find_first_not_of(" `"));
      s.erase(s.find_last_not_of(" `") + 1);
      return s;
    };
    if (cells.size() >= 4) rows[trim(cells[1])] = trim(cells[2]) + "|" + trim(cells[3]);
  }
  return rows;
}

TEST(Options, TheDocsListExactlyTheCodesTable) {
  const auto docs = documented();
  std::map<std::string, std::string> code;
  for (const celo2::ClientOptionInfo& o : celo2::client_option_table())
    code[o.key] = std::string(o.type) + "|" + (o.runtime ? "yes" : "no");
  EXPECT_EQ(docs, code) << "docs/OPERATIONS.md \"Options\" and client_option_table() differ";
  EXPECT_GE(code.size(), 20u);
}

TEST(Options, EachKeyParsesItsKindAndRefusesBadValues) {
  for (const celo2::ClientOptionInfo& o : celo2::client_option_table()) {
    celo2::ClientOptions opts;
    const std::string type = o.type;
    const std::string good = type == "number" ? "0.5" : type == "bool" ? "true" : type == "count" ? "64" : "x";
    EXPECT_NO_THROW(celo2::set_client_option(opts, o.key, good)) << o.key;
    if (type == "number" || type == "bool" || type == "count") {
      try {
        celo2::set_client_option(opts, o.key, "nonsense");
        ADD_FAILURE() << o.key << " accepted 'nonsense'";
      } catch (const std::invalid_argument& e) {
        EXPECT_TRUE(has(e.what(), o.key)) << e.what();
      }
    }
  }
  celo2::ClientOptions opts;
  celo2::set_client_option(opts, "adam_b2", "0.999");
  EXPECT_DOUBLE_EQ(opts.adam_b2, 0.999);
  celo2::set_client_option(opts, "control_weights_root", "/w");
  EXPECT_EQ(opts.control.weights_root, "/w");
  EXPECT_THROW(celo2::set_client_option(opts, "bucket_elements", "0"), std::invalid_argument);
  try {
    celo2::set_client_option(opts, "betas", "0.9");
    FAIL() << "an unknown key was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(has(e.what(), "unknown option 'betas'")) << e.what();
    EXPECT_TRUE(has(e.what(), "adam_b1")) << e.what();
  }
}

TEST(Options, RunTimeChangesAreTheMarkedOnes) {
  celo2::ClientOptions o;
  o.communicator = "local";
  celo2::Client c(o);
  std::vector<float> p(6, 0.5f), g(6, 0.1f);
  c.add_tensor("w", {2, 3}, p.data(), g.data());
  c.set("weight_decay", "0.1");
  EXPECT_DOUBLE_EQ(c.engine().optimizer_options().weight_decay, 0.1);
  c.set("schedule", "constant:lr=0.01");
  try {
    c.set("variant", "celo2-base");
    FAIL() << "variant changed at run time";
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(has(e.what(), "cannot change at run time")) << e.what();
  }
}

}  // namespace
