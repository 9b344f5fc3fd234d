// The inner tasks of meta-training: data sets at 8×8 (64 features, 10 classes) and the
// family an inner run draws from.
//
//  - fashion8: Fashion-MNIST train split, area-downsampled to 8×8 (Debian
//    dataset-fashion-mnist).
//  - digits:   scikit-learn's 8×8 handwritten digits (Debian python3-sklearn ships
//    sklearn/datasets/data/digits.csv.gz: 1797 rows of 64 pixel values 0..16 and a label);
//    pixels divided by 16. The first 1500 rows are the training split, the rest the test split.
//  - synthetic: a labelled Gaussian cloud: x ~ N(0, 1)^64, labels = argmax of a random
//    64-16-10 ReLU "teacher" network drawn from the task's seed (4096 examples). A fresh
//    teacher per seed, so the family is unbounded.
//
// Every loader validates what it reads and throws std::runtime_error naming the file and the
// problem (and, for a missing file, the Debian package to install).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "celo2/train/fashion_mnist.h"

namespace celo2::meta {

inline constexpr int kDigitsTrainRows = 1500;

// $CELO2_DIGITS_CSV if set, else Debian's python3-sklearn copy.
std::string digits_csv_path();
// The whole file (1797 rows); `path` empty: digits_csv_path().
data::Dataset load_digits_all(const std::string& path = "");
// Rows [0, 1500) (train) or [1500, 1797) (test).
data::Dataset load_digits(data::Split split, const std::string& path = "");

// scikit-learn's breast-cancer table (Wisconsin diagnostic; breast_cancer.csv next to the
// digits file in Debian's python3-sklearn, `path` empty: that one): 569 rows of 30 real
// features and a 0/1 label. An evaluation task only (tabular, 2 classes: nothing like the
// meta-training tasks). Rows are shuffled with a fixed generator; the first 400 are the
// training split, the remaining 169 the test split; features are standardized with the
// training split's mean and standard deviation.
inline constexpr int kCancerTrainRows = 400;
data::Dataset load_breast_cancer(data::Split split, const std::string& path = "");

// A synthetic 64-feature, 10-class data set; deterministic in `seed`.
data::Dataset make_teacher_dataset(uint64_t seed, int64_t n = 4096, int dim = 64,
                                   int classes = 10);

// Deterministic standard normal draws from mt19937_64 (Box–Muller; the standard library's
// normal_distribution differs between implementations).
class Normal {
 public:
  explicit Normal(uint64_t seed) : rng_(seed) {}
  double next();
  double uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }  // [0, 1)
  uint64_t bits() { return rng_(); }

 private:
  std::mt19937_64 rng_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// The meta-training task family: which data sets an inner run may draw, with what weight.
struct TaskFamily {
  struct Source {
    std::string name;
    std::shared_ptr<const data::Dataset> data;  // null: synthetic, drawn per run
    double weight = 1.0;
  };
  std::vector<Source> sources;

  // "fashion8,digits,synthetic" (any subset, order kept, each with weight 1). Real data
  // sets load once here.
  static TaskFamily parse(const std::string& list, const std::string& fashion_dir = "");
  // Draws a source index by weight.
  int pick(Normal& rng) const;
  std::string names() const;
};

}  // namespace celo2::meta
