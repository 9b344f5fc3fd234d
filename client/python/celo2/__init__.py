"""celo2 — the Celo2 learned optimizer as a distributed-training optimizer service.

``celo2.torch.Celo2`` is the PyTorch optimizer (imports torch). Everything here works
without PyTorch:

- ``celo2.Engine``: the sharded C++ engine on this rank, fed by data pointers or NumPy
  arrays (``add_tensor(name, shape, params_ptr, grads_ptr)``, ``add_array``, ``step()``);
- ``celo2.Communicator``: the engine's transport (MPI under an MPI launcher, else local),
  with collectives on NumPy arrays;
- ``celo2.discover_rank()``: rank, world size and local rank read in Megatron's order;
- ``celo2.read_state_file(data)``: an engine checkpoint as Python values.
"""
from ._celo2 import (  # noqa: F401
    CommError,
    Communicator,
    FileError,
    FormatError,
    NonFiniteGradientError,
    Optimizer as Engine,
    UnsupportedError,
    __version__,
    blas_threading,
    control_supported,
    read_state_file,
    theta_sha256,
)
from .distributed import RankInfo, discover_rank  # noqa: F401

STATE_FORMAT = "celo2-optimizer-state/1"

__all__ = [
    "CommError", "Communicator", "Engine", "FileError", "FormatError", "NonFiniteGradientError", "RankInfo",
    "STATE_FORMAT", "UnsupportedError", "blas_threading", "control_supported", "discover_rank", "read_state_file",
    "theta_sha256",
]
