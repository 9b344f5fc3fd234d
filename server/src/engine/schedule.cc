// Learning-rate schedules (see schedule.h for the formulas and the text form).
#include "celo2/schedule.h"

#include <cmath>
#include <map>
#include <numbers>
#include <sstream>
#include <stdexcept>

namespace celo2 {

double Schedule::at(int64_t t) const {
  if (t < 0) t = 0;
  const double final_lr = lr * final_frac;
  switch (kind) {
    case Kind::kConstant:
      return lr;
    case Kind::kLinear: {
      if (total_steps <= 0 || t >= total_steps) return total_steps <= 0 ? lr : final_lr;
      const double x = static_cast<double>(t) / static_cast<double>(total_steps);
      return lr + (final_lr - lr) * x;
    }
    case Kind::kCosine: {
      if (t < warmup_steps) return lr * static_cast<double>(t + 1) / static_cast<double>(warmup_steps);
      const int64_t span = total_steps - warmup_steps;
      if (span <= 0 || t >= total_steps) return final_lr;
      const double x = static_cast<double>(t - warmup_steps) / static_cast<double>(span);
      return final_lr + (lr - final_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * x));
    }
    case Kind::kWsd: {
      if (t < warmup_steps) return lr * static_cast<double>(t + 1) / static_cast<double>(warmup_steps);
      const int64_t decay_start = total_steps - decay_steps;
      if (t < decay_start) return lr;
      if (t >= total_steps || decay_steps <= 0) return final_lr;
      const double x = static_cast<double>(t - decay_start) / static_cast<double>(decay_steps);
      return lr + (final_lr - lr) * x;
    }
  }
  return lr;
}

void Schedule::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument("invalid schedule: " + m); };
  if (!std::isfinite(lr) || lr < 0 || lr > 1e3) bad("lr must be finite and in [0, 1000]");
  if (!std::isfinite(final_frac) || final_frac < 0 || final_frac > 1e3)
    bad("final must be finite and in [0, 1000]");
  if (warmup_steps < 0 || total_steps < 0 || decay_steps < 0) bad("step counts must be >= 0");
  if (kind == Kind::kCosine || kind == Kind::kWsd) {
    if (total_steps <= 0) bad("total must be > 0");
    if (warmup_steps > total_steps) bad("warmup must be <= total");
  }
  if (kind == Kind::kLinear && total_steps <= 0) bad("total must be > 0");
  if (kind == Kind::kWsd && warmup_steps + decay_steps > total_steps)
    bad("warmup + decay must be <= total");
}

Schedule Schedule::parse(const std::string& text) {
  Schedule s;
  const auto colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  if (kind == "constant") s.kind = Kind::kConstant;
  else if (kind == "linear") s.kind = Kind::kLinear;
  else if (kind == "cosine") s.kind = Kind::kCosine;
  else if (kind == "wsd") s.kind = Kind::kWsd;
  else
    throw std::invalid_argument("unknown schedule '" + kind +
                                "' (expected constant, linear, cosine or wsd)");
  if (colon != std::string::npos) {
    std::stringstream ss(text.substr(colon + 1));
    std::string kv;
    while (std::getline(ss, kv, ',')) {
      if (kv.empty()) continue;
      const auto eq = kv.find('=');
      if (eq == std::string::npos)
        throw std::invalid_argument("schedule field '" + kv + "' is not key=value");
      const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
      double x;
      try {
        size_t used = 0;
        x = std::stod(v, &used);
        if (used != v.size()) throw std::invalid_argument(v);
      } catch (const std::exception&) {
        throw std::invalid_argument("schedule field '" + k + "': '" + v + "' is not a number");
      }
      auto as_steps = [&]() {
        if (!(x >= 0 && x < 1e15) || x != std::floor(x))
          throw std::invalid_argument("schedule field '" + k + "' must be a whole number >= 0");
        return static_cast<int64_t>(x);
      };
      if (k == "lr") s.lr = x;
      else if (k == "warmup") s.warmup_steps = as_steps();
      else if (k == "total") s.total_steps = as_steps();
      else if (k == "decay") s.decay_steps = as_steps();
      else if (k == "final") s.final_frac = x;
      else throw std::invalid_argument("unknown schedule field '" + k + "'");
    }
  }
  s.validate();
  return s;
}

std::string Schedule::to_string() const {
  std::ostringstream s;
  s.precision(6);
  switch (kind) {
    case Kind::kConstant: s << "constant:lr=" << lr; break;
    case Kind::kLinear: s << "linear:lr=" << lr << ",total=" << total_steps << ",final=" << final_frac; break;
    case Kind::kCosine:
      s << "cosine:lr=" << lr << ",warmup=" << warmup_steps << ",total=" << total_steps
        << ",final=" << final_frac;
      break;
    case Kind::kWsd:
      s << "wsd:lr=" << lr << ",warmup=" << warmup_steps << ",total=" << total_steps
        << ",decay=" << decay_steps << ",final=" << final_frac;
      break;
  }
  return s.str();
}

}  // namespace celo2
