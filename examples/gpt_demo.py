#!/usr/bin/env python3
"""Pretrain a small GPT on a plain-text corpus with Celo2 (the sharded engine over all
ranks, the control plane on loopback), then the same model, data and steps with AdamW as
the baseline; report the losses, a PNG of the curves, the optimizer's share of step time,
the checkpoint and how to attach celo2ctl.

Run it through examples/run_gpt_demo.sh (which builds and starts `mpirun -np 2`), or:
    mpirun -np 2 python3 examples/gpt_demo.py [--steps 300] [--theta PATH] [--device cuda]
It also runs on one process, and under torchrun.
"""
import argparse
import json
import math
import os
import secrets
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import celo2  # noqa: E402
from celo2.distributed import make_communicator  # noqa: E402
from celo2.torch import Celo2  # noqa: E402
from gpt.data import DEFAULT_CORPUS, Batches, read_corpus  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402

# Megatron-style routing: embeddings, the output head and every 1-D tensor (norms, biases)
# take the AdamW branch; the matrices of the blocks take Celo2.
DEFAULT_RULES = "re:embed => adamw; re:^head\\. => adamw; ndim<=1 => adamw; * => celo2"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--context", type=int, default=64, help="tokens (bytes) per sequence")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="Celo2 base learning rate")
    ap.add_argument("--mult-1d", type=float, default=2.0,
                    help="Celo2's AdamW-branch lr multiplier (embeddings, head, norms)")
    ap.add_argument("--adamw-lr", type=float, default=1e-3,
                    help="baseline AdamW learning rate (best of 1e-3, 3e-3, 6e-3 at the defaults)")
    ap.add_argument("--weight-decay", type=float, default=0.1,
                    help="decay of the >= 2-D tensors in both runs; biases and norms get none (nanoGPT's "
                         "param groups)")
    ap.add_argument("--clip", type=float, default=1.0,
                    help="global gradient-norm clipping for both runs (0: off): Celo2's max_grad_norm, "
                         "torch.nn.utils.clip_grad_norm_ for AdamW")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rules", default=DEFAULT_RULES, help="Celo2 label rules")
    ap.add_argument("--theta", default=None,
                    help="Celo2 weights (published theta.state layout); default: the project's own")
    ap.add_argument("--variant", default="celo2", choices=["celo2", "celo2-base"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda:LOCAL_RANK if present)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="a directory or file of plain text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap-grad-reduce", action="store_true",
                    help="Celo2: reduce-scatter gradient buckets during backward (hooks; MPI ranks)")
    ap.add_argument("--bucket-elements", type=int, default=None,
                    help="Celo2: floats per gradient bucket (default: the engine's, 16M)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true", help="skip the AdamW run")
    ap.add_argument("--runs", default="celo2,adamw", help="which runs, in order (celo2, adamw)")
    ap.add_argument("--control", default="127.0.0.1:0",
                    help="control plane address on rank 0 ('' to disable; port 0 picks a free one)")
    ap.add_argument("--out", default="runs/gpt-demo", help="directory for the report, PNG and checkpoints")
    ap.add_argument("--tty", action="store_true", help="redraw one progress line (the launcher sets it)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the control plane up after training (to try celo2ctl)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.context < 2 or a.layers < 1 or a.width < 1 or a.heads < 1:
        ap.error("sizes and --steps must be positive")
    if a.width % a.heads:
        ap.error("--width must be a multiple of --heads")
    a.warmup = max(0, min(a.warmup, a.steps))  # short runs: the schedule needs warmup <= total
    a.runs = [r for r in a.runs.split(",") if r]
    if a.no_baseline:
        a.runs = [r for r in a.runs if r != "adamw"]
    if not a.runs or any(r not in ("celo2", "adamw") for r in a.runs):
        ap.error("--runs takes celo2 and/or adamw")
    return a


class Progress:
    """Rank 0's progress: one redrawn line on a terminal, else a line every tenth."""

    def __init__(self, name, total, enabled, tty):
        self.name, self.total, self.enabled, self.tty = name, total, enabled, tty
        self.every = max(1, total // 10)
        self.t0 = time.perf_counter()

    def update(self, step, loss, lr, tok_s, opt_share):
        if not self.enabled:
            return
        done = step / self.total
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        line = (f"{self.name:<6} [{bar}] {step:>5}/{self.total}  loss {loss:6.3f}  lr {lr:8.2e}  "
                f"{tok_s / 1e3:6.1f}k tok/s  opt {100 * opt_share:4.1f}%")
        if self.tty:
            sys.stdout.write("\r" + line + ("\n" if step == self.total else ""))
            sys.stdout.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            print(line, flush=True)


def pick_device(spec, local_rank):
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: PyTorch sees no CUDA device")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return dev


def mean_over_ranks(comm, values):
    a = np.asarray(values, dtype=np.float64).copy()
    comm.all_reduce_sum(a)
    return a / comm.size


def evaluate(model, val, device):
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in val:
            total += float(model(x.to(device), y.to(device)))
            n += 1
    model.train()
    return total, n


def param_groups(model, weight_decay):
    """nanoGPT's configure_optimizers groups: decay on >= 2-D tensors (matrices and
    embeddings), none on biases and norms. Named, so Celo2's label rules see the names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


def train_run(name, a, comm, batches, device, rank, world, out_dir, control_token_file):
    """One run: `name` is celo2 or adamw. Returns the metrics rank 0 reports."""
    torch.manual_seed(a.seed)  # the same initial model on every rank and for both runs
    model = GPT(GPTConfig(context=a.context, layers=a.layers, width=a.width, heads=a.heads)).to(device)
    schedule = f"cosine:lr={a.lr},warmup={a.warmup},total={a.steps},final=0.1"
    control_address = ""
    if name == "celo2":
        opt = Celo2(param_groups(model, a.weight_decay), schedule=schedule, rules=a.rules, theta=a.theta,
                    variant=a.variant, mult_1d=a.mult_1d, max_grad_norm=a.clip,
                    overlap_grad_reduce=a.overlap_grad_reduce, bucket_elements=a.bucket_elements,
                    communicator=comm, control=a.control or None,
                    control_token_file=control_token_file if a.control else None,
                    control_checkpoint_dir=out_dir if a.control else None,
                    control_weights_root=os.path.dirname(os.path.abspath(a.theta)) if a.theta and a.control else None)
        if a.control:
            control_address = opt.start_control()
            if rank == 0:
                print(f"control plane: {control_address} (token in {control_token_file}); attach with\n"
                      f"  build/client/celo2ctl --addr {control_address} --token-file {control_token_file} watch",
                      flush=True)
        if rank == 0:
            st = opt.status()
            by = st["elements_by_label"]
            print(f"celo2: {st['num_tensors']} tensors, {st['total_elements']:,} elements "
                  f"(celo2 {by['celo2']:,}, adamw {by['adamw']:,}) sharded over {world} rank(s) "
                  f"[{st['backend']}], theta {'published: ' + a.theta if a.theta else 'project default'}",
                  flush=True)
    else:
        opt = torch.optim.AdamW([{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
                                 for g in param_groups(model, a.weight_decay)],
                                lr=a.adamw_lr, betas=(0.9, 0.95))
        warm = max(1, a.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: (t + 1) / warm if t < warm else
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, a.steps - warm)))))
        params = [p for p in model.parameters()]
        flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)

    val = batches.val_batches(rank, world, a.eval_batches)
    progress = Progress(name, a.steps, rank == 0, a.tty)
    tokens_per_step = a.batch_size * a.context * world
    curve, evals = [], []
    opt_seconds = step_seconds = 0.0
    window = []  # (step seconds) of the last steps, for tokens/s
    for step in range(a.steps):
        t0 = time.perf_counter()
        x, y = batches.train_batch(rank, step)
        loss = model(x.to(device), y.to(device))
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        if name == "celo2":
            opt.step(loss=loss)  # averages the gradients over ranks, clips, updates, all-gathers
            lr = opt.last_report["lr"]
            grad_norm = opt.grad_norm
        else:
            # A data-parallel AdamW: average the gradients over the same ranks, then step.
            if world > 1:
                at = 0
                for p in params:
                    flat[at:at + p.numel()] = p.grad.reshape(-1).cpu()
                    at += p.numel()
                comm.all_reduce_sum(flat.numpy())
                flat.mul_(1.0 / world)
                at = 0
                for p in params:
                    p.grad.copy_(flat[at:at + p.numel()].view_as(p.grad))
                    at += p.numel()
            lr = opt.param_groups[0]["lr"]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.clip if a.clip > 0 else float("inf")))
            opt.step()
            sched.step()
        t2 = time.perf_counter()
        if step >= 2:  # the first steps include one-time setup
            opt_seconds += t2 - t1
            step_seconds += t2 - t0
        window = (window + [t2 - t0])[-20:]
        mean_loss = float(mean_over_ranks(comm, [loss.item()])[0]) if world > 1 else loss.item()
        curve.append(mean_loss)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            tot, n = evaluate(model, val, device)
            s = mean_over_ranks(comm, [tot, n]) if world > 1 else np.array([tot, n])
            evals.append((step + 1, float(s[0] / max(s[1], 1))))
        progress.update(step + 1, mean_loss, lr, tokens_per_step / (sum(window) / len(window)),
                        opt_seconds / step_seconds if step_seconds else 0.0)

    result = {"curve": curve, "evals": evals, "opt_share": opt_seconds / max(step_seconds, 1e-9),
              "grad_norm_last": grad_norm,
              "step_seconds": step_seconds / max(1, a.steps - 2),
              "opt_seconds": opt_seconds / max(1, a.steps - 2), "tokens_per_step": tokens_per_step}
    if name == "celo2":
        ckpt = os.path.join(out_dir, "optimizer.state")
        opt.save(ckpt)  # the engine's checkpoint (resumable on any number of ranks)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
        result.update(checkpoint=ckpt, model=os.path.join(out_dir, "model.pt"),
                      status={k: v for k, v in opt.status().items()
                              if k in ("step", "skipped", "schedule", "rules", "theta_sha256", "backend")},
                      phase_seconds=opt.phase_seconds(), control_address=control_address)
        if a.hold > 0 and control_address:
            if rank == 0:
                print(f"holding the control plane at {control_address} for {a.hold:.0f} s", flush=True)
            time.sleep(a.hold)
        del opt
    return result


def smooth(xs, k=10):
    out, acc = [], []
    for x in xs:
        acc = (acc + [x])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(a, results, out_dir, world):
    """The loss curves as a PNG; None (the report says so) where matplotlib is not installed,
    as in a bare venv: the losses and the metrics file do not need it."""
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"celo2": "tab:red", "adamw": "tab:blue"}
    for name, r in results.items():
        steps = np.arange(1, len(r["curve"]) + 1)
        ax.plot(steps, r["curve"], color=colors[name], alpha=0.2, lw=0.8)
        ax.plot(steps, smooth(r["curve"]), color=colors[name], lw=1.8, label=f"{name} (train, smoothed)")
        if r["evals"]:
            ex, ey = zip(*r["evals"])
            ax.plot(ex, ey, "o--", color=colors[name], ms=4, lw=1, label=f"{name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"GPT {a.layers}x{a.width}, context {a.context}, {world} rank(s): Celo2 vs AdamW")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    png = os.path.join(out_dir, "loss_curves.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def write_report(a, results, out_dir, world, wall):
    png = plot_curves(a, results, out_dir, world)

    def final(r):
        return r["evals"][-1][1] if r["evals"] else float("nan")

    lines = ["", "=" * 72, "celo2 GPT demo: report", "=" * 72]
    for name, r in results.items():
        lines.append(f"{name:<6} final train loss {np.mean(r['curve'][-20:]):.4f} (mean of last 20)  "
                     f"validation {final(r):.4f}  step {1e3 * r['step_seconds']:.0f} ms, "
                     f"optimizer {100 * r['opt_share']:.1f}% of step time, "
                     f"last grad norm {r['grad_norm_last']:.3f}")
    c = results.get("celo2", {})
    if "adamw" in results and c:
        d = final(results["adamw"]) - final(c)
        lines.append(f"validation loss, celo2 - adamw: {-d:+.4f} ({'celo2' if d > 0 else 'adamw'} lower)")
    ph = c.get("phase_seconds") or {}
    if ph:
        lines.append("celo2 engine phases of the last step (rank 0, ms): " +
                     ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(ph.items())))
    lines.append(f"loss curves: {png}" if png else "loss curves: not drawn (matplotlib is not installed)")
    if c:
        lines.append(f"checkpoint:  {c['checkpoint']} (optimizer, any world size) + {c['model']} (model)")
    lines += [f"metrics:     {os.path.join(out_dir, 'metrics.json')}",
              f"wall time:   {wall:.0f} s on {world} rank(s)"]
    if c.get("control_address"):
        lines += ["control plane (while a run is going; --hold SECONDS keeps it up after training):",
                  f"  build/client/celo2ctl --addr {c['control_address']} --token-file "
                  f"{os.path.join(out_dir, 'control.token')} status",
                  "  ... watch | set-schedule 'cosine:lr=1e-3,warmup=0,total=1000,final=0.1' | "
                  "load-weights --file THETA | save-checkpoint NAME"]
    print("\n".join(lines), flush=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"args": vars(a), "world_size": world, "wall_seconds": wall,
                   "results": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}},
                  f, indent=1, default=str)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    info = celo2.discover_rank()
    # One transport for the optimizer and the demo's own sums: MPI under mpirun/srun,
    # torch.distributed (gloo) under torchrun, local on one process.
    comm = make_communicator("auto")
    rank, world = comm.rank, comm.size
    device = pick_device(a.device, info.local_rank)
    out_dir = os.path.abspath(a.out)
    token_file = os.path.join(out_dir, "control.token")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if a.control:
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16) + "\n")
    comm.barrier()
    data = read_corpus(a.corpus)
    batches = Batches(data, a.context, a.batch_size, a.seed)
    if rank == 0:
        print(f"corpus: {a.corpus} ({data.size / 1e6:.1f} MB, byte-level); model GPT {a.layers} layers x "
              f"{a.width}, context {a.context}; {world} rank(s) [{comm.backend}] on {device}; "
              f"{a.steps} steps x {a.batch_size * a.context * world} tokens", flush=True)
    t0 = time.perf_counter()
    results = {name: train_run(name, a, comm, batches, device, rank, world, out_dir, token_file)
               for name in a.runs}
    wall = time.perf_counter() - t0
    if rank == 0:
        write_report(a, results, out_dir, world, wall)
    comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
