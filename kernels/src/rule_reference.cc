// The reference Celo2 rule: spec/celo2.md §3 transcribed step by step, in double precision,
// one array per intermediate quantity. No fusion, no threads, no cleverness: the fast path
// (rule_cpu.cc) and every other backend are tested against this.
#include <cmath>
#include <vector>

#include "celo2/elementwise.h"
#include "celo2/newton_schulz.h"
#include "celo2/rule.h"

namespace celo2 {
namespace {

using dvec = std::vector<double>;

double safe_rsqrt_d(double x) { return 1.0 / std::sqrt(std::max(x, 1e-9)); }

// Newton–Schulz in double on one rows×cols matrix (row-major), in place.
void ns_double(const RuleConfig& cfg, int64_t rows, int64_t cols, double* x) {
  const bool transpose = rows > cols;
  const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
  dvec X(r * c);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      (transpose ? X[j * c + i] : X[i * c + j]) = x[i * cols + j];
  double fro = 0;
  for (double v : X) fro += v * v;
  const double scale = 1.0 / (std::sqrt(fro) + cfg.ns_eps);
  for (double& v : X) v *= scale;
  const double a = cfg.ns_coeffs[0], b = cfg.ns_coeffs[1], cc = cfg.ns_coeffs[2];
  dvec A(r * r), B(r * r), Y(r * c);
  for (int it = 0; it < cfg.ns_iters; ++it) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double s = 0;
        for (int64_t k = 0; k < c; ++k) s += X[i * c + k] * X[j * c + k];
        A[i * r + j] = s;
      }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double s = 0;
        for (int64_t k = 0; k < r; ++k) s += A[i * r + k] * A[k * r + j];
        B[i * r + j] = b * A[i * r + j] + cc * s;
      }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double s = 0;
        for (int64_t k = 0; k < r; ++k) s += B[i * r + k] * X[k * c + j];
        Y[i * c + j] = a * X[i * c + j] + s;
      }
    X.swap(Y);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      x[i * cols + j] = transpose ? X[j * c + i] : X[i * c + j];
}

}  // namespace

void newton_schulz_reference(const RuleConfig& cfg, int64_t rows, int64_t cols, float* x) {
  dvec d(x, x + rows * cols);
  ns_double(cfg, rows, cols, d.data());
  for (int64_t i = 0; i < rows * cols; ++i) x[i] = static_cast<float>(d[i]);
}

