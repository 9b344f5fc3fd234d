// Learning-rate schedules of the recipe. `t` counts updates from 0: the first update uses
// lr(0) (spec/celo2.md §4).
//   constant:      lr
//   linear:        lr -> lr*final_frac linearly over total_steps (then held)
//   cosine:        linear warmup lr·(t+1)/warmup for t < warmup, then cosine to lr*final_frac at
//                  total_steps (then held)
//   wsd:           warmup, stable at lr, then a linear decay to lr*final_frac over the last
//                  decay_steps of total_steps (warmup-stable-decay)
// Text form: "constant:lr=1e-3", "cosine:lr=3e-3,warmup=100,total=10000,final=0.1",
// "linear:lr=1e-3,total=1000,final=0", "wsd:lr=1e-3,warmup=100,total=10000,decay=2000,final=0".
#pragma once

#include <cstdint>
#include <string>

namespace celo2 {

struct Schedule {
  enum class Kind { kConstant, kLinear, kCosine, kWsd };
  Kind kind = Kind::kConstant;
  double lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;
  int64_t decay_steps = 0;
  double final_frac = 0.0;

  double at(int64_t t) const;
  void validate() const;  // throws std::invalid_argument naming the field
  static Schedule parse(const std::string& text);  // throws std::invalid_argument
  std::string to_string() const;
  static Schedule constant(double lr) { Schedule s; s.lr = lr; return s; }
};

}  // namespace celo2
