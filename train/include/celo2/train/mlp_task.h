// A small MLP classifier: the Fashion-MNIST task of the example trainer and an inner task of
// meta-training. Header-only.
//
// Layers are given as sizes {in, h1, ..., classes} (default 64-32-10): dense layers with ReLU
// between them, softmax cross-entropy on the logits. Parameters are named tensors in a fixed
// order, "fc1/w" (in, h1), "fc1/b" (h1), "fc2/w", "fc2/b", ...: matrices are row-major
// (in, out), as the optimizer sees them. loss_and_grad() returns the mean loss over the batch
// and leaves the gradient of that mean in grads(i).
//
// The class is a template on the arithmetic type so that the finite-difference check can run
// the very same code in double precision (tight tolerance) as well as in float32 (the type
// training uses, `MlpTask`). Inputs are always float32 features and int labels.
//
// Two implementations of each dense product: plain loops (the reference; every type) and
// single-precision BLAS (OpenBLAS sgemm; float, the fast path meta-training runs millions of
// times). tests/unit/mlp_task_test.cc checks the two against each other.
//
// Initialization is deterministic in the seed alone: Glorot uniform ±sqrt(6/(in+out)) drawn
// from std::mt19937_64 (a fixed stream) with a fixed integer-to-real conversion, biases 0;
// the double and float instances start from the same values (rounded).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <cblas.h>

#include "celo2/elementwise.h"

namespace celo2::data {

template <typename T>
class MlpTaskT {
 public:
  explicit MlpTaskT(std::vector<int> layers = {64, 32, 10}, uint64_t seed = 0)
      : layers_(std::move(layers)) {
    if (layers_.size() < 2) throw std::invalid_argument("MlpTask: need at least {in, out}");
    for (int s : layers_) {
      if (s <= 0) throw std::invalid_argument("MlpTask: layer sizes must be positive");
    }
    for (size_t l = 0; l + 1 < layers_.size(); ++l) {
      const std::string prefix = "fc" + std::to_string(l + 1);
      names_.push_back(prefix + "/w");
      shapes_.push_back({layers_[l], layers_[l + 1]});
      names_.push_back(prefix + "/b");
      shapes_.push_back({layers_[l + 1]});
    }
    for (const auto& s : shapes_) {
      int64_t n = 1;
      for (int64_t d : s) n *= d;
      params_.emplace_back(static_cast<size_t>(n), T(0));
      grads_.emplace_back(static_cast<size_t>(n), T(0));
    }
    init(seed);
  }

  // Glorot-uniform matrices, zero biases; same seed, same values.
  void init(uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (int l = 0; l < num_layers(); ++l) {
      const double limit = std::sqrt(6.0 / (layers_[l] + layers_[l + 1]));
      for (T& w : params_[2 * l]) {
        const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;  // [0, 1)
        w = static_cast<T>((2.0 * u - 1.0) * limit);
      }
      std::fill(params_[2 * l + 1].begin(), params_[2 * l + 1].end(), T(0));
    }
  }

  // float only: BLAS products (default) or the reference loops.
  void set_use_blas(bool on) { use_blas_ = on && std::is_same_v<T, float>; }
  int num_layers() const { return static_cast<int>(layers_.size()) - 1; }
  int num_tensors() const { return static_cast<int>(params_.size()); }
  int input_dim() const { return layers_.front(); }
  int num_classes() const { return layers_.back(); }
  const std::vector<int>& layers() const { return layers_; }
  const std::string& name(int i) const { return names_[i]; }
  const std::vector<int64_t>& shape(int i) const { return shapes_[i]; }
  int64_t numel(int i) const { return static_cast<int64_t>(params_[i].size()); }
  int64_t num_params() const {
    int64_t n = 0;
    for (const auto& p : params_) n += static_cast<int64_t>(p.size());
    return n;
  }
  T* params(int i) { return params_[i].data(); }
  const T* params(int i) const { return params_[i].data(); }
  const T* grads(int i) const { return grads_[i].data(); }
  T* grads(int i) { return grads_[i].data(); }

  // Mean cross-entropy over the batch; leaves d(mean loss)/d(param) in grads().
  T loss_and_grad(const float* x, const int* y, int batch) {
    const T loss = forward(x, y, batch, /*keep_probs=*/true);
    backward(batch);
    return loss;
  }

  // Mean cross-entropy without gradients (grads() unchanged).
  T loss(const float* x, const int* y, int batch) {
    return forward(x, y, batch, /*keep_probs=*/false);
  }

  // Number of examples whose argmax logit is the label, over n examples (chunked forward).
  int64_t count_correct(const float* x, const int* y, int64_t n, int chunk = 1024) {
    int64_t correct = 0;
    const int classes = num_classes();
    for (int64_t at = 0; at < n; at += chunk) {
      const int b = static_cast<int>(std::min<int64_t>(chunk, n - at));
      forward_logits(x + at * input_dim(), b);
      const std::vector<T>& z = acts_.back();
      for (int i = 0; i < b; ++i) {
        const T* row = z.data() + static_cast<size_t>(i) * classes;
        const int pred = static_cast<int>(std::max_element(row, row + classes) - row);
        if (pred == y[at + i]) ++correct;
      }
    }
    return correct;
  }
  double accuracy(const float* x, const int* y, int64_t n) {
    return n == 0 ? 0.0 : static_cast<double>(count_correct(x, y, n)) / static_cast<double>(n);
  }

