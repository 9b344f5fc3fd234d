"""The PyTorch optimizer against the golden vectors of spec/celo2.md §8: every rule file
(raw Celo2 step) and every optimizer file (full recipe), through celo2.torch.Celo2 on
torch tensors, to the spec's tolerance of 1e-4 in max |error| / RMS(expected)."""
import glob
import os
import re

import numpy as np
import pytest
import torch

import golden_io
from celo2.torch import Celo2

TOL = 1e-4
GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "golden", "*.msgpack")))


def _params(d):
    return [(name, torch.nn.Parameter(torch.tensor(np.array(a), dtype=torch.float32)))
            for name, a in sorted(d["initial_params"].items())]


def run_rule_file(d):
    """Every tensor labelled celo2, lr = 512 (a power of two, so u = (before - after)/512
    loses only the rounding of after), params continue from the expected trajectory."""
    named = _params(d)
    lr = 512.0
    opt = Celo2(named, schedule=f"constant:lr={lr}", rules="* => celo2", config=d["config"],
                theta=golden_io.theta_bytes(d["theta"]), communicator="local")
    worst = 0.0
    for k in range(len(d["steps"])):
        s = d["steps"][str(k)]
        before = {}
        for name, p in named:
            p.grad.copy_(torch.from_numpy(np.array(s["grads"][name])))
            before[name] = p.detach().double().clone()
        opt.step()
        for name, p in named:
            want = np.array(s["celo2_step"][name], dtype=np.float64)
            u = ((before[name] - p.detach().double()) / lr).numpy()
            worst = max(worst, golden_io.rel_error(u, want))
            with torch.no_grad():
                p.copy_((before[name] - 0.01 * torch.from_numpy(want)).float())
    return worst


def run_optimizer_file(d):
    named = _params(d)
    rules = "; ".join(f"re:^{re.escape(n)}$ => {label}" for n, label in d["labels"].items())
    opt = Celo2(named, rules=rules, weight_decay=float(d["weight_decay"]), mult_1d=float(d["mult_1d"]),
                config=d["config"], theta=golden_io.theta_bytes(d["theta"]), communicator="local")
    worst = 0.0
    for k in range(len(d["steps"])):
        s = d["steps"][str(k)]
        before = {}
        for name, p in named:
            p.grad.copy_(torch.from_numpy(np.array(s["grads"][name])))
            before[name] = p.detach().double().clone()
        opt.param_groups[0]["lr"] = float(s["lr"])  # the file's base lr (a trainer's override)
        opt.step()
        for name, p in named:
            want_after = np.array(s["params_after"][name], dtype=np.float64)
            got = (p.detach().double() - before[name]).numpy()
            worst = max(worst, golden_io.rel_error(got, want_after - before[name].numpy()))
            with torch.no_grad():
                p.copy_(torch.from_numpy(want_after).float())
    return worst


def test_golden_files_exist():
    assert len(GOLDEN) >= 13, GOLDEN


@pytest.mark.parametrize("path", GOLDEN, ids=[os.path.basename(p) for p in GOLDEN])
def test_golden(path):
    d = golden_io.load(path)
    if d["format"] == "celo2-golden-rule/1":
        worst = run_rule_file(d)
    elif d["format"] == "celo2-golden-optimizer/1":
        worst = run_optimizer_file(d)
    else:
        pytest.fail(f"unknown golden format {d['format']}")
    print(f"{os.path.basename(path)}: worst max|err|/RMS {worst:.3e}")
    assert worst <= TOL, f"{os.path.basename(path)}: worst max|err|/RMS {worst:.3e} > {TOL}"
