// Persistent evolution strategies (Vicol, Metz, Sohl-Dickstein 2021) for Celo2's theta.
//
// One estimator holds `tasks` inner runs. Each inner run is a *pair* of particles — the same
// task, the same initial weights, the same batches — trained with theta + ε and theta − ε
// (antithetic). Per outer step every pair:
//   1. draws ε ~ N(0, σ² I) over theta's flat vector, accumulates ξ += ε;
//   2. runs a truncation of `truncation` inner steps on each particle;
//   3. reports the meta-loss of each particle: the mean over the truncation of the inner
//      training loss (the batch loss before each update), clipped to [0, 1.5·ln 10] with
//      NaN counted as the maximum (the image-MLP normalizer of the original);
//   4. when its unroll length is reached, starts a new inner run (new task, initial
//      weights, reparameterization scale and unroll length) and resets ξ = 0.
// The estimate is  ĝ = Σ_pairs ξ (L⁺ − L⁻) / (2 σ² · tasks)  — summed over ranks when the
// pairs are spread over MPI ranks (pair i lives on rank i mod W).
//
// The inner update is the recipe of the original meta-training: matrices p − lr·step with
// the Celo2 step (lr 1e-3), biases (label rule "/b$") AdamW at 20·lr = 0.02. Two ways to run
// it (tests/unit/metatrain_test.cc, BatchedEqualsUnbatched):
//  - batched (default, PesConfig::batched): one celo2::OptimizerBatch holds every particle
//    of the rank (both members of each pair); all pairs advance in lockstep, one inner step
//    at a time, and one OptimizerBatch::step() updates every particle (the rule of all
//    particles' tensors in one call, the Newton–Schulz of all their matrices of one shape in
//    one newton_schulz_batch call); bit for bit the unbatched floats with
//    NsBatch::kPerMatrix, to float rounding with the default kBatched;
//  - unbatched: one celo2::Optimizer per particle, stepped alone (InnerPair::run).
//
// Reparameterization augmentation: with probability `reparam_prob` an inner run draws one
// global scale s log-uniformly from [reparam_lo, reparam_hi]; its parameters are stored as
// w = p₀ / s and the loss is computed with w·s (the gradient w.r.t. w is s·∂L/∂p).
//
// Unroll lengths are log-uniform in [unroll_min, unroll_max], rounded up to a whole number
// of truncations so that an inner run ends at a truncation boundary.
//
// Determinism: every pair draws from its own generator seeded by (seed, task index,
// generation), so an estimate does not depend on the number of ranks except through the
// order of the final floating-point sum.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "celo2/config.h"
#include "celo2/metatrain/tasks.h"
#include "celo2/optimizer.h"
#include "celo2/optimizer_batch.h"
#include "celo2/train/mlp_task.h"

namespace celo2::meta {

// Theta <-> the flat parameter vector of meta-training: Theta::values / set_values.

inline double meta_loss_max() { return 1.5 * 2.302585092994046; }  // 1.5·ln 10
// clip(loss, 0, 1.5·ln 10), NaN and ±inf -> the maximum.
double normalize_meta_loss(double loss);

struct InnerConfig {
  std::vector<int> layers = {64, 32, 10};
  int batch = 64;
  double lr = 1e-3;       // matrices: p − lr·step
  double mult_1d = 20.0;  // biases: AdamW at mult_1d·lr
  RuleConfig rule;        // Celo2 (orthogonalize) or Celo2-base
  double reparam_prob = 0.25;
  double reparam_lo = 1e-3, reparam_hi = 1e3;
  int unroll_min = 100, unroll_max = 2000;
  int truncation = 50;
};

// The single-process optimizer options of an inner particle (the recipe above).
OptimizerOptions inner_options(const InnerConfig& cfg, const Theta& theta);
// An OptimizerBatch with the inner MLP's tensor layout and no members yet.
std::unique_ptr<OptimizerBatch> make_inner_batch(const InnerConfig& cfg, const Theta& theta);

// Two particles of one inner run.
class InnerPair {
 public:
  // batch == nullptr: each particle owns a celo2::Optimizer. Otherwise the particles are two
  // members of *batch (added at the first reset), which the caller steps (see step_grads).
  InnerPair(const InnerConfig& cfg, const TaskFamily& family, uint64_t seed,
            OptimizerBatch* batch = nullptr);
  // Starts a new inner run (called by the constructor and when the unroll ends).
  void reset(const Theta& theta_shape);
  // One truncation: `steps` updates of each particle. Returns the meta-losses (L⁺, L⁻).
  // Unbatched pairs only.
  std::pair<double, double> run(const Theta& plus, const Theta& minus, int steps);
  // The pieces of run() for a caller that steps a batch: the thetas of a truncation; one
  // inner step's batch, losses (L⁺, L⁻ before the update, raw) and gradients; after the
  // optimizers have stepped, advance() counts the step.
  void set_thetas(const Theta& plus, const Theta& minus);
  std::pair<double, double> step_grads();
  void advance() { ++step_; }
  bool finished() const { return step_ >= unroll_; }
  int64_t step() const { return step_; }
  int64_t unroll() const { return unroll_; }
  double scale() const { return scale_; }
  const std::string& task_name() const { return task_name_; }
  Normal& rng() { return rng_; }
  int64_t generation() const { return generation_; }

