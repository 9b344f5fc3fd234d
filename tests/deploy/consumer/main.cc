// The consumer of an installed celo2: one celo2::Optimizer on a 4x4 weight matrix, one
// step, a checksum of the parameters. Prints "consumer ok checksum X step N".
#include <cmath>
#include <cstdio>
#include <vector>

#include "celo2/optimizer.h"

int main() {
  std::vector<float> w(16), g(16);
  for (int i = 0; i < 16; ++i) {
    w[i] = 0.1f * static_cast<float>(i % 5) - 0.2f;
    g[i] = 0.05f * static_cast<float>((i * 7) % 11) - 0.25f;
  }
  celo2::OptimizerOptions opts;
  celo2::Optimizer opt(opts);
  opt.add_tensor("layer0/kernel", {4, 4}, w.data(), g.data());
  const celo2::StepReport r = opt.step_with_lr(1e-2);
  double sum = 0.0, before = 0.0;
  for (int i = 0; i < 16; ++i) {
    sum += w[i];
    before += 0.1f * static_cast<float>(i % 5) - 0.2f;
  }
  if (!std::isfinite(sum) || r.step != 1 || sum == before) {
    std::printf("consumer FAILED checksum %.9g step %lld\n", sum, static_cast<long long>(r.step));
    return 1;
  }
  std::printf("consumer ok checksum %.9g step %lld label %d\n", sum,
              static_cast<long long>(r.step), static_cast<int>(opt.label_of(0)));
  return 0;
}
