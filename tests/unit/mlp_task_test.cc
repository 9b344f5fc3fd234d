// MlpTask gradients against finite differences, and the Fashion-MNIST IDX reader on the real
// files and on broken ones.
#include "celo2/train/mlp_task.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "celo2/train/fashion_mnist.h"

namespace {

using celo2::data::BatchSampler;
using celo2::data::Dataset;
using celo2::data::MlpTask;
using celo2::data::MlpTaskT;

// A random batch: features in [0, 1) with some exact zeros (as blank pixels are), labels 0..9.
void random_batch(int batch, int dim, uint64_t seed, std::vector<float>& x, std::vector<int>& y) {
  std::mt19937_64 rng(seed);
  x.resize(static_cast<size_t>(batch) * dim);
  y.resize(batch);
  for (float& v : x) {
    const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    v = u < 0.25 ? 0.0f : static_cast<float>(u);
  }
  for (int& l : y) l = static_cast<int>(rng() % 10);
}

bool dataset_present() {
  return std::filesystem::exists(celo2::data::fashion_mnist_dir() + "/train-images-idx3-ubyte.gz");
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("celo2_mlp_task_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

void write_gz(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

std::vector<uint8_t> idx_images(uint32_t magic, uint32_t n, uint32_t rows, uint32_t cols,
                                size_t payload) {
  std::vector<uint8_t> b;
  for (uint32_t v : {magic, n, rows, cols}) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
  }
  b.resize(b.size() + payload, 7);
  return b;
}

// Expects `fn` to throw std::runtime_error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "message '" << msg << "' lacks '" << p << "'";
    }
  }
}

// ---------------------------------------------------------------------------------------
// MlpTask
// ---------------------------------------------------------------------------------------