void celo2_reference(const RuleConfig& cfg, const Theta& theta, const Geometry& geo,
                     RuleState& st, const float* g_in, const float* p, float* u) {
  const int64_t n = geo.numel, P = st.stride(n);  // P: the state planes' stride
  st.iteration += 1;
  if (n == 0) return;
  const double t = static_cast<double>(st.iteration);
  auto decay = [](float b) { return std::min(std::max(static_cast<double>(b), 0.0), 1.0); };
  auto corr = [&](double b) { return cfg.bias_correction ? 1.0 - std::pow(b, t) : 1.0; };

  // 1. Clip.
  dvec g(n);
  for (int64_t i = 0; i < n; ++i) g[i] = std::min(std::max<double>(g_in[i], -1000.0), 1000.0);

  // 2. Accumulators.
  for (int k = 0; k < kMom; ++k) {
    const double b = decay(cfg.mom_decays[k]);
    for (int64_t i = 0; i < n; ++i)
      st.m[k * P + i] = static_cast<float>(b * st.m[k * P + i] + (1 - b) * g[i]);
  }
  for (int k = 0; k < kRms; ++k) {
    const double b = decay(cfg.rms_decays[k]);
    for (int64_t i = 0; i < n; ++i)
      st.rms[k * P + i] = static_cast<float>(b * st.rms[k * P + i] + (1 - b) * g[i] * g[i]);
  }
  dvec q(n);
  for (int64_t i = 0; i < n; ++i) q[i] = g[i] * g[i] + 1e-30;

  std::vector<dvec> fac_g(kFac, dvec(n));
  // Corrected factored accumulators and R̂, Ĉ (group 9-13), per decay.
  std::vector<dvec> vrow_hat(kFac), vcol_hat(kFac), Rhat(kFac), Chat(kFac);
  auto row_scale = [&](const float* vr, double cr, dvec& out) {
    // R = safe_rsqrt(v_row / (mean(v_row over d1') + 1e-9)), per row.
    dvec mean(geo.rest_count, 0.0);
    for (int64_t r = 0; r < geo.row_count; ++r) mean[geo.rest_index_of_row(r)] += vr[r] / cr;
    for (double& v : mean) v /= static_cast<double>(geo.shape[geo.d1]);
    out.assign(geo.row_count, 0.0);
    for (int64_t r = 0; r < geo.row_count; ++r)
      out[r] = safe_rsqrt_d((vr[r] / cr) / (mean[geo.rest_index_of_row(r)] + 1e-9));
  };
  if (geo.factored) {
    dvec row_mean(geo.row_count, 0.0), col_mean(geo.col_count, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      row_mean[geo.row_index(i)] += q[i];
      col_mean[geo.col_index(i)] += q[i];
    }
    for (double& v : row_mean) v /= static_cast<double>(geo.shape[geo.d0]);
    for (double& v : col_mean) v /= static_cast<double>(geo.shape[geo.d1]);
    for (int k = 0; k < kFac; ++k) {
      const double b = decay(cfg.fac_decays[k]);
      float* vr = &st.v_row[k * geo.row_count];
      float* vc = &st.v_col[k * geo.col_count];
      for (int64_t r = 0; r < geo.row_count; ++r)
        vr[r] = static_cast<float>(b * vr[r] + (1 - b) * row_mean[r]);
      for (int64_t c = 0; c < geo.col_count; ++c)
        vc[c] = static_cast<float>(b * vc[c] + (1 - b) * col_mean[c]);
      dvec R, C(geo.col_count);
      row_scale(vr, 1.0, R);
      for (int64_t c = 0; c < geo.col_count; ++c) C[c] = safe_rsqrt_d(vc[c]);
      for (int64_t i = 0; i < n; ++i) fac_g[k][i] = g[i] * R[geo.row_index(i)] * C[geo.col_index(i)];
      const double cb = corr(b);
      vrow_hat[k].resize(geo.row_count);
      vcol_hat[k].resize(geo.col_count);
      for (int64_t r = 0; r < geo.row_count; ++r) vrow_hat[k][r] = vr[r] / cb;
      for (int64_t c = 0; c < geo.col_count; ++c) vcol_hat[k][c] = vc[c] / cb;
      row_scale(vr, cb, Rhat[k]);
      Chat[k].resize(geo.col_count);
      for (int64_t c = 0; c < geo.col_count; ++c) Chat[k][c] = safe_rsqrt_d(vcol_hat[k][c]);
    }
  } else {
    for (int k = 0; k < kFac; ++k) {
      const double b = decay(cfg.fac_decays[k]);
      for (int64_t i = 0; i < n; ++i) {
        st.v_diag[k * P + i] = static_cast<float>(b * st.v_diag[k * P + i] + (1 - b) * q[i]);
        fac_g[k][i] = g[i] * safe_rsqrt_d(static_cast<double>(st.v_diag[k * P + i]) + 1e-9);
      }
    }
  }

  // 3. Bias correction (m, rms).
  std::vector<dvec> mh(kMom, dvec(n));
  dvec rh(n);
  for (int k = 0; k < kMom; ++k) {
    const double cb = corr(decay(cfg.mom_decays[k]));
    for (int64_t i = 0; i < n; ++i) mh[k][i] = st.m[k * P + i] / cb;
  }
  {
    const double cb = corr(decay(cfg.rms_decays[0]));
    for (int64_t i = 0; i < n; ++i) rh[i] = st.rms[i] / cb;
  }

  // 5. Features.
  const int C = geo.channels();
  std::vector<dvec> f(C, dvec(n));
  for (int64_t i = 0; i < n; ++i) {
    const double rho = 1.0 / std::sqrt(rh[i] + 1e-8);
    int c = 0;
    f[c++][i] = g[i];
    f[c++][i] = std::min(std::max(g[i], -0.1), 0.1);
    f[c++][i] = p[i];
    for (int k = 0; k < kMom; ++k) f[c++][i] = mh[k][i];
    f[c++][i] = rh[i];
    for (int k = 0; k < kMom; ++k) f[c++][i] = mh[k][i] * rho;
    f[c++][i] = rho;
    for (int k = 0; k < kFac; ++k) f[c++][i] = fac_g[k][i];
    f[c++][i] = g[i] * rho;
    if (geo.factored) {
      const int64_t r = geo.row_index(i), cc = geo.col_index(i);
      for (int k = 0; k < kFac; ++k) f[c++][i] = vrow_hat[k][r];
      for (int k = 0; k < kFac; ++k) f[c++][i] = vcol_hat[k][cc];
      for (int k = 0; k < kFac; ++k) f[c++][i] = 1.0 / std::sqrt(vrow_hat[k][r] + 1e-8);
      for (int k = 0; k < kFac; ++k) f[c++][i] = 1.0 / std::sqrt(vcol_hat[k][cc] + 1e-8);
      for (int k = 0; k < kFac; ++k) f[c++][i] = mh[k][i] * Rhat[k][r] * Chat[k][cc];
    }
  }

  // 6. Input normalization over the last min(n, 2) axes, per leading index.
  const int64_t G = geo.norm_size;
  if (cfg.normalize_input) {
    for (int c = 0; c < C; ++c)
      for (int64_t grp = 0; grp < geo.norm_groups; ++grp) {
        double s = 0;
        for (int64_t j = 0; j < G; ++j) s += f[c][grp * G + j] * f[c][grp * G + j];
        const double inv = 1.0 / std::sqrt(1e-9 + s / static_cast<double>(G));
        for (int64_t j = 0; j < G; ++j) f[c][grp * G + j] *= inv;
      }
  }

  // 7. MLP.
  dvec dir(n), mag(n);
  const int L = static_cast<int>(theta.layers.size());
  auto act = [&](double x) {
    return cfg.mlp_activation == Activation::kRelu ? std::max(x, 0.0) : std::tanh(x);
  };
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> h(C);
    for (int c = 0; c < C; ++c) h[c] = f[c][i];
    for (int l = 0; l < L; ++l) {
      const DenseLayer& d = theta.layers[l];
      const int in = l == 0 ? C : d.in;  // a 1-d tensor uses the first 15 rows of layer 0
      std::vector<double> o(d.out);
      for (int j = 0; j < d.out; ++j) {
        double s = d.b[j];
        for (int c = 0; c < in; ++c) s += h[c] * d.w[c * d.out + j];
        o[j] = l + 1 < L ? act(s) : s;
      }
      h.swap(o);
    }
    dir[i] = h[0];
    mag[i] = h[1];
  }

  // 8. Magnitude.
  if (cfg.aggregate_mag) {
    double s = 0;
    for (double v : mag) s += v;
    for (double& v : mag) v = s / static_cast<double>(n);
  }
  dvec step(n);
  double pscale = 1.0;
  if (cfg.param_scale_mult) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
    pscale = std::sqrt(s / static_cast<double>(n) + 1e-9);
  }
  for (int64_t i = 0; i < n; ++i) step[i] = dir[i] * std::exp(mag[i] * cfg.exp_mult) * pscale;

  // 9. Newton–Schulz on every matrix of the last two axes.
  if (cfg.orthogonalize && geo.factored)
    for (int64_t grp = 0; grp < geo.norm_groups; ++grp)
      ns_double(cfg, geo.mat_rows, geo.mat_cols, &step[grp * G]);

  // 10. Output normalization.
  if (cfg.normalize_output)
    for (int64_t grp = 0; grp < geo.norm_groups; ++grp) {
      double s = 0;
      for (int64_t j = 0; j < G; ++j) s += step[grp * G + j] * step[grp * G + j];
      const double inv = 1.0 / std::sqrt(1e-9 + s / static_cast<double>(G));
      for (int64_t j = 0; j < G; ++j) step[grp * G + j] *= inv;
    }

  // 11. Scale and optional preconditioning.
  for (int64_t i = 0; i < n; ++i) {
    double v = step[i] * cfg.rmsmult;
    if (cfg.precondition_output) v /= std::sqrt(rh[i] + 1e-6);
    u[i] = static_cast<float>(v);
  }
}

}  // namespace celo2