 private:
  struct Particle {
    data::MlpTask model;
    std::vector<std::vector<float>> w, gw;  // stored parameters and their gradients
    std::unique_ptr<Optimizer> opt;         // unbatched
    int member = -1;                        // batched: the member of batch_
    explicit Particle(const std::vector<int>& layers) : model(layers, 0) {}
  };
  double particle_grad(Particle& p, const float* x, const int* y);
  void make_particle(Particle& p, const Theta& theta_shape, uint64_t init_seed);

  InnerConfig cfg_;
  const TaskFamily* family_;
  OptimizerBatch* batch_ = nullptr;
  uint64_t seed_;
  Normal rng_;
  int64_t generation_ = 0;
  std::unique_ptr<Particle> plus_, minus_;
  std::shared_ptr<const data::Dataset> data_;
  std::unique_ptr<data::BatchSampler> sampler_;
  std::vector<float> x_;
  std::vector<int> y_;
  std::string task_name_;
  double scale_ = 1.0;
  int64_t step_ = 0, unroll_ = 0;
};

struct PesConfig {
  int tasks = 8;
  double sigma = 0.01;
  uint64_t seed = 0;
  // One OptimizerBatch for the rank's particles; its Newton–Schulz: kBatched (small-matrix
  // kernels, the estimate agrees with the unbatched one to float rounding) or kPerMatrix (BLAS
  // per matrix: the unbatched estimate bit for bit).
  bool batched = true;
  NsBatch ns_batch = NsBatch::kBatched;
  // Run estimate() with subnormal floats flushed to zero (x86 MXCSR FTZ + DAZ, restored on
  // return; TensorFlow's executors and torch.set_flush_denormal do the same). The inner tasks'
  // optimizer state decays into subnormals (momenta of weights whose gradient stays zero), and
  // each subnormal operand costs a microcode assist: measured 85 -> 69 us per particle step.
  bool flush_denormals = true;
  InnerConfig inner;
};

struct PesStats {
  double loss_sum = 0.0;     // Σ over this rank's pairs of (L⁺ + L⁻)/2
  double pairs = 0.0;        // pairs estimated on this rank
  double resets = 0.0;       // inner runs that ended this step
  double inner_steps = 0.0;  // particle updates this step
};

// The estimator's part on one rank: the pairs i ≡ rank (mod world).
class PesEstimator {
 public:
  PesEstimator(const PesConfig& cfg, const TaskFamily& family, const Theta& theta_shape,
               int rank, int world);
  // Adds this rank's Σ ξ (L⁺ − L⁻) / (2σ²·tasks) into grad (Theta::size() floats, as doubles)
  // and returns the rank's statistics.
  PesStats estimate(const std::vector<float>& theta, std::vector<double>& grad);
  int local_pairs() const { return static_cast<int>(pairs_.size()); }
  const InnerPair& pair(int i) const { return *pairs_[i]; }
  InnerPair& pair(int i) { return *pairs_[i]; }

 private:
  PesConfig cfg_;
  Theta shape_;
  std::unique_ptr<OptimizerBatch> batch_;  // batched: every particle of the rank
  std::vector<std::unique_ptr<InnerPair>> pairs_;
  std::vector<std::vector<float>> xi_;
  Theta plus_, minus_;
  std::vector<float> eps_, tp_, tm_;
  std::vector<double> lp_, lm_;
};

// Outer optimizer: AdamW with Optax semantics (decoupled weight decay).
struct OuterAdamW {
  double lr = 5e-5, b1 = 0.9, b2 = 0.999, eps = 1e-8, weight_decay = 1e-4;
  std::vector<double> m, v;
  int64_t t = 0;
  void step(std::vector<float>& theta, const std::vector<double>& grad);
};

}  // namespace celo2::meta