TEST(MlpTask, NamesShapesAndInit) {
  MlpTask t;  // 64-32-10
  ASSERT_EQ(t.num_tensors(), 4);
  EXPECT_EQ(t.name(0), "fc1/w");
  EXPECT_EQ(t.name(1), "fc1/b");
  EXPECT_EQ(t.name(2), "fc2/w");
  EXPECT_EQ(t.name(3), "fc2/b");
  EXPECT_EQ(t.shape(0), (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(t.shape(1), (std::vector<int64_t>{32}));
  EXPECT_EQ(t.shape(2), (std::vector<int64_t>{32, 10}));
  EXPECT_EQ(t.shape(3), (std::vector<int64_t>{10}));
  EXPECT_EQ(t.num_params(), 64 * 32 + 32 + 32 * 10 + 10);
  const float limit = std::sqrt(6.0f / (64 + 32));
  for (int64_t i = 0; i < t.numel(0); ++i) EXPECT_LE(std::abs(t.params(0)[i]), limit);
  for (int64_t i = 0; i < t.numel(1); ++i) EXPECT_EQ(t.params(1)[i], 0.0f);

  MlpTask same({64, 32, 10}, 0), other({64, 32, 10}, 1);
  EXPECT_EQ(std::vector<float>(same.params(0), same.params(0) + same.numel(0)),
            std::vector<float>(t.params(0), t.params(0) + t.numel(0)));
  EXPECT_NE(std::vector<float>(other.params(0), other.params(0) + other.numel(0)),
            std::vector<float>(t.params(0), t.params(0) + t.numel(0)));
}

TEST(MlpTask, InitialLossIsNearLogClasses) {
  std::vector<float> x;
  std::vector<int> y;
  random_batch(256, 64, 3, x, y);
  MlpTask t;
  const float loss = t.loss(x.data(), y.data(), 256);
  EXPECT_NEAR(loss, std::log(10.0f), 0.5f);
}

// Double precision, h = 1e-5. The difference quotient carries rounding noise of about
// eps·|L|/h ~ 3e-11 absolute (plus O(h^2) truncation, far smaller), so the analytic gradient
// must agree to 1e-5 relative above |g| = 1e-4 (1e-9 absolute below it); measured worst over
// 20 seeds: 6e-7. A wrong gradient is off by O(1). (h much larger than 1e-5 starts crossing
// ReLU kinks; a finite-difference check in float32 is dominated by rounding noise and
// kink crossings, so float32 is checked against this double instance instead, below.)
TEST(MlpTask, GradientMatchesFiniteDifferencesDouble) {
  std::vector<float> x;
  std::vector<int> y;
  for (const std::vector<int>& layers :
       {std::vector<int>{64, 32, 10}, std::vector<int>{16, 12, 8, 5}}) {
    random_batch(32, layers[0], 11, x, y);
    for (int& l : y) l %= layers.back();
    MlpTaskT<double> t(layers, 5);
    // Non-zero biases so their gradient path is exercised away from the init.
    for (int i = 1; i < t.num_tensors(); i += 2) {
      for (int64_t k = 0; k < t.numel(i); ++k) t.params(i)[k] = 0.05 * std::sin(1.0 + k);
    }
    const auto r = celo2::data::gradient_check(t, x.data(), y.data(), 32, 1e-5, 1e-4, 200);
    std::printf("grad check %zu layers: %lld coordinates, max error %.2e\n", layers.size(),
                static_cast<long long>(r.checked), r.max_error);
    EXPECT_GT(r.checked, 100);
    EXPECT_LT(r.max_error, 1e-5) << r.worst;
  }
}

// The float32 instance (the one training uses) against the checked double instance: the same
// code from the same (rounded) start, so gradients agree to float rounding: 1e-5 absolute +
// 1e-4 relative.
TEST(MlpTask, FloatGradientAgreesWithDouble) {
  std::vector<float> x;
  std::vector<int> y;
  random_batch(64, 64, 17, x, y);
  MlpTask f({64, 32, 10}, 9);
  MlpTaskT<double> d({64, 32, 10}, 9);
  const float lf = f.loss_and_grad(x.data(), y.data(), 64);
  const double ld = d.loss_and_grad(x.data(), y.data(), 64);
  EXPECT_NEAR(lf, ld, 1e-5);
  for (int i = 0; i < f.num_tensors(); ++i) {
    for (int64_t k = 0; k < f.numel(i); ++k) {
      ASSERT_NEAR(f.grads(i)[k], d.grads(i)[k], 1e-5 + 1e-4 * std::abs(d.grads(i)[k]))
          << f.name(i) << "[" << k << "]";
    }
  }
}

// The BLAS fast path (float default) against the reference loops, on the shapes training
// and evaluation use, after a few SGD steps so hidden units are partly inactive: losses within
// 1e-6 relative, gradients within 1e-5 absolute + 1e-4 relative (sgemm sums in another order).
TEST(MlpTask, BlasPathAgreesWithLoops) {
  for (const std::vector<int>& layers :
       {std::vector<int>{64, 32, 10}, std::vector<int>{784, 128, 10}, std::vector<int>{64, 128, 128, 10}}) {
    std::vector<float> x;
    std::vector<int> y;
    random_batch(37, layers.front(), 23, x, y);
    MlpTask fast(layers, 4), ref(layers, 4);
    ref.set_use_blas(false);
    for (int step = 0; step < 3; ++step) {
      const float lf = fast.loss_and_grad(x.data(), y.data(), 37);
      const float lr = ref.loss_and_grad(x.data(), y.data(), 37);
      EXPECT_NEAR(lf, lr, 1e-6 * std::abs(lr)) << layers.size() << " layers, step " << step;
      for (int i = 0; i < fast.num_tensors(); ++i) {
        for (int64_t k = 0; k < fast.numel(i); ++k) {
          ASSERT_NEAR(fast.grads(i)[k], ref.grads(i)[k], 1e-5 + 1e-4 * std::abs(ref.grads(i)[k]))
              << fast.name(i) << "[" << k << "]";
          // One SGD step on both from the reference gradient: the same parameters.
          const float g = ref.grads(i)[k];
          fast.params(i)[k] -= 0.5f * g;
          ref.params(i)[k] -= 0.5f * g;
        }
      }
    }
  }
}

TEST(MlpTask, RejectsBadLabels) {
  std::vector<float> x(64 * 2, 0.5f);
  std::vector<int> y = {3, 10};
  MlpTask t;
  EXPECT_THROW(t.loss_and_grad(x.data(), y.data(), 2), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------
// Downsampling and the sampler
// ---------------------------------------------------------------------------------------

TEST(Downsample, ConstantImageStaysConstant) {
  for (int value : {0, 1, 128, 255}) {
    std::vector<uint8_t> img(28 * 28, static_cast<uint8_t>(value));
    std::vector<float> out(64);
    celo2::data::downsample_area(img.data(), 28, out.data(), 8);
    for (float v : out) EXPECT_NEAR(v, value / 255.0f, 1e-6f);
  }
}

// 28 -> 8: output pixel 0 covers source pixels 0..2 fully and half of pixel 3.
TEST(Downsample, FractionalAreaWeights) {
  std::vector<uint8_t> img(28 * 28, 0);
  img[3 * 28 + 3] = 255;  // shared by output cells (0,0), (0,1), (1,0), (1,1)
  std::vector<float> out(64);
  celo2::data::downsample_area(img.data(), 28, out.data(), 8);
  const float quarter_cell = 0.25f / (3.5f * 3.5f);
  EXPECT_NEAR(out[0], quarter_cell, 1e-7f);
  EXPECT_NEAR(out[1], quarter_cell, 1e-7f);
  EXPECT_NEAR(out[8], quarter_cell, 1e-7f);
  EXPECT_NEAR(out[9], quarter_cell, 1e-7f);
  double total = 0;
  for (float v : out) total += v;
  EXPECT_NEAR(total, 4 * quarter_cell, 1e-6);

  // Mass is preserved: the mean of the output equals the mean of the input.
  std::mt19937_64 rng(1);
  for (auto& p : img) p = static_cast<uint8_t>(rng() & 0xff);
  celo2::data::downsample_area(img.data(), 28, out.data(), 8);
  double in_mean = 0, out_mean = 0;
  for (auto p : img) in_mean += p / 255.0;
  for (float v : out) out_mean += v;
  EXPECT_NEAR(in_mean / img.size(), out_mean / out.size(), 1e-6);
}

TEST(BatchSampler, DeterministicAndEpochsArePermutations) {
  BatchSampler a(100, 7, 42), b(100, 7, 42), c(100, 7, 43);
  std::vector<int> seen(100, 0);
  bool differs = false;
  for (int k = 0; k < 14; ++k) {  // 98 indices: within the first epoch
    const auto ia = a.next_indices();
    const auto& ib = b.next_indices();
    const auto& ic = c.next_indices();
    EXPECT_EQ(ia, ib);
    if (ia != ic) differs = true;
    for (int64_t i : ia) ++seen[i];
  }
  EXPECT_TRUE(differs);
  for (int s : seen) EXPECT_LE(s, 1);
  // The 15th batch crosses into epoch 1: two from epoch 0, five from the new permutation.
  const auto cross = a.next_indices();
  EXPECT_EQ(a.epoch(), 1);
  for (int k = 0; k < 2; ++k) EXPECT_EQ(seen[cross[k]], 0);
}

// ---------------------------------------------------------------------------------------
// IDX reader
// ---------------------------------------------------------------------------------------

TEST(FashionMnist, ReadsRealTrainingSet) {
  if (!dataset_present()) GTEST_SKIP() << "dataset-fashion-mnist not installed";
  const Dataset ds = celo2::data::load_fashion_mnist(celo2::data::Split::kTrain, 8);
  EXPECT_EQ(ds.n, 60000);
  EXPECT_EQ(ds.dim, 64);
  ASSERT_EQ(ds.x.size(), 60000u * 64u);
  std::vector<int> counts(10, 0);
  for (int l : ds.y) {
    ASSERT_GE(l, 0);
    ASSERT_LE(l, 9);
    ++counts[l];
  }
  for (int c : counts) EXPECT_EQ(c, 6000);  // Fashion-MNIST is balanced
  float lo = 1, hi = 0;
  for (float v : ds.x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  EXPECT_GE(lo, 0.0f);
  EXPECT_LE(hi, 1.0f);
  EXPECT_GT(hi, 0.5f);

  const Dataset full = celo2::data::load_fashion_mnist(celo2::data::Split::kTest, 28);
  EXPECT_EQ(full.n, 10000);
  EXPECT_EQ(full.dim, 784);
  // A full-size image downsampled equals the 8x8 test set's row.
  const Dataset small = celo2::data::load_fashion_mnist(celo2::data::Split::kTest, 8);
  const auto raw =
      celo2::data::read_idx_images(celo2::data::fashion_mnist_dir() + "/t10k-images-idx3-ubyte.gz");
  EXPECT_EQ(raw.count, 10000);
  EXPECT_EQ(raw.rows, 28);
  std::vector<float> out(64);
  celo2::data::downsample_area(raw.pixels.data() + 5 * 784, 28, out.data(), 8);
  for (int k = 0; k < 64; ++k) EXPECT_EQ(out[k], small.row(5)[k]);
  for (int k = 0; k < 784; ++k) EXPECT_NEAR(full.row(5)[k], raw.pixels[5 * 784 + k] / 255.0f, 0);
}

TEST(FashionMnist, TruncatedGzipIsAClearError) {
  const std::string good = temp_path("good.gz");
  const std::string cut = temp_path("cut.gz");
  write_gz(good, idx_images(0x803, 10, 28, 28, 10 * 784));
  EXPECT_EQ(celo2::data::read_idx_images(good).count, 10);
  std::vector<char> bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  ASSERT_GT(bytes.size(), 40u);
  {
    std::ofstream out(cut, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  expect_error([&] { celo2::data::read_idx_images(cut); }, {cut, "trunc"});
  std::filesystem::remove(good);
  std::filesystem::remove(cut);
}

TEST(FashionMnist, CorruptGzipIsAClearError) {
  const std::string good = temp_path("ok.gz");
  const std::string bad = temp_path("flipped.gz");
  write_gz(good, idx_images(0x803, 10, 28, 28, 10 * 784));
  std::vector<char> bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  // Damage the CRC32 of the gzip trailer (8 bytes from the end): the data inflates but no
  // longer checks out.
  bytes[bytes.size() - 8] ^= 0x5a;
  {
    std::ofstream out(bad, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  expect_error([&] { celo2::data::read_idx_images(bad); }, {bad, "gzip"});
  std::filesystem::remove(good);
  std::filesystem::remove(bad);
}

TEST(FashionMnist, HeaderProblemsAreClearErrors) {
  const std::string p = temp_path("hdr.gz");
  write_gz(p, idx_images(0x801, 10, 28, 28, 10 * 784));  // a label magic on an image file
  expect_error([&] { celo2::data::read_idx_images(p); }, {p, "magic", "0x00000801"});
  write_gz(p, idx_images(0x803, 10, 28, 28, 9 * 784));  // fewer bytes than the header says
  expect_error([&] { celo2::data::read_idx_images(p); }, {p, "truncated"});
  write_gz(p, idx_images(0x803, 10, 28, 28, 10 * 784 + 3));  // extra bytes
  expect_error([&] { celo2::data::read_idx_images(p); }, {p, "trailing"});
  write_gz(p, {0x00, 0x00});
  expect_error([&] { celo2::data::read_idx_images(p); }, {p, "short"});
  std::filesystem::remove(p);
}

TEST(FashionMnist, MissingFilesSayWhatToInstall) {
  const std::string dir = temp_path("nodir");
  expect_error([&] { celo2::data::load_fashion_mnist(celo2::data::Split::kTrain, 8, dir); },
               {dir, "dataset-fashion-mnist"});
}

}  // namespace
