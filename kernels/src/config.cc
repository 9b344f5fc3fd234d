// RuleConfig validation and the constructed thetas (adam_like, random).
#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <stdexcept>

#include "celo2/config.h"
#include "project_theta.h"

namespace celo2 {
namespace {

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("invalid Celo2 config: " + what);
}

void check_finite(const char* name, float v) {
  if (!std::isfinite(v)) bad(std::string(name) + " is not finite");
}

}  // namespace

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

void RuleConfig::validate() const {
  if (ff_hidden_size < 1 || ff_hidden_size > 1024)
    bad("ff_hidden_size must be in [1, 1024], got " + std::to_string(ff_hidden_size));
  if (ff_hidden_layers < 1 || ff_hidden_layers > 16)
    bad("ff_hidden_layers must be in [1, 16], got " + std::to_string(ff_hidden_layers));
  for (float d : mom_decays) check_finite("mom_decays", d);
  for (float d : rms_decays) check_finite("rms_decays", d);
  for (float d : fac_decays) check_finite("fac_decays", d);
  check_finite("exp_mult", exp_mult);
  check_finite("rmsmult", rmsmult);
  for (float c : ns_coeffs) check_finite("ns_coeffs", c);
  if (ns_iters < 0 || ns_iters > 100) bad("ns_iters must be in [0, 100]");
  if (!(ns_eps >= 0.0f) || !std::isfinite(ns_eps)) bad("ns_eps must be finite and >= 0");
}

void Theta::check_fits(const RuleConfig& cfg) const {
  std::ostringstream err;
  const int L = cfg.ff_hidden_layers, H = cfg.ff_hidden_size;
  if (static_cast<int>(layers.size()) != L + 1) {
    err << "theta has " << layers.size() << " layers, config wants " << L + 1;
    throw std::invalid_argument(err.str());
  }
  for (int l = 0; l <= L; ++l) {
    const DenseLayer& d = layers[l];
    const int want_in = l == 0 ? kChannels : H;
    const int want_out = l == L ? kOutputs : H;
    if (d.in != want_in || d.out != want_out ||
        d.w.size() != static_cast<size_t>(d.in) * d.out || d.b.size() != static_cast<size_t>(d.out)) {
      err << "theta layer " << l << " is " << d.in << "x" << d.out << ", config wants "
          << want_in << "x" << want_out;
      throw std::invalid_argument(err.str());
    }
    for (float v : d.w)
      if (!std::isfinite(v)) throw std::invalid_argument("theta layer " + std::to_string(l) + " has a non-finite weight");
    for (float v : d.b)
      if (!std::isfinite(v)) throw std::invalid_argument("theta layer " + std::to_string(l) + " has a non-finite bias");
  }
  // The canary: finite weights can still be absurd (values near 1e37 pass the checks above
  // and turn every later step non-finite). Run the MLP in double on a fixed batch of
  // feature vectors of the size normalized features have (uniform in [-3, 3], all 30 channels
  // and the 15 of a 1-D tensor) and refuse weights whose outputs are non-finite, whose
  // direction exceeds 1e6 or whose magnitude exponent (mag · exp_mult) exceeds 60.
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto uniform = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return -3.0 + 6.0 * static_cast<double>(state >> 11) / static_cast<double>(1ull << 53);
  };
  for (int sample = 0; sample < 128; ++sample) {
    const int in0 = sample % 2 ? kChannels1d : kChannels;
    std::vector<double> h(kChannels, 0.0);
    for (int c = 0; c < in0; ++c) h[c] = uniform();
    for (int l = 0; l <= L; ++l) {
      const DenseLayer& d = layers[l];
      const int in = l == 0 ? in0 : d.in;
      // Row by row (w is (in, out), row-major): the same sums in the same order as a dot
      // product per output, but reading w contiguously; column by column took seconds for
      // a 1024-wide MLP (one cache miss per weight).
      std::vector<double> o(d.b.begin(), d.b.end());
      for (int c = 0; c < in; ++c) {
        const double hc = h[c];
        const float* row = d.w.data() + static_cast<size_t>(c) * d.out;
        for (int j = 0; j < d.out; ++j) o[j] += hc * row[j];
      }
      if (l < L)
        for (double& v : o)
          v = cfg.mlp_activation == Activation::kRelu ? std::max(v, 0.0) : std::tanh(v);
      h.swap(o);
    }
    const double dir = h[0], mag_exp = h[1] * cfg.exp_mult;
    if (!std::isfinite(dir) || !std::isfinite(h[1]) || std::fabs(dir) > 1e6 || mag_exp > 60.0) {
      err << "theta gives absurd outputs on the canary features (direction " << dir << ", magnitude "
          << h[1] << " x exp_mult " << cfg.exp_mult << "): refused; the weights are corrupt or "
          << "not a Celo2 MLP";
      throw std::invalid_argument(err.str());
    }
  }
}