 private:
  // act(0) = input (float: the caller's x itself, read until backward returns; double: a
  // converted copy in acts_[0]), acts_[l] = ReLU output of layer l (l < L), acts_[L] = logits.
  const T* act(int l) const { return l == 0 && in_ ? in_ : acts_[l].data(); }
  void forward_logits(const float* x, int batch) {
    if (batch <= 0) throw std::invalid_argument("MlpTask: batch must be positive");
    const int L = num_layers();
    acts_.resize(L + 1);
    if constexpr (std::is_same_v<T, float>) {
      in_ = x;
    } else {
      acts_[0].assign(x, x + static_cast<size_t>(batch) * layers_[0]);
    }
    for (int l = 0; l < L; ++l) {
      const int in = layers_[l], out = layers_[l + 1];
      const T* a = act(l);
      const T* w = params_[2 * l].data();
      const T* bias = params_[2 * l + 1].data();
      std::vector<T>& z = acts_[l + 1];
      z.resize(static_cast<size_t>(batch) * out);
      if constexpr (std::is_same_v<T, float>) {
        if (use_blas_) {
          for (int b = 0; b < batch; ++b) std::copy(bias, bias + out, z.data() + static_cast<size_t>(b) * out);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, batch, out, in, 1.0f, a, in,
                      w, out, 1.0f, z.data(), out);
          if (l + 1 < L) {
            for (float& v : z) v = std::max(v, 0.0f);
          }
          continue;
        }
      }
      for (int b = 0; b < batch; ++b) {
        T* zr = z.data() + static_cast<size_t>(b) * out;
        std::copy(bias, bias + out, zr);
        const T* ar = a + static_cast<size_t>(b) * in;
        for (int i = 0; i < in; ++i) {
          const T ai = ar[i];
          if (ai == T(0)) continue;  // ReLU zeros and blank pixels: common, exact to skip
          const T* wr = w + static_cast<size_t>(i) * out;
          for (int o = 0; o < out; ++o) zr[o] += ai * wr[o];
        }
        if (l + 1 < L) {
          for (int o = 0; o < out; ++o) zr[o] = std::max(zr[o], T(0));
        }
      }
    }
  }

  T forward(const float* x, const int* y, int batch, bool keep_probs) {
    forward_logits(x, batch);
    const int classes = num_classes();
    std::vector<T>& z = acts_.back();
    if (keep_probs) dlogits_.resize(z.size());
    double total = 0.0;
    for (int b = 0; b < batch; ++b) {
      if (y[b] < 0 || y[b] >= classes) {
        throw std::invalid_argument("MlpTask: label " + std::to_string(y[b]) + " outside 0.." +
                                    std::to_string(classes - 1));
      }
      const T* zr = z.data() + static_cast<size_t>(b) * classes;
      const T m = *std::max_element(zr, zr + classes);
      // e = exp(z - max) once per logit (float: the rule's vectorizable exp, within 1 ulp).
      ex_.resize(static_cast<size_t>(classes));
      for (int c = 0; c < classes; ++c) {
        if constexpr (std::is_same_v<T, float>)
          ex_[c] = ew::exp_fast(zr[c] - m);
        else
          ex_[c] = std::exp(zr[c] - m);
      }
      T sum = 0;
      for (int c = 0; c < classes; ++c) sum += ex_[c];
      const T lse = m + std::log(sum);
      total += static_cast<double>(lse - zr[y[b]]);
      if (keep_probs) {
        // d(mean loss)/d(logits) = (softmax - onehot) / batch, softmax = e / sum.
        T* dr = dlogits_.data() + static_cast<size_t>(b) * classes;
        const T scale = T(1) / (sum * T(batch));
        for (int c = 0; c < classes; ++c) dr[c] = ex_[c] * scale;
        dr[y[b]] -= T(1) / T(batch);
      }
    }
    return static_cast<T>(total / batch);
  }

