"""Two torchrun-style ranks whose collectives do not line up, run by test_comm_timeout.py:
both take two optimizer steps together, then

  alone  rank 0 calls opt.state_dict() (a collective) alone, nanoGPT style; rank 1 waits
         outside any collective until rank 0 has reported;
  step   the same, but rank 1 goes on training: its opt.step() is a different collective;
  dead   rank 1 dies of an uncaught exception; rank 0 then steps.

Each rank that attempts something writes RESULT_DIR/rank<R>.json: whether it raised, the
exception's class, message and the seconds it took.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 CELO2_COMM_TIMEOUT_S=5 \
        python3 hang_worker.py alone RESULT_DIR
"""
import json
import os
import sys
import time

import torch

import celo2
import dist_worker


def attempt(fn):
    t0 = time.monotonic()
    try:
        fn()
        out = {"raised": False}
    except Exception as e:  # noqa: BLE001 (what was raised is the result)
        out = {"raised": True, "type": type(e).__name__, "comm_error": isinstance(e, celo2.CommError),
               "message": str(e)}
    out["seconds"] = time.monotonic() - t0
    return out


def main():
    case, result_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    params = dist_worker.make_params()
    opt = dist_worker.make_optimizer(params, "local", True, "auto")
    assert opt.status()["backend"].startswith("python:torch.distributed"), opt.status()["backend"]
    dist_worker.train(opt, params, rank, 2, 0, 2, "local")

    def one_more_step():
        dist_worker.train(opt, params, rank, 2, 2, 3, "local")

    result = None
    if case in ("alone", "step"):
        if rank == 0:
            result = attempt(opt.state_dict)
        elif case == "step":
            result = attempt(one_more_step)
        else:
            reported = os.path.join(result_dir, "rank0.json")
            limit = time.monotonic() + 60
            while not os.path.exists(reported) and time.monotonic() < limit:
                time.sleep(0.05)
    elif case == "dead":
        if rank == 1:
            raise RuntimeError("rank 1 dies here (hang_worker dead)")
        time.sleep(0.5)
        result = attempt(one_more_step)
    else:
        raise SystemExit(f"unknown case {case!r}")
    if result is not None:
        tmp = os.path.join(result_dir, f".rank{rank}.json")
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.rename(tmp, os.path.join(result_dir, f"rank{rank}.json"))
    if case == "step":
        # Both ranks time out on their own; stay alive until the other has reported, or the
        # rank whose watchdog fires second would see this process's exit ("a peer died")
        # instead of its own timeout (seen on a loaded 2-core machine).
        other = os.path.join(result_dir, f"rank{1 - rank}.json")
        limit = time.monotonic() + 60
        while not os.path.exists(other) and time.monotonic() < limit:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
