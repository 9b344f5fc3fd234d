"""``Celo2CUDA``: the Celo2 optimizer for models on GPUs, on the GPU engine (CUDA kernels,
NCCL collectives; ``celo2/gpu_engine.h``). Needs a CUDA build of the package with NCCL
(``celo2._celo2.gpu_engine_supported()``).

    from celo2.torch_cuda import Celo2CUDA
    model = Model().cuda()                  # float32 or bfloat16 parameters
    opt = Celo2CUDA(model.named_parameters(), lr=1e-3, grads="reduced")  # after DDP
    for batch in data:
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad()

Every rank holds the whole model (data parallel, as under DDP or torchrun); the engine owns
each tensor's optimizer state on one rank (large AdamW tensors in pieces), reduces gradients
to the owners (``grads="local"``) or takes them already averaged (``grads="reduced"``, e.g.
after DDP), and broadcasts the updated parameters. bfloat16 parameters get a float32 master
copy on their owner.

Gradients: each parameter's ``.grad`` is made a view of one flat device buffer per dtype,
registered with the engine, so backward writes straight into it; a ``.grad`` that is not
that view (``zero_grad(set_to_none=True)``, replaced by another module) is copied in at
``step()``. ``step()`` runs on the current CUDA stream's order (the stream is passed to the
engine) and returns when the update is in place.

Checkpoints: ``save(path)`` / ``load(path)`` write and read the engine's world-size-
independent state file (the same format as the CPU optimizer's: a GPU state loads on the
CPU and back). ``state_dict()`` carries its bytes on rank 0.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from . import _celo2
from ._front import _GRADS, _NAN, _VARIANTS, _EngineFront, _is_number, _named

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class Celo2CUDA(_EngineFront, torch.optim.Optimizer):
    """Celo2 on the GPU engine; arguments as ``celo2.torch.Celo2`` (``control=...`` serves the
    same gRPC control plane from rank 0, started at the first step) plus ``bucket_bytes``
    (gradient bytes per communication bucket) and ``ns_precision`` (``"float32"`` |
    ``"tf32"`` | ``"bf16"`` Newton–Schulz GEMMs)."""

    def __init__(self, params, lr: float = 1e-3, *, schedule: str | None = None,
                 rules: str | None = None, weight_decay: float = 0.0, mult_1d: float = 20.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, variant: str = "celo2",
                 config: dict | None = None, theta=None, nan_policy: str = "skip",
                 grads: str = "local", gather_params: bool = True,
                 bucket_bytes: int = 64 << 20, ns_precision: str = "float32",
                 control: str | None = None, control_token: str | None = None,
                 control_token_file: str | None = None, control_weights_root: str | None = None,
                 control_checkpoint_dir: str | None = None, communicator="auto"):
        if communicator not in ("auto", "nccl", None):
            raise ValueError(f"Celo2 on CUDA tensors runs over NCCL; communicator={communicator!r} "
                             "is not supported there (use 'auto')")
        if not _celo2.gpu_engine_supported():
            raise RuntimeError("Celo2CUDA needs a CUDA build of celo2 with NCCL "
                               "(celo2._celo2.gpu_engine_supported() is False)")
        if not torch.cuda.is_available():
            raise RuntimeError("Celo2CUDA: no CUDA device is available to PyTorch")
        if not _is_number(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if nan_policy not in _NAN:
            raise ValueError(f"nan_policy must be one of {_NAN}, got {nan_policy!r}")
        if grads not in _GRADS or grads == "sharded":
            raise ValueError(f"grads must be 'local' or 'reduced' on the GPU engine, got {grads!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 4:
            raise ValueError(f"bucket_bytes must be an integer >= 4, got {bucket_bytes!r}")
        if isinstance(theta, (str, os.PathLike)):
            theta = os.fspath(theta)
            if not os.path.isfile(theta):
                raise FileNotFoundError(f"theta: no such file: {theta!r}")

        named = _named(params)
        trainable = [(n, p) for n, p, _ in named if p.requires_grad]
        if not trainable:
            raise ValueError("Celo2CUDA: no parameter requires grad")
        devices = {p.device for _, p in trainable}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"Celo2CUDA: every parameter must be on one CUDA device, got {sorted(map(str, devices))}")
        self._device = next(iter(devices))
        for n, p in trainable:
            if p.dtype not in _DTYPES:
                raise ValueError(f"parameter {n!r}: dtype {p.dtype} (float32 or bfloat16 only)")
            if not p.is_contiguous():
                raise ValueError(f"parameter {n!r} is not contiguous")
        defaults = dict(lr=float(lr), weight_decay=float(weight_decay), betas=tuple(betas),
                        eps=float(eps), mult_1d=float(mult_1d))
        self._registering = True
        super().__init__([{"params": [p for _, p in trainable], "names": [n for n, _ in trainable]}], defaults)
        self._registering = False

        options = dict(variant=variant, config=config, theta=theta,
                       schedule=schedule if schedule is not None else f"constant:lr={float(lr)!r}",
                       rules=rules, weight_decay=float(weight_decay), mult_1d=float(mult_1d),
                       adam_b1=float(betas[0]), adam_b2=float(betas[1]), adam_eps=float(eps),
                       nan_policy=nan_policy,
                       grads=grads, gather_params=bool(gather_params), bucket_bytes=int(bucket_bytes),
                       ns_precision=ns_precision, control_address=control, control_token=control_token,
                       control_token_file=control_token_file, control_weights_root=control_weights_root,
                       control_checkpoint_dir=control_checkpoint_dir)
        with torch.cuda.device(self._device):
            self._engine = _celo2.GpuEngine(options)
        # One flat gradient buffer per dtype; .grad are views of it.
        sizes = {dt: sum(p.numel() for _, p in trainable if p.dtype == dt) for dt in _DTYPES}
        self._buffers = {dt: torch.zeros(n, dtype=dt, device=self._device) for dt, n in sizes.items() if n}
        offsets = {dt: 0 for dt in _DTYPES}
        self._entries = []
        with torch.no_grad():
            for name, p in trainable:
                n = p.numel()
                view = self._buffers[p.dtype][offsets[p.dtype]:offsets[p.dtype] + n].view(p.shape)
                offsets[p.dtype] += n
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                dt = _DTYPES[p.dtype]
                self._engine.add_tensor(name, list(p.shape), p.data_ptr(), dt, view.data_ptr(), dt, (p, view))
                self._entries.append((name, p, view, p.data_ptr()))
        self.last_report: dict | None = None
        self.last_step_seconds = 0.0
        self._external_lr = False
        self._lr_written = self.param_groups[0]["lr"]

    def add_param_group(self, param_group):
        if not getattr(self, "_registering", False):
            raise RuntimeError("add_param_group: Celo2CUDA registers its tensors once, at construction")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One update of every registered tensor (collective over ranks). ``loss`` (a number
        or tensor) is reported to the control plane; ``closure`` re-evaluates the model."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, p, view, ptr in self._entries:
            if p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {name!r} was reallocated after Celo2CUDA was created; "
                                   "create the optimizer after the model is in place")
            g = p.grad
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
        lr, loss_value = self._step_args(loss)
        stream = torch.cuda.current_stream(self._device).cuda_stream
        t0 = time.perf_counter()
        report = self._engine.step(lr=lr, stream=stream, loss=loss_value)
        self._record(report, time.perf_counter() - t0)
        return loss

    def zero_grad(self, set_to_none: bool = False):
        """Zero the gradient buffers (``.grad`` stay views); ``set_to_none=True`` drops them."""
        if set_to_none:
            for _, p, _, _ in self._entries:
                p.grad = None
            return
        for b in self._buffers.values():
            b.zero_()
        for _, p, view, _ in self._entries:
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view

    def save(self, path):
        """Collective: the engine's checkpoint file (rank 0 writes)."""
        self._engine.save(os.fspath(path))

    def load(self, path):
        """Collective: load a checkpoint file (rank 0 reads; validated before anything changes)."""
        self._engine.load(os.fspath(path))

    def state_dict(self):
        """Collective. ``celo2_state_file``: the checkpoint's bytes on rank 0 (b"" elsewhere)."""
        sd = super().state_dict()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "state")
            self._engine.save(path)
            sd["celo2_state_file"] = open(path, "rb").read() if self.rank == 0 else b""
        return sd

    def load_state_dict(self, state_dict):
        """Collective; rank 0's ``celo2_state_file`` is what every rank loads."""
        if not isinstance(state_dict, dict) or "celo2_state_file" not in state_dict:
            raise ValueError("not a Celo2 state_dict: it has no 'celo2_state_file'")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "state")
            if self.rank == 0:
                with open(path, "wb") as f:
                    f.write(bytes(state_dict["celo2_state_file"]))
            self._engine.load(path)

    def refresh_masters(self):
        """After changing bfloat16 parameters outside the optimizer (e.g. loading a model)."""
        self._engine.refresh_masters()

    def __repr__(self):
        return (f"Celo2CUDA(tensors={len(self._entries)}, device={self._device}, "
                f"rank={self.rank}/{self.world_size}, step={self._engine.step_count})")