  void backward(int batch) {
    const int L = num_layers();
    // dz: the gradient w.r.t. the pre-activation of layer l (members: no allocation per step)
    std::vector<T>& dz = dz_;
    std::vector<T>& da = da_;
    dz.assign(dlogits_.begin(), dlogits_.end());
    for (int l = L - 1; l >= 0; --l) {
      const int in = layers_[l], out = layers_[l + 1];
      const T* a = act(l);
      T* gw = grads_[2 * l].data();
      T* gb = grads_[2 * l + 1].data();
      std::fill(grads_[2 * l].begin(), grads_[2 * l].end(), T(0));
      std::fill(grads_[2 * l + 1].begin(), grads_[2 * l + 1].end(), T(0));
      if constexpr (std::is_same_v<T, float>) {
        if (use_blas_) {
          for (int b = 0; b < batch; ++b) {
            const float* dzr = dz.data() + static_cast<size_t>(b) * out;
            for (int o = 0; o < out; ++o) gb[o] += dzr[o];
          }
          // gW (in x out) = A^T (in x batch) dZ (batch x out)
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, in, out, batch, 1.0f, a, in,
                      dz.data(), out, 0.0f, gw, out);
          if (l == 0) break;
          // dA (batch x in) = dZ (batch x out) W^T, then through the ReLU.
          da.resize(static_cast<size_t>(batch) * in);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, batch, in, out, 1.0f, dz.data(), out,
                      params_[2 * l].data(), out, 0.0f, da.data(), in);
          for (size_t k = 0; k < da.size(); ++k) {
            if (a[k] <= 0.0f) da[k] = 0.0f;
          }
          dz.swap(da);
          continue;
        }
      }
      for (int b = 0; b < batch; ++b) {
        const T* dzr = dz.data() + static_cast<size_t>(b) * out;
        const T* ar = a + static_cast<size_t>(b) * in;
        for (int o = 0; o < out; ++o) gb[o] += dzr[o];
        for (int i = 0; i < in; ++i) {
          const T ai = ar[i];
          if (ai == T(0)) continue;
          T* gwr = gw + static_cast<size_t>(i) * out;
          for (int o = 0; o < out; ++o) gwr[o] += ai * dzr[o];
        }
      }
      if (l == 0) break;  // no gradient w.r.t. the input
      // da = dz W^T, then through the ReLU: acts_[l] > 0 exactly where the unit was active.
      const T* w = params_[2 * l].data();
      da.assign(static_cast<size_t>(batch) * in, T(0));
      for (int b = 0; b < batch; ++b) {
        const T* dzr = dz.data() + static_cast<size_t>(b) * out;
        const T* ar = a + static_cast<size_t>(b) * in;
        T* dar = da.data() + static_cast<size_t>(b) * in;
        for (int i = 0; i < in; ++i) {
          if (ar[i] <= T(0)) continue;
          const T* wr = w + static_cast<size_t>(i) * out;
          T acc = 0;
          for (int o = 0; o < out; ++o) acc += dzr[o] * wr[o];
          dar[i] = acc;
        }
      }
      dz.swap(da);
    }
  }

  bool use_blas_ = std::is_same_v<T, float>;
  std::vector<int> layers_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<std::vector<T>> params_, grads_;
  std::vector<std::vector<T>> acts_;
  const T* in_ = nullptr;  // float: the current batch's input (act(0))
  std::vector<T> dlogits_;
  std::vector<T> ex_;  // one row of exp(z - max)
  std::vector<T> dz_, da_;
};

using MlpTask = MlpTaskT<float>;

// Finite-difference check of loss_and_grad(): central differences (L(p+h) - L(p-h)) / 2h on
// up to `per_tensor` coordinates of every tensor (all of them when the tensor is smaller;
// otherwise a spread-out subset). The error of one coordinate is
// |fd - analytic| / max(|fd|, |analytic|, floor): relative for gradients above `floor`,
// absolute (scaled by 1/floor) below it. Parameters are restored exactly.
struct GradCheckResult {
  double max_error = 0.0;  // the largest error as defined above
  double max_abs_diff = 0.0;
  int64_t checked = 0;
  std::string worst;  // "fc1/w[17]: fd=... analytic=..."
};

template <typename T>
GradCheckResult gradient_check(MlpTaskT<T>& task, const float* x, const int* y, int batch, double h,
                               double floor, int per_tensor = 64) {
  task.loss_and_grad(x, y, batch);
  GradCheckResult r;
  for (int t = 0; t < task.num_tensors(); ++t) {
    const int64_t n = task.numel(t);
    const std::vector<T> analytic(task.grads(t), task.grads(t) + n);
    const int64_t count = std::min<int64_t>(n, per_tensor);
    // Visit k * stride mod n with stride coprime to n: distinct coordinates that move through
    // rows and columns alike (a stride dividing the row length would stay in one column).
    int64_t stride = std::max<int64_t>(1, n / count);
    while (std::gcd(stride, n) != 1) ++stride;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = (k * stride) % n;
      T* p = task.params(t) + i;
      const T saved = *p;
      *p = static_cast<T>(saved + h);
      const double up = static_cast<double>(task.loss(x, y, batch));
      *p = static_cast<T>(saved - h);
      const double down = static_cast<double>(task.loss(x, y, batch));
      *p = saved;
      // Divide by the step actually taken (saved ± h rounds in float).
      const double step = static_cast<double>(static_cast<T>(saved + h)) -
                          static_cast<double>(static_cast<T>(saved - h));
      const double fd = (up - down) / step;
      const double an = static_cast<double>(analytic[i]);
      const double diff = std::abs(fd - an);
      const double err = diff / std::max({std::abs(fd), std::abs(an), floor});
      ++r.checked;
      r.max_abs_diff = std::max(r.max_abs_diff, diff);
      if (err > r.max_error) {
        r.max_error = err;
        r.worst = task.name(t) + "[" + std::to_string(i) + "]: fd=" + std::to_string(fd) +
                  " analytic=" + std::to_string(an);
      }
    }
  }
  return r;
}

}  // namespace celo2::data
