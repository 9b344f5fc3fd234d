#include "celo2/train/fashion_mnist.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "celo2/params.h"

namespace celo2::data {
namespace {

constexpr uint32_t kIdxImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
// No real IDX file in this project is larger; a bigger header count means a corrupt file,
// and refusing it early avoids a huge allocation.
constexpr int64_t kMaxIdxBytes = int64_t{1} << 32;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// Checks the header of an IDX file and returns its dimensions; the payload must be exactly
// the product of the dimensions (no truncation, no trailing bytes).
std::vector<int64_t> idx_dims(const std::string& path, const std::vector<uint8_t>& bytes,
                              uint32_t magic, const char* kind) {
  if (bytes.size() < 4)
    fail(path, "too short for an IDX header (" + std::to_string(bytes.size()) + " bytes)");
  const uint32_t got = be32(bytes.data());
  if (got != magic) {
    fail(path,
         "bad magic number " + hex32(got) + " (an IDX " + kind + " file has " + hex32(magic) + ")");
  }
  const int ndim = static_cast<int>(magic & 0xff);
  const size_t header = 4 + 4 * static_cast<size_t>(ndim);
  if (bytes.size() < header) {
    fail(path, "truncated IDX header (" + std::to_string(bytes.size()) + " bytes, need " +
                   std::to_string(header) + ")");
  }
  std::vector<int64_t> dims(ndim);
  int64_t payload = 1;
  for (int d = 0; d < ndim; ++d) {
    dims[d] = be32(bytes.data() + 4 + 4 * d);
    payload *= dims[d];
    if (payload > kMaxIdxBytes) fail(path, "implausible IDX dimensions");
  }
  const int64_t have = static_cast<int64_t>(bytes.size() - header);
  if (have < payload) {
    fail(path, "truncated: header promises " + std::to_string(payload) + " data bytes, file has " +
                   std::to_string(have));
  }
  if (have > payload) {
    fail(path, std::to_string(have - payload) + " unexpected trailing bytes after " +
                   std::to_string(payload) + " data bytes");
  }
  return dims;
}

// Per-output-pixel weights of one axis: weights[o * src + i] is the fraction of output cell
// o's extent [o*s, (o+1)*s) that source pixel [i, i+1) covers, divided by s (rows sum to 1).
std::vector<double> area_weights(int src, int dst) {
  std::vector<double> w(static_cast<size_t>(src) * dst, 0.0);
  const double s = static_cast<double>(src) / dst;
  for (int o = 0; o < dst; ++o) {
    const double lo = o * s, hi = (o + 1) * s;
    for (int i = 0; i < src; ++i) {
      const double overlap = std::min<double>(hi, i + 1) - std::max<double>(lo, i);
      if (overlap > 0) w[static_cast<size_t>(o) * src + i] = overlap / s;
    }
  }
  return w;
}

}  // namespace

std::vector<uint8_t> read_gz_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail(path, "no such file");
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) fail(path, std::string("cannot open: ") + std::strerror(errno));
  gzbuffer(f, 1 << 20);
  std::vector<uint8_t> out;
  constexpr unsigned kChunk = 1 << 20;
  std::string error;
  for (;;) {
    const size_t at = out.size();
    out.resize(at + kChunk);
    const int got = gzread(f, out.data() + at, kChunk);
    int errnum = Z_OK;
    const char* msg = gzerror(f, &errnum);
    if (got < 0 || (errnum != Z_OK && errnum != Z_STREAM_END)) {
      error = std::string("gzip read error: ") + (msg ? msg : "unknown") +
              " (corrupt or truncated file?)";
      out.resize(at);
      break;
    }
    out.resize(at + static_cast<size_t>(got));
    if (got == 0) break;
    if (static_cast<int64_t>(out.size()) > kMaxIdxBytes) {
      error = "decompressed size exceeds " + std::to_string(kMaxIdxBytes) + " bytes";
      break;
    }
  }
  // gzclose reports a stream that ended in the middle of a gzip member (Z_BUF_ERROR).
  const int rc = gzclose(f);
  if (!error.empty()) fail(path, error);
  if (rc == Z_BUF_ERROR) fail(path, "gzip stream ends early (truncated file)");
  if (rc != Z_OK) fail(path, "gzip close error " + std::to_string(rc));
  return out;
}

IdxImages read_idx_images(const std::string& path) {
  std::vector<uint8_t> bytes = read_gz_file(path);
  const std::vector<int64_t> dims = idx_dims(path, bytes, kIdxImagesMagic, "image");
  if (dims[1] <= 0 || dims[2] <= 0 || dims[1] > 4096 || dims[2] > 4096) {
    fail(path, "bad image size " + std::to_string(dims[1]) + "x" + std::to_string(dims[2]));
  }
  IdxImages im;
  im.count = dims[0];
  im.rows = static_cast<int>(dims[1]);
  im.cols = static_cast<int>(dims[2]);
  im.pixels.assign(bytes.begin() + 16, bytes.end());
  return im;
}

std::vector<uint8_t> read_idx_labels(const std::string& path) {
  std::vector<uint8_t> bytes = read_gz_file(path);
  idx_dims(path, bytes, kIdxLabelsMagic, "label");
  return std::vector<uint8_t>(bytes.begin() + 8, bytes.end());
}

