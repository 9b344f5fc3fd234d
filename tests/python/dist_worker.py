"""A tiny trainer run by test_distributed.py under mpirun / torchrun (and in-process as the
one-rank reference). Every rank draws its own batches; the reference draws all ranks'
batches and averages their gradients, which is what the sharded engine must reproduce.

    mpirun -np 2 python3 dist_worker.py --grads local --out params.npz
"""
import argparse
import contextlib
import os
import sys

import numpy as np
import torch

from celo2.torch import Celo2

# How the tests torch.load a checkpoint: weights_only=True, torch >= 2.6's default, where
# torch has it in full. Torch 1.13's weights-only unpickler lacks pickle's BINFLOAT (opcode
# 71), and every optimizer state_dict holds Python floats (lr, betas), so 1.13 loads as before.
TORCH_LOAD_KW = {"weights_only": True} if int(torch.__version__.split(".")[0]) >= 2 else {}

SHAPES = {"embed.weight": (11, 6), "fc1.weight": (6, 13), "fc1.bias": (13,), "fc2.weight": (13, 5),
          "scale": ()}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g) * 0.5)) for n, s in SHAPES.items()]


def loss_of(params, rank, step):
    p = dict(params)
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, 11, (8,), generator=g)
    target = torch.randn(8, 5, generator=g)
    h = torch.tanh(p["embed.weight"][idx] @ p["fc1.weight"] + p["fc1.bias"])
    out = (h @ p["fc2.weight"]) * p["scale"]
    return ((out - target) ** 2).mean()


def make_optimizer(params, grads, gather, communicator, overlap=False):
    extra = dict(overlap_grad_reduce=True, bucket_elements=40) if overlap else {}
    return Celo2(params, schedule="cosine:lr=3e-2,warmup=2,total=12,final=0.1", weight_decay=0.01,
                 grads=grads, gather_params=gather, communicator=communicator, **extra)


def train(opt, params, rank, world, first, last, grads, emulate=1, accum=1):
    """Steps [first, last). emulate > 1: one process plays `emulate` ranks (the reference)."""
    comm = opt.communicator
    for t in range(first, last):
        opt.zero_grad()
        if emulate > 1:
            gsum = None
            for r in range(emulate):
                for _, p in params:
                    p.grad = None
                loss_of(params, r, t).backward()
                flat = torch.cat([p.grad.reshape(-1) for _, p in params])
                gsum = flat if gsum is None else gsum + flat
            opt.zero_grad(set_to_none=True)
            avg = gsum * (1.0 / emulate)
            at = 0
            for _, p in params:
                p.grad = avg[at:at + p.numel()].view(p.shape).clone()
                at += p.numel()
        elif accum > 1:
            # Gradient accumulation: the same batch in `accum` equal parts (exact in float),
            # all but the last backward inside no_sync (overlap_grad_reduce).
            for k in range(accum):
                with opt.no_sync() if k < accum - 1 else contextlib.nullcontext():
                    (loss_of(params, rank, t) * (1.0 / accum)).backward()
        else:
            loss_of(params, rank, t).backward()
            if grads == "reduced":
                buf = opt.grad_buffer.numpy()
                comm.all_reduce_sum(buf)
                opt.grad_buffer.mul_(1.0 / world)
            elif grads == "sharded":
                lo, hi = opt.local_range()
                total = opt.grad_buffer.numel()
                counts = [total * (k + 1) // world - total * k // world for k in range(world)]
                recv = np.zeros(hi - lo, dtype=np.float32)
                comm.reduce_scatter_sum(opt.grad_buffer.numpy(), recv, counts)
                opt.grad_buffer[lo:hi] = torch.from_numpy(recv) * (1.0 / world)
        opt.step()
        if not opt._gather:
            opt.gather_params()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grads", default="local")
    ap.add_argument("--gather", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--comm", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--save", default="")
    ap.add_argument("--resume", default="")
    ap.add_argument("--rank0-save", action="store_true",
                    help="consolidate_state_dict(to=0), then state_dict() on rank 0 only")
    ap.add_argument("--emulate", type=int, default=1, help="one process plays this many ranks")
    ap.add_argument("--overlap", action="store_true", help="overlap_grad_reduce (hooks)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (no_sync)")
    ap.add_argument("--init-dist", action="store_true",
                    help="the trainer initializes torch.distributed (gloo) before Celo2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.init_dist:
        torch.distributed.init_process_group("gloo")
    params = make_params()
    opt = make_optimizer(params, a.grads, bool(a.gather), a.comm, overlap=a.overlap)
    rank, world = opt.rank, opt.world_size
    if a.overlap:
        assert opt.overlapping == (world > 1 and opt.status()["backend"] == "mpi"), opt.status()["backend"]
    first = 0
    if a.resume:
        ck = torch.load(a.resume, **TORCH_LOAD_KW)
        with torch.no_grad():
            for n, p in params:
                p.copy_(ck["model"][n])
        opt.load_state_dict(ck["optimizer"])
        first = ck["step"]
    if a.save_at >= 0:
        train(opt, params, rank, world, first, a.save_at, a.grads)
        if a.rank0_save:  # nanoGPT's pattern: only rank 0 asks for the optimizer's state
            opt.consolidate_state_dict(to=0)
            sd = opt.state_dict() if rank == 0 else None
            if rank != 0:
                try:
                    opt.state_dict()
                    raise AssertionError("state_dict() on a rank without the consolidated state")
                except RuntimeError as e:
                    assert "consolidated on rank 0" in str(e), e
        else:
            sd = opt.state_dict()
        if rank == 0:
            torch.save({"model": {n: p.detach().clone() for n, p in params}, "optimizer": sd,
                        "step": a.save_at}, a.save)
        first = a.save_at
    train(opt, params, rank, world, first, a.steps, a.grads, emulate=a.emulate, accum=a.accum)
    if rank == 0:
        np.savez(a.out, **{n: p.detach().numpy() for n, p in params},
                 __meta=np.array([world, opt.status()["step"]]),
                 __backend=np.array(opt.status()["backend"]),
                 __hooks=np.array(getattr(opt, "grad_hook_kind", "none")))
    if opt.overlapping:
        # The last step's buckets ran on the engine's thread during backward.
        assert "grads_background" in opt._engine.phase_seconds(), opt._engine.phase_seconds()
        # Accumulating without no_sync marks a tensor twice: refused by name, and the step
        # still completes on every rank.
        try:
            for _ in range(2):
                loss_of(params, rank, 99).backward()
            raise AssertionError("a second backward without no_sync was not refused")
        except RuntimeError as e:
            assert "already marked ready" in str(e) and "no_sync" in str(e), e
        opt.step()
    print(f"rank {rank}/{world} backend {opt.status()['backend']} done", file=sys.stderr)
    if a.init_dist:  # the trainer's group: the trainer closes it (else celo2's atexit does)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
