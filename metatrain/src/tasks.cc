#include "celo2/metatrain/tasks.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "celo2/params.h"

namespace celo2::meta {

std::string digits_csv_path() { return param::digits_csv(); }

namespace {

// The numeric rows of a CSV text, in order (blank lines skipped): fn(row number from 1,
// cells as text, their values). A cell that is not a finite number is an error naming the
// file, row and column; each loader checks its own column count, ranges and labels.
template <class F>
void for_each_csv_row(std::istream& in, const std::string& path, F&& fn) {
  std::string line, cell;
  std::vector<std::string> cells;
  std::vector<double> values;
  int64_t row = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line == "\r") continue;
    ++row;
    cells.clear();
    values.clear();
    std::istringstream ls(line);
    while (std::getline(ls, cell, ',')) {
      char* end = nullptr;
      const double v = std::strtod(cell.c_str(), &end);
      if (end == cell.c_str() || !std::isfinite(v)) {
        throw std::runtime_error(path + ": row " + std::to_string(row) + " column " +
                                 std::to_string(cells.size() + 1) + ": '" + cell + "' is not a number");
      }
      cells.push_back(cell);
      values.push_back(v);
    }
    fn(row, cells, values);
  }
}

}  // namespace

data::Dataset load_digits_all(const std::string& path_in) {
  const std::string path = path_in.empty() ? digits_csv_path() : path_in;
  std::vector<uint8_t> bytes;
  try {
    bytes = data::read_gz_file(path);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(e.what()) +
                             " (the 8x8 digits come with Debian's python3-sklearn; install it "
                             "or set CELO2_DIGITS_CSV)");
  }
  data::Dataset ds;
  ds.dim = 64;
  ds.num_classes = 10;
  const std::string text(bytes.begin(), bytes.end());
  std::istringstream in(text);
  int64_t row = 0;
  for_each_csv_row(in, path, [&](int64_t r, const std::vector<std::string>& cells, const std::vector<double>& v) {
    row = r;
    if (v.size() != 65) {
      throw std::runtime_error(path + ": row " + std::to_string(row) + " has " + std::to_string(v.size()) +
                               " columns, expected 65");
    }
    for (int col = 0; col < 64; ++col) {
      if (v[col] < 0 || v[col] > 16) {
        throw std::runtime_error(path + ": row " + std::to_string(row) + ": pixel " + std::to_string(v[col]) +
                                 " outside 0..16");
      }
      ds.x.push_back(static_cast<float>(v[col] / 16.0));
    }
    if (v[64] != std::floor(v[64]) || v[64] < 0 || v[64] > 9) {
      throw std::runtime_error(path + ": row " + std::to_string(row) + ": label " + cells[64] + " outside 0..9");
    }
    ds.y.push_back(static_cast<int>(v[64]));
  });
  ds.n = row;
  if (ds.n != 1797) {
    throw std::runtime_error(path + ": " + std::to_string(ds.n) +
                             " rows, expected the 1797 of scikit-learn's digits");
  }
  return ds;
}

data::Dataset load_breast_cancer(data::Split split, const std::string& path_in) {
  const std::string path = path_in.empty()
      ? (std::filesystem::path(digits_csv_path()).parent_path() / "breast_cancer.csv").string()
      : path_in;
  std::ifstream f(path);
  if (!f) {
    throw std::runtime_error(path + ": cannot open (scikit-learn's breast_cancer.csv comes with "
                             "Debian's python3-sklearn)");
  }
  constexpr int kFeatures = 30, kRows = 569;
  std::string line;
  std::getline(f, line);  // "569,30,malignant,benign"
  std::vector<double> x;
  std::vector<int> y;
  int64_t row = 0;
  for_each_csv_row(f, path, [&](int64_t r, const std::vector<std::string>& cells, const std::vector<double>& v) {
    row = r;
    if (v.size() != kFeatures + 1) {
      throw std::runtime_error(path + ": row " + std::to_string(row) + " has " + std::to_string(v.size()) +
                               " columns, expected 31");
    }
    x.insert(x.end(), v.begin(), v.begin() + kFeatures);
    if (v[kFeatures] != 0 && v[kFeatures] != 1) {
      throw std::runtime_error(path + ": row " + std::to_string(row) + ": label " + cells[kFeatures] +
                               " is not 0 or 1");
    }
    y.push_back(static_cast<int>(v[kFeatures]));
  });
  if (row != kRows) {
    throw std::runtime_error(path + ": " + std::to_string(row) +
                             " rows, expected the 569 of scikit-learn's breast-cancer table");
  }
  // A fixed shuffle (Fisher–Yates on mt19937_64(0), an explicit integer draw).
  std::vector<int64_t> order(kRows);
  for (int64_t i = 0; i < kRows; ++i) order[i] = i;
  std::mt19937_64 rng(0);
  for (int64_t i = kRows - 1; i > 0; --i) std::swap(order[i], order[rng() % static_cast<uint64_t>(i + 1)]);
  double mean[kFeatures] = {}, sd[kFeatures] = {};
  for (int64_t r = 0; r < kCancerTrainRows; ++r)
    for (int c = 0; c < kFeatures; ++c) mean[c] += x[order[r] * kFeatures + c] / kCancerTrainRows;
  for (int64_t r = 0; r < kCancerTrainRows; ++r)
    for (int c = 0; c < kFeatures; ++c) {
      const double d = x[order[r] * kFeatures + c] - mean[c];
      sd[c] += d * d / kCancerTrainRows;
    }
  for (double& v : sd) v = std::sqrt(v) > 0 ? std::sqrt(v) : 1.0;
  const int64_t lo = split == data::Split::kTrain ? 0 : kCancerTrainRows;
  const int64_t hi = split == data::Split::kTrain ? kCancerTrainRows : kRows;
  data::Dataset ds;
  ds.dim = kFeatures;
  ds.num_classes = 2;
  ds.n = hi - lo;
  for (int64_t r = lo; r < hi; ++r) {
    for (int c = 0; c < kFeatures; ++c)
      ds.x.push_back(static_cast<float>((x[order[r] * kFeatures + c] - mean[c]) / sd[c]));
    ds.y.push_back(y[order[r]]);
  }
  return ds;
}