void downsample_area(const uint8_t* src, int src_side, float* dst, int dst_side) {
  if (src_side <= 0 || dst_side <= 0 || dst_side > src_side) {
    throw std::invalid_argument("downsample_area: need 0 < dst_side <= src_side, got " +
                                std::to_string(src_side) + " -> " + std::to_string(dst_side));
  }
  // Separable: the 2-d cell weight is the product of the per-axis weights (the table is
  // 8 x 28 numbers; rebuilding it per image costs less than the image itself).
  const std::vector<double> w = area_weights(src_side, dst_side);
  std::vector<double> rows(static_cast<size_t>(dst_side) * src_side);  // (dst row, src col)
  for (int o = 0; o < dst_side; ++o) {
    for (int j = 0; j < src_side; ++j) {
      double acc = 0.0;
      for (int i = 0; i < src_side; ++i) {
        const double wi = w[static_cast<size_t>(o) * src_side + i];
        if (wi != 0.0) acc += wi * src[static_cast<size_t>(i) * src_side + j];
      }
      rows[static_cast<size_t>(o) * src_side + j] = acc;
    }
  }
  for (int o = 0; o < dst_side; ++o) {
    for (int p = 0; p < dst_side; ++p) {
      double acc = 0.0;
      for (int j = 0; j < src_side; ++j) {
        const double wj = w[static_cast<size_t>(p) * src_side + j];
        if (wj != 0.0) acc += wj * rows[static_cast<size_t>(o) * src_side + j];
      }
      dst[static_cast<size_t>(o) * dst_side + p] = static_cast<float>(acc / 255.0);
    }
  }
}

const char* split_name(Split s) { return s == Split::kTrain ? "train" : "t10k"; }

std::string fashion_mnist_dir() { return param::fashion_mnist_dir(); }

Dataset load_fashion_mnist(Split split, int side, const std::string& dir_in) {
  if (side < 1 || side > kFashionMnistSide) {
    throw std::invalid_argument("load_fashion_mnist: side must be in 1..28, got " +
                                std::to_string(side));
  }
  const std::string dir = dir_in.empty() ? fashion_mnist_dir() : dir_in;
  const std::string prefix = dir + "/" + split_name(split);
  const std::string images_path = prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = prefix + "-labels-idx1-ubyte.gz";
  for (const std::string& p : {images_path, labels_path}) {
    std::error_code ec;
    if (!std::filesystem::exists(p, ec)) {
      throw std::runtime_error(
          "Fashion-MNIST file " + p +
          " not found: install the Debian package dataset-fashion-mnist "
          "(apt-get install dataset-fashion-mnist) or set CELO2_FASHION_MNIST_DIR to a "
          "directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz");
    }
  }
  const IdxImages im = read_idx_images(images_path);
  const std::vector<uint8_t> labels = read_idx_labels(labels_path);
  if (im.rows != kFashionMnistSide || im.cols != kFashionMnistSide) {
    fail(images_path,
         "expected 28x28 images, found " + std::to_string(im.rows) + "x" + std::to_string(im.cols));
  }
  if (static_cast<int64_t>(labels.size()) != im.count) {
    fail(labels_path, std::to_string(labels.size()) + " labels for " + std::to_string(im.count) +
                          " images in " + images_path);
  }
  Dataset ds;
  ds.n = im.count;
  ds.dim = side * side;
  ds.x.resize(static_cast<size_t>(ds.n) * ds.dim);
  ds.y.resize(static_cast<size_t>(ds.n));
  const size_t image_bytes = static_cast<size_t>(im.rows) * im.cols;
  for (int64_t i = 0; i < ds.n; ++i) {
    const uint8_t* src = im.pixels.data() + static_cast<size_t>(i) * image_bytes;
    float* dst = ds.x.data() + static_cast<size_t>(i) * ds.dim;
    if (side == kFashionMnistSide) {
      for (size_t k = 0; k < image_bytes; ++k) dst[k] = static_cast<float>(src[k] / 255.0);
    } else {
      downsample_area(src, kFashionMnistSide, dst, side);
    }
    if (labels[i] >= kFashionMnistClasses) {
      fail(labels_path, "label " + std::to_string(labels[i]) + " at index " + std::to_string(i) +
                            " is outside 0..9");
    }
    ds.y[i] = labels[i];
  }
  return ds;
}

BatchSampler::BatchSampler(int64_t n, int batch, uint64_t seed) : n_(n), batch_(batch), rng_(seed) {
  if (n <= 0) throw std::invalid_argument("BatchSampler: empty dataset");
  if (batch <= 0) throw std::invalid_argument("BatchSampler: batch must be positive");
  perm_.resize(static_cast<size_t>(n));
  out_.resize(static_cast<size_t>(batch));
  reshuffle();
}

uint64_t BatchSampler::below(uint64_t bound) {
  // Rejection: discard the top partial range so every residue is equally likely.
  // Deterministic given the mt19937_64 stream.
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % bound);
  uint64_t r;
  do {
    r = rng_();
  } while (r >= limit);
  return r % bound;
}

void BatchSampler::reshuffle() {
  for (int64_t i = 0; i < n_; ++i) perm_[i] = i;
  for (int64_t i = n_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(below(static_cast<uint64_t>(i) + 1));
    std::swap(perm_[i], perm_[j]);
  }
  pos_ = 0;
}

const std::vector<int64_t>& BatchSampler::next_indices() {
  for (int b = 0; b < batch_; ++b) {
    if (pos_ == n_) {
      reshuffle();
      ++epoch_;
    }
    out_[b] = perm_[pos_++];
  }
  return out_;
}

void BatchSampler::next(const Dataset& ds, float* x, int* y) {
  if (ds.n != n_) {
    throw std::invalid_argument("BatchSampler: built for " + std::to_string(n_) +
                                " examples, dataset has " + std::to_string(ds.n));
  }
  const std::vector<int64_t>& idx = next_indices();
  for (int b = 0; b < batch_; ++b) {
    std::memcpy(x + static_cast<size_t>(b) * ds.dim, ds.row(idx[b]), sizeof(float) * ds.dim);
    y[b] = ds.y[idx[b]];
  }
}

}  // namespace celo2::data
