"""``Celo2CUDA``: ``celo2.torch.Celo2`` for models on a GPU, refusing anything else.

``Celo2`` itself chooses the engine's backend by where the parameters live, so

    opt = celo2.torch.Celo2(model.cuda().named_parameters(), lr=1e-3, grads="reduced")

already runs on the engine's ``"cuda"`` backend (optimizer state, buffers and the Celo2
rule on the device, NCCL between ranks; ``celo2/cuda_backend.h``). ``Celo2CUDA`` is that
optimizer with the choice fixed: it raises when the build has no cuda backend, when no CUDA
device is visible, or when a parameter is not on one CUDA device, instead of falling back to
the CPU. bfloat16/float16 parameters get float32 masters of each rank's slice on the device
(kept by the engine; writes to the parameters between steps re-seed them). Checkpoints are the engine's
world-size-independent files, so a GPU state loads on the CPU and back.
"""
from __future__ import annotations

import torch

from . import _celo2
from .torch import Celo2


class Celo2CUDA(Celo2):
    """``Celo2(..., backend="cuda")``; the same arguments (see ``celo2.torch.Celo2``)."""

    def __init__(self, params, *args, **kwargs):
        if not _celo2.gpu_engine_supported():
            raise RuntimeError("Celo2CUDA needs a CUDA build of celo2 (the engine's cuda backend; "
                               "celo2._celo2.gpu_engine_supported() is False)")
        if not torch.cuda.is_available():
            raise RuntimeError("Celo2CUDA: no CUDA device is available to PyTorch")
        if kwargs.setdefault("backend", "cuda") != "cuda":
            raise ValueError("Celo2CUDA runs on the cuda backend; use celo2.torch.Celo2 for others")
        super().__init__(params, *args, **kwargs)
