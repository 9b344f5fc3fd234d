"""The torch/gloo transport has a watchdog too: under two torchrun-style processes, a
collective that the other rank does not join fails within CELO2_COMM_TIMEOUT_S with a
celo2.CommError naming the collective, the rank, that the peer is alive but elsewhere, and the
fix (consolidate_state_dict); a peer whose process is gone is reported as dead, at once.
The ranks are hang_worker.py processes with torchrun's variables (see test_distributed.py)."""
import json
import os
import subprocess
import sys

import pytest

from test_distributed import HERE, _env, _free_port

WORKER = os.path.join(HERE, "hang_worker.py")
TIMEOUT_S = 5


def run_pair(case, tmp_path, limit=60):
    port = _free_port()
    procs = []
    for r in range(2):
        env = _env()
        env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CELO2_COMM_TIMEOUT_S=str(TIMEOUT_S))
        procs.append(subprocess.Popen([sys.executable, WORKER, case, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=limit)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case}: the ranks hung for {limit} s (no watchdog?)")
    results = {}
    for r in range(2):
        path = tmp_path / f"rank{r}.json"
        if path.exists():
            results[r] = json.loads(path.read_text())
    return results, outs


def check_alive_elsewhere(res, rank, out):
    assert res["raised"], f"rank {rank} did not fail:\n{out}"
    assert res["comm_error"], res
    msg = res["message"]
    print(f"rank {rank} after {res['seconds']:.1f} s: {msg}")
    assert TIMEOUT_S - 0.5 <= res["seconds"] <= TIMEOUT_S + 10, res["seconds"]
    assert f"rank {rank} of 2" in msg
    assert f"did not complete within {TIMEOUT_S} s (CELO2_COMM_TIMEOUT_S)" in msg
    assert "alive" in msg and "in a different collective" in msg
    assert "opt.consolidate_state_dict(to=0) on every rank" in msg
    assert "died" not in msg


def test_collective_on_rank0_alone_times_out_naming_the_fix(tmp_path):
    """nanoGPT's mistake: opt.state_dict() on rank 0 only, rank 1 outside any collective."""
    results, outs = run_pair("alone", tmp_path)
    assert 0 in results, outs[0]
    check_alive_elsewhere(results[0], 0, outs[0])
    assert any(op in results[0]["message"] for op in ("all_gather", "broadcast", "all_reduce"))


def test_ranks_in_different_collectives_both_time_out(tmp_path):
    """Rank 0 in state_dict(), rank 1 already in its next step(): both stop with the fix."""
    results, outs = run_pair("step", tmp_path)
    assert set(results) == {0, 1}, outs
    for r in (0, 1):
        check_alive_elsewhere(results[r], r, outs[r])


def test_dead_peer_is_reported_as_dead_at_once(tmp_path):
    results, outs = run_pair("dead", tmp_path)
    assert "rank 1 dies here" in outs[1]
    res = results.get(0)
    assert res is not None, outs[0]
    assert res["raised"] and res["comm_error"], res
    msg = res["message"]
    print(f"rank 0 after {res['seconds']:.1f} s: {msg}")
    assert res["seconds"] < TIMEOUT_S - 1, "reported as a timeout, not as a closed connection"
    assert "rank 0 of 2" in msg
    assert "a peer rank died (its process is gone" in msg
    assert "Connection closed by peer" in msg  # gloo's own words (PyTorch 1.13)
    assert "consolidate_state_dict" not in msg


def test_timeout_comes_from_the_one_table(monkeypatch):
    """CELO2_COMM_TIMEOUT_S reaches Python through the C++ accessor (celo2/params.h), which
    refuses a malformed value by name."""
    from celo2 import distributed

    assert distributed.comm_timeout_s() >= 0
    code = ("import celo2.distributed as d\n"
            "try:\n    d.comm_timeout_s()\nexcept ValueError as e:\n    print('refused:', e)\n")
    env = _env()
    env["CELO2_COMM_TIMEOUT_S"] = "10m"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "refused:" in r.stdout and "CELO2_COMM_TIMEOUT_S" in r.stdout and "10m" in r.stdout, r.stdout + r.stderr
    env["CELO2_COMM_TIMEOUT_S"] = "7.5"
    r = subprocess.run([sys.executable, "-c", "import celo2.distributed as d; print(d.comm_timeout_s())"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "7.5", r.stdout + r.stderr


def test_peer_closing_at_the_limit_is_a_timeout_not_a_death():
    """gloo closes a pair's connection when its own collective times out, so the rank whose
    limit runs out a moment later sees "connection closed" (seen in CI on a loaded 2-core
    machine). With the same CELO2_COMM_TIMEOUT_S on every rank, a close at this rank's limit
    is the peer's timeout (alive, elsewhere); one long before it is a death."""
    from types import SimpleNamespace

    import celo2.distributed as d
    from celo2.distributed import TorchCommunicator

    was = d._comm_failed  # _failed marks the process's communicator as failed; restored below
    me = SimpleNamespace(_global=[0, 1], _rank=1, _size=2, _timeout_s=float(TIMEOUT_S))
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:65244")
    late = str(TorchCommunicator._failed(me, "reduce_scatter", gone, TIMEOUT_S + 0.006))
    early = str(TorchCommunicator._failed(me, "reduce_scatter", gone, 0.2))
    d._comm_failed = was
    assert f"did not complete within {TIMEOUT_S} s (CELO2_COMM_TIMEOUT_S)" in late
    assert "alive" in late and "in a different collective" in late and "died" not in late
    assert "opt.consolidate_state_dict(to=0) on every rank" in late
    assert "a peer rank died" in early and "did not complete" not in early
