"""Two ranks under mpirun, run by test_distributed.py: both take two optimizer steps, then
rank 0 dies of an uncaught exception while rank 1 takes a third step (a collective that
rank 0 never joins). celo2's exit hook should end the job at once (MPI_Abort), rather than
rank 0 waiting in MPI_Finalize and rank 1 in its step until CELO2_COMM_TIMEOUT_S."""
import torch

import celo2
import dist_worker


def main():
    torch.set_num_threads(1)
    rank = celo2.discover_rank().rank
    params = dist_worker.make_params()
    opt = dist_worker.make_optimizer(params, "local", True, "mpi")
    dist_worker.train(opt, params, rank, 2, 0, 2, "local")
    if rank == 0:
        raise RuntimeError("rank 0 dies here (abort_worker)")
    dist_worker.train(opt, params, rank, 2, 2, 3, "local")
    print("rank 1 finished its third step: it should not have", flush=True)


if __name__ == "__main__":
    main()