data::Dataset load_digits(data::Split split, const std::string& path) {
  data::Dataset all = load_digits_all(path);
  const int64_t lo = split == data::Split::kTrain ? 0 : kDigitsTrainRows;
  const int64_t hi = split == data::Split::kTrain ? kDigitsTrainRows : all.n;
  data::Dataset ds;
  ds.dim = all.dim;
  ds.num_classes = all.num_classes;
  ds.n = hi - lo;
  ds.x.assign(all.x.begin() + lo * all.dim, all.x.begin() + hi * all.dim);
  ds.y.assign(all.y.begin() + lo, all.y.begin() + hi);
  return ds;
}

double Normal::next() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1 = 0.0;
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  spare_ = r * std::sin(2.0 * M_PI * u2);
  has_spare_ = true;
  return r * std::cos(2.0 * M_PI * u2);
}

data::Dataset make_teacher_dataset(uint64_t seed, int64_t n, int dim, int classes) {
  if (n <= 0 || dim <= 0 || classes < 2) throw std::invalid_argument("teacher data: bad sizes");
  Normal rng(seed ^ 0x5deece66dULL);
  constexpr int kHidden = 16;
  std::vector<double> w1(static_cast<size_t>(dim) * kHidden), w2(kHidden * classes);
  for (double& w : w1) w = rng.next() / std::sqrt(static_cast<double>(dim));
  for (double& w : w2) w = rng.next() / std::sqrt(static_cast<double>(kHidden));
  data::Dataset ds;
  ds.dim = dim;
  ds.num_classes = classes;
  ds.n = n;
  ds.x.resize(static_cast<size_t>(n) * dim);
  ds.y.resize(static_cast<size_t>(n));
  std::vector<double> h(kHidden);
  for (int64_t i = 0; i < n; ++i) {
    float* x = ds.x.data() + i * dim;
    for (int d = 0; d < dim; ++d) x[d] = static_cast<float>(rng.next());
    for (int j = 0; j < kHidden; ++j) {
      double a = 0;
      for (int d = 0; d < dim; ++d) a += x[d] * w1[static_cast<size_t>(d) * kHidden + j];
      h[j] = std::max(a, 0.0);
    }
    int best = 0;
    double best_z = -1e300;
    for (int c = 0; c < classes; ++c) {
      double z = 0;
      for (int j = 0; j < kHidden; ++j) z += h[j] * w2[j * classes + c];
      if (z > best_z) best_z = z, best = c;
    }
    ds.y[i] = best;
  }
  return ds;
}

TaskFamily TaskFamily::parse(const std::string& list, const std::string& fashion_dir) {
  TaskFamily f;
  std::istringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name.empty()) continue;
    Source s;
    s.name = name;
    if (name == "fashion8") {
      s.data = std::make_shared<data::Dataset>(
          data::load_fashion_mnist(data::Split::kTrain, 8, fashion_dir));
    } else if (name == "digits") {
      s.data = std::make_shared<data::Dataset>(load_digits(data::Split::kTrain));
    } else if (name != "synthetic") {
      throw std::invalid_argument("unknown task source '" + name +
                                  "' (fashion8, digits, synthetic)");
    }
    f.sources.push_back(std::move(s));
  }
  if (f.sources.empty()) throw std::invalid_argument("task family: no sources in '" + list + "'");
  return f;
}

int TaskFamily::pick(Normal& rng) const {
  double total = 0;
  for (const Source& s : sources) total += s.weight;
  double u = rng.uniform() * total;
  for (size_t i = 0; i < sources.size(); ++i) {
    if (u < sources[i].weight) return static_cast<int>(i);
    u -= sources[i].weight;
  }
  return static_cast<int>(sources.size()) - 1;
}

std::string TaskFamily::names() const {
  std::string out;
  for (const Source& s : sources) out += (out.empty() ? "" : ",") + s.name;
  return out;
}

}  // namespace celo2::meta
