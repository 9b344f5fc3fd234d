// Fashion-MNIST for the example trainer and the inner tasks of meta-training: IDX file
// reading (gzip or plain, through zlib), area-averaging downsampling and a deterministic
// batch sampler.
//
// Invariants:
//  - Readers validate everything (magic number, dimensions, byte count, trailing bytes,
//    label range) and throw std::runtime_error naming the file and the problem; nothing is
//    returned half-read.
//  - There is no synthetic fallback: missing files are an error that says to install the
//    Debian package dataset-fashion-mnist (or to point CELO2_FASHION_MNIST_DIR elsewhere).
//  - Features are float32 in [0, 1], row-major (n, dim) with dim = side * side.
//  - The sampler's order depends only on its seed: it draws from std::mt19937_64 (whose
//    output the standard fixes) with its own shuffle, not std::shuffle or
//    std::uniform_int_distribution (whose algorithms vary between standard libraries).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace celo2::data {

inline constexpr int kFashionMnistClasses = 10;
inline constexpr int kFashionMnistSide = 28;

// The raw contents of an IDX image file (magic 0x00000803: unsigned bytes, 3 dimensions).
struct IdxImages {
  int64_t count = 0;
  int rows = 0, cols = 0;
  std::vector<uint8_t> pixels;  // count * rows * cols, row-major
};

// Reads a whole file, gunzipping it if it is gzip (zlib reads plain files unchanged).
// Throws std::runtime_error naming the file on open, read or decompression errors.
std::vector<uint8_t> read_gz_file(const std::string& path);

IdxImages read_idx_images(const std::string& path);
// IDX label file (magic 0x00000801: unsigned bytes, 1 dimension).
std::vector<uint8_t> read_idx_labels(const std::string& path);

// Area-averaging resize of one square 8-bit image (src_side x src_side) to
// dst_side x dst_side floats in [0, 1]. Output pixel (r, c) is the mean of the source over
// the square [r*s, (r+1)*s) x [c*s, (c+1)*s), s = src_side / dst_side, where source pixels
// cut by the boundary count with the fraction of their area inside it (28 -> 8: s = 3.5).
void downsample_area(const uint8_t* src, int src_side, float* dst, int dst_side);

struct Dataset {
  std::vector<float> x;  // n * dim, row-major, values in [0, 1]
  std::vector<int> y;    // n labels in [0, num_classes)
  int64_t n = 0;
  int dim = 0;
  int num_classes = kFashionMnistClasses;
  const float* row(int64_t i) const { return x.data() + i * dim; }
};

enum class Split { kTrain, kTest };
const char* split_name(Split s);  // "train" / "t10k" (the file prefix)

// $CELO2_FASHION_MNIST_DIR if set, else /usr/share/datasets/fashion-mnist.
std::string fashion_mnist_dir();

// Loads a split at side x side resolution (8: the 8x8 meta-training task; 28: full size,
// no resampling). Any side in 1..28 works (the weights need not be whole pixels).
// `dir` empty means fashion_mnist_dir().
Dataset load_fashion_mnist(Split split, int side = 8, const std::string& dir = "");

// Shuffled epochs over [0, n): each epoch is a fresh Fisher–Yates permutation; a batch
// that runs past the end of an epoch continues in the next one, so every batch is full.
class BatchSampler {
 public:
  BatchSampler(int64_t n, int batch, uint64_t seed);
  // Indices of the next batch (valid until the next call).
  const std::vector<int64_t>& next_indices();
  // Gathers the next batch of `ds` into x (batch * dim) and y (batch).
  void next(const Dataset& ds, float* x, int* y);
  int batch() const { return batch_; }
  int64_t epoch() const { return epoch_; }

 private:
  void reshuffle();
  uint64_t below(uint64_t bound);  // uniform in [0, bound), unbiased (rejection)
  int64_t n_;
  int batch_;
  std::mt19937_64 rng_;
  std::vector<int64_t> perm_;
  std::vector<int64_t> out_;
  int64_t pos_ = 0;
  int64_t epoch_ = 0;
};

}  // namespace celo2::data
