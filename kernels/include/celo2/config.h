// The configuration of the Celo2 update rule (spec/celo2.md §1) and the MLP weights
// ("theta") it runs. Both are plain values: no I/O here (checkpoint files live in server/).
//
// Invariant kept by validate(): three momentum decays, one rms decay and three factored
// decays. The published checkpoint layout (§7) fixes those widths (channels
// 1,1,1,3,1,3,1,3,1,3,3,3,3,3), so the kernels use them as compile-time constants.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace celo2 {

inline constexpr int kMom = 3;           // K_m
inline constexpr int kRms = 1;           // K_r
inline constexpr int kFac = 3;           // K_f (must equal K_m for feature group 13)
inline constexpr int kChannels = 30;     // features of a factored (n >= 2) tensor
inline constexpr int kChannels1d = 15;   // features of a 0-d or 1-d tensor (groups 0-8)
inline constexpr int kFeatureGroups = 14;
inline constexpr int kOutputs = 3;       // direction, magnitude, unused
// Width of each feature group (spec §5), in order.
inline constexpr std::array<int, kFeatureGroups> kGroupWidth = {1, 1, 1, 3, 1, 3, 1,
                                                                3, 1, 3, 3, 3, 3, 3};

// A shape as Python prints a tuple: (), (7,), (6, 10). Used in every message about shapes.
std::string format_shape(const std::vector<int64_t>& shape);

enum class Activation { kRelu, kTanh };

struct RuleConfig {
  int ff_hidden_size = 8;
  int ff_hidden_layers = 2;
  std::array<float, kMom> mom_decays = {0.9f, 0.99f, 0.999f};
  std::array<float, kRms> rms_decays = {0.95f};
  std::array<float, kFac> fac_decays = {0.9f, 0.99f, 0.999f};
  float exp_mult = 0.0f;
  float rmsmult = 1.0f;
  bool param_scale_mult = false;
  bool precondition_output = false;
  bool normalize_input = true;
  bool normalize_output = true;
  bool aggregate_mag = false;
  bool bias_correction = false;
  Activation mlp_activation = Activation::kRelu;
  bool orthogonalize = true;  // false = Celo2-base
  std::array<float, 3> ns_coeffs = {3.4445f, -4.7750f, 2.0315f};
  int ns_iters = 5;
  float ns_eps = 1e-8f;

  // Throws std::invalid_argument naming the first bad field.
  void validate() const;
  bool operator==(const RuleConfig&) const = default;
  // Celo2-base: the same rule without Newton–Schulz.
  static RuleConfig celo2_base() {
    RuleConfig c;
    c.orthogonalize = false;
    return c;
  }
};

// One dense layer, row-major weights of shape (in, out).
struct DenseLayer {
  int in = 0, out = 0;
  std::vector<float> w;  // in * out
  std::vector<float> b;  // out
  bool operator==(const DenseLayer&) const = default;
};

// The MLP 30 -> hidden -> ... -> 3. layers[0] has in = 30 with rows in feature-channel order
// (w0__0 rows, then w0__1 rows, ...); a 1-d tensor uses its first 15 rows only.
struct Theta {
  std::vector<DenseLayer> layers;

  int hidden() const { return layers.empty() ? 0 : layers[0].out; }
  int hidden_layers() const { return static_cast<int>(layers.size()) - 1; }
  // Throws std::invalid_argument if the shapes do not fit `config`.
  void check_fits(const RuleConfig& config) const;
  // Weights that make the MLP output exactly the normalized momentum channel m̂·ρ of decay
  // 0.9 (feature channel 7) as the direction: an Adam-like direction before Newton–Schulz.
  // The constructed starting point of the project's meta-training (and the default for
  // configurations that have no meta-trained weights).
  static Theta adam_like(const RuleConfig& config);
  // The project's own meta-trained weights (written by `celo2-metatrain export-cpp`;
  // docs/METATRAIN.md) when `config` is a rule they were meta-trained with: the default Celo2
  // rule (kernels/src/project_theta.cc) or RuleConfig::celo2_base()
  // (kernels/src/project_theta_base.cc); Theta::adam_like(config) for any other configuration.
  // What an optimizer runs when it is given no weights.
  static Theta project_default(const RuleConfig& config);
  // Deterministic pseudo-random weights (tests and benchmarks).
  static Theta random(const RuleConfig& config, uint64_t seed, float scale = 0.5f);
  // All values as one vector: layer by layer, weights (row-major, in x out) then biases
  // (meta-training's parameter vector; the generated default tables).
  int64_t size() const;
  std::vector<float> values() const;
  // Overwrites the values from `v` in the order of values(); throws std::invalid_argument
  // unless n == size().
  void set_values(const float* v, size_t n);
  bool operator==(const Theta&) const = default;
};

}  // namespace celo2