int64_t Theta::size() const {
  int64_t n = 0;
  for (const DenseLayer& l : layers) n += static_cast<int64_t>(l.w.size() + l.b.size());
  return n;
}

std::vector<float> Theta::values() const {
  std::vector<float> v;
  v.reserve(static_cast<size_t>(size()));
  for (const DenseLayer& l : layers) {
    v.insert(v.end(), l.w.begin(), l.w.end());
    v.insert(v.end(), l.b.begin(), l.b.end());
  }
  return v;
}

void Theta::set_values(const float* v, size_t n) {
  if (static_cast<int64_t>(n) != size())
    throw std::invalid_argument("Theta::set_values: " + std::to_string(n) + " values for a theta of " +
                                std::to_string(size()));
  size_t at = 0;
  for (DenseLayer& l : layers) {
    for (float& w : l.w) w = v[at++];
    for (float& b : l.b) b = v[at++];
  }
}

Theta Theta::adam_like(const RuleConfig& cfg) {
  // relu(x) - relu(-x) = x: layer 0 puts +x and -x of channel 7 (m̂·ρ, decay 0.9) on units
  // 0 and 1, the hidden layers pass units 0 and 1 through (they are >= 0), and the output
  // direction is unit 0 minus unit 1. Magnitude and the third output stay 0.
  if (cfg.mlp_activation != Activation::kRelu)
    throw std::invalid_argument("Theta::adam_like needs mlp_activation relu");
  if (cfg.ff_hidden_size < 2) throw std::invalid_argument("Theta::adam_like needs hidden >= 2");
  const int H = cfg.ff_hidden_size, L = cfg.ff_hidden_layers;
  constexpr int kMomRhoChannel = 7;
  Theta t;
  for (int l = 0; l <= L; ++l) {
    DenseLayer d;
    d.in = l == 0 ? kChannels : H;
    d.out = l == L ? kOutputs : H;
    d.w.assign(static_cast<size_t>(d.in) * d.out, 0.0f);
    d.b.assign(d.out, 0.0f);
    if (l == 0) {
      d.w[kMomRhoChannel * d.out + 0] = 1.0f;
      d.w[kMomRhoChannel * d.out + 1] = -1.0f;
    } else if (l < L) {
      d.w[0 * d.out + 0] = 1.0f;
      d.w[1 * d.out + 1] = 1.0f;
    } else {
      d.w[0 * d.out + 0] = 1.0f;
      d.w[1 * d.out + 0] = -1.0f;
    }
    t.layers.push_back(std::move(d));
  }
  return t;
}

Theta Theta::project_default(const RuleConfig& cfg) {
  const bool base = cfg == RuleConfig::celo2_base();
  if (cfg == RuleConfig{} || base) {
    const std::vector<float>& v = base ? detail::project_theta_celo2_base() : detail::project_theta_celo2();
    Theta t = Theta::adam_like(cfg);  // the shapes of the rule
    t.set_values(v.data(), v.size());
    return t;
  }
  return adam_like(cfg);
}

Theta Theta::random(const RuleConfig& cfg, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int H = cfg.ff_hidden_size, L = cfg.ff_hidden_layers;
  Theta t;
  for (int l = 0; l <= L; ++l) {
    DenseLayer d;
    d.in = l == 0 ? kChannels : H;
    d.out = l == L ? kOutputs : H;
    const float s = scale / std::sqrt(static_cast<float>(d.in));
    for (int i = 0; i < d.in * d.out; ++i) d.w.push_back(nd(rng) * s);
    for (int i = 0; i < d.out; ++i) d.b.push_back(nd(rng) * 0.1f);
    t.layers.push_back(std::move(d));
  }
  return t;
}

}  // namespace celo2
