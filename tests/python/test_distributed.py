"""The PyTorch optimizer on 2 ranks gives the parameters of 1 rank: under mpirun (the C++
MPI transport) and under torchrun (torch.distributed/gloo through Python callbacks), with
gradients left to the engine ("local"), all-reduced by the trainer ("reduced") or
reduce-scattered by it ("sharded", Megatron's distributed optimizer) with the trainer
gathering the parameters; and a state_dict saved on 2 ranks resumes on 1 rank exactly."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dist_worker
from conftest import mpirun_command

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
STEPS = 6
# The engine's reductions are exact for two ranks; allow a little for other orders.
TOL = 1e-6


def _env(extra=None):
    env = dict(os.environ)
    env.update(extra or {})
    paths = [HERE] + [p for p in sys.path if p and os.path.isdir(os.path.join(p, "celo2"))]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for k in list(env):  # a launcher's variables from an outer job must not leak in
        if k.startswith(("OMPI_", "PMIX_", "SLURM_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[k]
    return env


def _run(cmd, timeout=240, extra_env=None):
    r = subprocess.run(cmd, env=_env(extra_env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def mpirun(args, np_=2, extra_env=None):
    cmd = mpirun_command(np_)
    if cmd is None:
        pytest.skip("mpirun not installed")
    for k, v in (extra_env or {}).items():
        cmd = cmd + ["-x", f"{k}={v}"]
    return _run(cmd + [sys.executable, WORKER] + args, extra_env=extra_env)


def reference(world=2, steps=STEPS):
    torch.set_num_threads(1)
    params = dist_worker.make_params()
    opt = dist_worker.make_optimizer(params, "local", True, "local")
    dist_worker.train(opt, params, 0, 1, 0, steps, "local", emulate=world)
    return {n: p.detach().numpy().copy() for n, p in params}


@pytest.fixture(scope="module")
def ref():
    return reference()


def compare(path, ref, world=2, backend=None, tol=TOL):
    got = np.load(path)
    assert int(got["__meta"][0]) == world
    assert int(got["__meta"][1]) == STEPS
    if backend:
        assert str(got["__backend"]).startswith(backend), str(got["__backend"])
    worst = 0.0
    for n, want in ref.items():
        scale = max(float(np.abs(want).max()), 1e-30)
        worst = max(worst, float(np.abs(got[n] - want).max()) / scale)
    print(f"{os.path.basename(path)}: max |2 ranks - 1 rank| / max|p| = {worst:.3e}")
    assert worst <= tol
    return worst


def test_reference_moves(ref):
    start = dict((n, p.detach().numpy()) for n, p in dist_worker.make_params())
    assert all(np.abs(ref[n] - start[n]).max() > 1e-4 for n in ref)


@pytest.mark.parametrize("grads,gather", [("local", 1), ("reduced", 1), ("sharded", 0)])
def test_mpirun_two_ranks_match_one(tmp_path, ref, grads, gather):
    out = tmp_path / "p.npz"
    mpirun(["--grads", grads, "--gather", str(gather), "--steps", str(STEPS), "--out", str(out)])
    compare(out, ref, backend="mpi")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, world=2, timeout=240, extra_env=None):
    """Starts `world` workers with the variables torchrun gives its workers. (Debian's
    torch 1.13 launcher itself fails on Python 3.11 before starting any worker: its
    `to_map(redirects)` gets None.)"""
    port = _free_port()
    procs = []
    for r in range(world):
        env = _env(extra_env)
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, WORKER] + args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o


@pytest.mark.parametrize("init_dist", [False, True], ids=["celo2-inits-gloo", "trainer-inits-gloo"])
def test_torchrun_two_ranks_match_one(tmp_path, ref, init_dist):
    out = tmp_path / "p.npz"
    torchrun(["--steps", str(STEPS), "--out", str(out)] + (["--init-dist"] if init_dist else []))
    compare(out, ref, backend="python:torch.distributed")


# Newton–Schulz split over both ranks (CELO2_NS_SPLIT=2: every matrix's column blocks on
# two ranks, the group's all-reduces on a sub-communicator: MPI_Comm_split, or gloo groups
# from TorchCommunicator.split). The split sums partial Gram matrices in another order, so
# the bound is float32 rounding of the update (1e-5) rather than the exact 1e-6.
SPLIT_TOL = 1e-5


def test_mpirun_split_newton_schulz_matches_one(tmp_path, ref):
    out = tmp_path / "p.npz"
    mpirun(["--steps", str(STEPS), "--out", str(out)], extra_env={"CELO2_NS_SPLIT": "2"})
    compare(out, ref, backend="mpi", tol=SPLIT_TOL)


def test_torchrun_split_newton_schulz_matches_one(tmp_path, ref):
    out = tmp_path / "p.npz"
    torchrun(["--steps", str(STEPS), "--out", str(out)], extra_env={"CELO2_NS_SPLIT": "2"})
    compare(out, ref, backend="python:torch.distributed", tol=SPLIT_TOL)


# overlap_grad_reduce: buckets of 40 floats reduce-scattered on the engine's thread as the
# hooks mark parameters during backward, with and without gradient accumulation (no_sync):
# the same parameters as one rank, to the same bound as without overlap.
@pytest.mark.parametrize("accum", [1, 2])
def test_mpirun_overlapped_grad_reduce_matches_one(tmp_path, ref, accum):
    out = tmp_path / "p.npz"
    mpirun(["--steps", str(STEPS), "--overlap", "--accum", str(accum), "--out", str(out)])
    compare(out, ref, backend="mpi")
    # The hook path of this torch: register_post_accumulate_grad_hook from 2.1 (what
    # scripts/test_torch2.sh runs), a hook on the AccumulateGrad node before (Debian's 1.13).
    want = ("post_accumulate_grad" if hasattr(torch.Tensor, "register_post_accumulate_grad_hook")
            else "accumulate_grad_node")
    assert str(np.load(out)["__hooks"]) == want


def test_state_dict_saved_on_two_ranks_resumes_on_one(tmp_path, ref):
    ck = tmp_path / "ck.pt"
    mpirun(["--steps", str(STEPS), "--save-at", "3", "--save", str(ck), "--out", str(tmp_path / "a.npz")])
    compare(tmp_path / "a.npz", ref)
    out = tmp_path / "b.npz"
    # One process playing both ranks' batches from step 3 on.
    _run([sys.executable, WORKER, "--steps", str(STEPS), "--resume", str(ck), "--emulate", "2",
          "--out", str(out)])
    got = np.load(out)
    assert int(got["__meta"][0]) == 1
    worst = max(float(np.abs(got[n] - ref[n]).max()) for n in ref)
    print(f"resumed on 1 rank from a 2-rank state_dict: max |diff| = {worst:.3e}")
    assert worst <= TOL


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_RANK", "PMIX_SIZE",
                "PMI_RANK", "PMI_SIZE")


@pytest.mark.parametrize("env,want,mpi", [
    ({}, ("none", 0, 1, 0), None),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ("torchrun", 1, 4, 1), None),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, ("slurm", 3, 8, 1), (3, 8)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ("openmpi", 2, 4, 0), (2, 4)),
], ids=["none", "torchrun", "slurm", "openmpi"])
def test_rank_discovery_is_the_cpp_detector(monkeypatch, env, want, mpi):
    """celo2.distributed reads the launchers through the C++ detect_launch() (celo2/launch.h)."""
    from celo2.distributed import detect_launch, discover_rank, mpi_launched

    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = discover_rank()
    assert (info.source, info.rank, info.world_size, info.local_rank) == want
    assert mpi_launched() == mpi
    launch = detect_launch()
    assert launch["launcher"] == want[0] and launch["rank"] == want[1] and launch["size"] == want[2]


def test_malformed_launcher_variable_is_refused_by_name(monkeypatch):
    import celo2
    from celo2.distributed import discover_rank

    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(celo2.CommError, match="RANK='x'"):
        discover_rank()


def test_rank0_checkpoint_after_consolidation_resumes_on_one(tmp_path, ref):
    """nanoGPT / HF Trainer save optimizer state from rank 0 only: after
    consolidate_state_dict(to=0) on every rank, state_dict() on rank 0 alone works (no
    collective, no hang) and resumes exactly; another rank's state_dict() raises clearly."""
    ck = tmp_path / "ck0.pt"
    mpirun(["--steps", str(STEPS), "--save-at", "3", "--save", str(ck), "--rank0-save",
            "--out", str(tmp_path / "a.npz")])
    compare(tmp_path / "a.npz", ref)
    out = tmp_path / "b.npz"
    _run([sys.executable, WORKER, "--steps", str(STEPS), "--resume", str(ck), "--emulate", "2",
          "--out", str(out)])
    got = np.load(out)
    worst = max(float(np.abs(got[n] - ref[n]).max()) for n in ref)
    assert worst <= TOL


# A rank that dies of an uncaught exception under mpirun ends the job at once: its exit hook
# calls MPI_Abort instead of finalizing (which would wait for the peer waiting for it, until
# CELO2_COMM_TIMEOUT_S, here set far above the test's own limit).
def test_mpirun_uncaught_exception_on_one_rank_ends_the_job(tmp_path):
    cmd = mpirun_command(2)
    if cmd is None:
        pytest.skip("mpirun not installed")
    env = {"CELO2_COMM_TIMEOUT_S": "600"}
    for k, v in env.items():
        cmd = cmd + ["-x", f"{k}={v}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd + [sys.executable, os.path.join(HERE, "abort_worker.py")], env=_env(env),
                       capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    out = r.stdout + r.stderr
    print(f"job ended in {seconds:.1f} s with status {r.returncode}")
    assert r.returncode != 0, out
    assert "rank 0 dies here (abort_worker)" in out, out
    assert "celo2: rank 0 of 2: uncaught RuntimeError; ending the MPI job (MPI_Abort)" in out, out
    assert "it should not have" not in out, out
    assert seconds < 90, out
