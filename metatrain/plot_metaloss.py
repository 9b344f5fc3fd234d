#!/usr/bin/env python3
"""Plot the meta-loss curve of a celo2-metatrain run: metrics.csv -> PNG.

usage: plot_metaloss.py RUN_DIR/metrics.csv OUT.png [--window 500]
The raw per-step meta-loss (mean over the estimate's tasks of (L+ + L-)/2) is noisy because
every step sees different tasks at different points of their unrolls; the plot shows it
faintly with a moving average over --window outer steps on top.
"""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def moving_average(xs, w):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--window", type=int, default=500)
    a = ap.parse_args()
    steps, loss, wall, tnorm = [], [], [], []
    with open(a.csv) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            loss.append(float(row["meta_loss"]))
            wall.append(float(row["wall_s"]))
            tnorm.append(float(row["theta_norm"]))
    if not steps:
        raise SystemExit(f"{a.csv}: no rows")
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(steps, loss, color="tab:blue", alpha=0.15, lw=0.5, label="meta-loss per outer step")
    ax.plot(steps, moving_average(loss, a.window), color="tab:blue", lw=2,
            label=f"moving average ({a.window} steps)")
    ax.set_ylabel("meta-loss (clipped inner train loss)")
    ax.set_title(f"celo2-metatrain: {steps[-1]} outer steps, {wall[-1] / 3600:.2f} h wall")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    bx.plot(steps, tnorm, color="tab:orange")
    bx.set_ylabel("|theta|")
    bx.set_xlabel("outer step")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
