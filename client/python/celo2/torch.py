"""``Celo2``: the Celo2 learned optimizer as a ``torch.optim.Optimizer``.

    from celo2.torch import Celo2
    opt = Celo2(model.named_parameters(), lr=1e-3,
                schedule="cosine:lr=1e-3,warmup=100,total=10000,final=0.1",
                rules="re:embed => adamw; re:head => adamw; ndim<=1 => adamw; * => celo2")
    for batch in data:
        loss = model(batch).loss
        loss.backward()
        opt.step(loss=loss)        # the loss is optional: it feeds the control plane
        opt.zero_grad()

How tensors reach the engine. Gradients live in one flat float32 buffer
(``opt.grad_buffer``) laid out in registration order, the engine's flat index space; each
float32 CPU parameter's ``.grad`` is a view into it, so backward accumulates straight into
the engine's memory. A ``.grad`` that is not that view (set to None and recreated, another
dtype or device, replaced by DDP's bucket views) is copied in at ``step()``.

Parameters. Contiguous float32, bfloat16 and float16 parameters on the engine's device are
updated in place. For bfloat16/float16 the engine keeps float32 masters of its slice
(4 bytes per parameter / ranks), writes round(master) into the parameters and all-gathers
them. Writes the trainer makes between steps (``model.load_state_dict``, an EMA swap,
weight surgery) are detected element by element and re-seed the masters at the next step,
and checkpoints hold the masters, so ``model.load_state_dict`` + ``opt.load_state_dict``
resumes exactly, in either order. Other parameters (another device, non-contiguous) go
through a staging copy on the engine's device, refreshed from them before each step and
copied back after.

Param groups. As torch optimizers: a group's ``lr`` (relative to the base ``lr``: the
schedule's rate is scaled by group lr / base lr) and ``weight_decay`` apply to its tensors
in both branches (Celo2 and AdamW), e.g. nanoGPT's decay / no-decay groups. Changing a
group's ``lr`` or ``weight_decay`` in ``param_groups`` between steps takes effect at the next
step. ``betas``, ``eps`` and ``mult_1d`` are one per optimizer.

Ranks. Under torchrun, mpirun or srun the engine is sharded over all ranks (see
``celo2.distributed``). ``grads`` says what the trainer did with the gradients:
``"local"`` nothing (the engine averages them), ``"reduced"`` averaged them already (DDP),
``"sharded"`` reduce-scattered them: only this rank's slice ``opt.local_range()`` of
``opt.grad_buffer`` holds averaged gradients (Megatron's distributed optimizer). With
``gather_params=False`` only this rank's slice of the parameters is updated; call
``opt.gather_params()`` (or gather them yourself) before the next forward.

Learning rate. The engine's schedule drives every group's ``lr`` (written after each step:
the schedule's rate times the group's scale). If anything else changes one of them (a
``torch.optim.lr_scheduler``, the trainer), the optimizer follows the groups' ``lr`` values
from then on.

Checkpoints. ``state_dict()["celo2_state_file"]`` holds exactly the bytes ``save(path)``
writes (the engine's world-size-independent checkpoint), so the two are interchangeable:
a state_dict saved on 4 ranks loads on 2, and an engine checkpoint file loads through
``load_state_dict({"celo2_state_file": open(path, "rb").read()})``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterable

import torch

from . import _celo2
from ._front import _GRADS, _NAN, _VARIANTS, _EngineFront, _is_number, _named  # noqa: F401
from .distributed import choose_communicator

_NO_SETTER = "Celo2 registers its tensors once, at construction"


_ENGINE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _Entry:
    __slots__ = ("name", "param", "grad_view", "stage", "ptr", "group")

    def __init__(self, name, param, grad_view, stage, group):
        # stage: None when the engine updates `param` in place, else the copy it updates.
        self.name, self.param, self.grad_view, self.stage, self.group = name, param, grad_view, stage, group
        self.ptr = param.data_ptr() if stage is None else None

    @property
    def direct(self):
        return self.stage is None

    def copy_grad_in(self, g):
        """A ``.grad`` that is not the view of the engine's buffer is copied into it."""
        if g.data_ptr() != self.grad_view.data_ptr() or g.shape != self.grad_view.shape:
            self.grad_view.copy_(g)


class Celo2(_EngineFront, torch.optim.Optimizer):
    """The Celo2 learned optimizer (sharded C++ engine) for PyTorch; see the module docstring.

    Args:
        params: ``model``, ``model.named_parameters()``, tensors, or parameter-group dicts
            (a group may set ``lr`` and ``weight_decay``; tensors are routed to the Celo2 or
            the AdamW branch by ``rules``).
        lr: base learning rate when no ``schedule`` is given (constant).
        schedule: text form, e.g. ``"cosine:lr=1e-3,warmup=100,total=10000,final=0.1"``.
        rules: label rules, e.g. ``"re:embed => adamw; ndim<=1 => adamw; * => celo2"``
            (default: the seed's: AdamW for ndim <= 1 and names containing "embed").
        weight_decay, mult_1d, betas, eps: the recipe's (betas and eps are the AdamW branch's).
        variant: ``"celo2"`` or ``"celo2-base"``; config: RuleConfig overrides (spec §1 keys).
        theta: path of a published-layout ``theta.state`` (or its bytes); default: the
            project's own weights.
        max_grad_norm: clip the global norm of the averaged gradients to this, as
            ``torch.nn.utils.clip_grad_norm_`` (0: off); ``opt.grad_norm`` is the norm before.
        nan_policy: ``"skip"`` | ``"error"`` | ``"zero"``.
        grads: ``"local"`` | ``"reduced"`` | ``"sharded"``; gather_params: see module doc.
        overlap_grad_reduce: with ``grads="local"`` over MPI, reduce-scatter each gradient
            bucket (``bucket_elements`` floats) during backward, as soon as its parameters'
            gradients are accumulated (hooks; Megatron's ``overlap_grad_reduce``). Gradient
            accumulation: wrap all but the last micro-batch's backward in ``opt.no_sync()``.
            Gradients are read when their bucket starts, so in-place changes after backward
            (``clip_grad_norm_``, ``GradScaler.unscale_``) are not seen: use ``max_grad_norm``.
        communicator: ``"auto"`` | ``"local"`` | ``"mpi"`` | ``"torch"`` | a communicator.
        control: ``"host:port"`` to serve the control plane from rank 0 (``":0"`` or
            ``"127.0.0.1:0"`` picks a free port); control_token / control_token_file (or
            CELO2_CONTROL_TOKEN), control_weights_root, control_checkpoint_dir as in
            celo2/control.h.

    Option names are the one table of ``celo2/client.h`` (docs/OPERATIONS.md "Options"); the
    torch-style ``betas`` and ``eps`` are the AdamW branch's ``adam_b1``, ``adam_b2`` and
    ``adam_eps``.

    Where the tensors live chooses the engine's backend (``backend="auto"``): parameters on a
    CUDA device run on the ``"cuda"`` backend (state, buffers and the rule on that device,
    NCCL between ranks) in builds that have it; CPU parameters on ``"cpu"``. ``backend="cpu"``
    keeps the engine on the CPU whatever the parameters (CUDA ones go through CPU staging
    copies).
    """

    def __init__(self, params, lr: float = 1e-3, *, schedule: str | None = None,
                 rules: str | None = None, weight_decay: float = 0.0, mult_1d: float = 20.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, variant: str = "celo2",
                 config: dict | None = None, theta=None, nan_policy: str = "skip",
                 grads: str = "local", gather_params: bool = True, communicator="auto",
                 control: str | None = None, control_token: str | None = None,
                 control_token_file: str | None = None, control_weights_root: str | None = None,
                 control_checkpoint_dir: str | None = None, backend: str = "auto",
                 bucket_elements: int | None = None, max_grad_norm: float = 0.0,
                 overlap_grad_reduce: bool = False):
        if backend not in ("auto", "cpu", "cuda"):
            raise ValueError(f"backend must be 'auto', 'cpu' or 'cuda', got {backend!r}")
        if not _is_number(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if not _is_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not _is_number(mult_1d):
            raise ValueError(f"mult_1d must be a finite number, got {mult_1d!r}")
        if not _is_number(max_grad_norm) or max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: off), got {max_grad_norm!r}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not _is_number(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if nan_policy not in _NAN:
            raise ValueError(f"nan_policy must be one of {_NAN}, got {nan_policy!r}")
        if grads not in _GRADS:
            raise ValueError(f"grads must be one of {_GRADS}, got {grads!r}")
        if schedule is not None and not isinstance(schedule, str):
            raise TypeError(f"schedule must be a string like 'constant:lr=1e-3', got {type(schedule).__name__}")
        if rules is not None and not isinstance(rules, str):
            raise TypeError(f"rules must be a string like 're:embed => adamw; * => celo2', got {type(rules).__name__}")
        if config is not None and not isinstance(config, dict):
            raise TypeError("config must be a dict of RuleConfig fields (spec/celo2.md §1)")
        if isinstance(theta, (str, os.PathLike)):
            theta = os.fspath(theta)
            if not os.path.isfile(theta):
                raise FileNotFoundError(f"theta: no such file: {theta!r}")
        elif theta is not None and not isinstance(theta, (bytes, bytearray)):
            raise TypeError("theta must be a path or the bytes of a theta.state file")

        named = _named(params)
        defaults = dict(lr=float(lr), weight_decay=float(weight_decay), betas=tuple(betas),
                        eps=float(eps), mult_1d=float(mult_1d))
        for name, _, group in named:
            for k, v in group.items():
                if k in ("names", "lr", "weight_decay"):
                    continue
                if k not in defaults:
                    raise ValueError(f"parameter group option {k!r} (of {name!r}) is not a Celo2 option")
                if v != defaults[k] and not (k == "betas" and tuple(v) == defaults[k]):
                    raise ValueError(
                        f"parameter groups with their own {k} ({name!r}: {v!r} vs {defaults[k]!r}) are not "
                        "supported: a group may set lr and weight_decay; betas, eps and mult_1d are one per "
                        "optimizer")
            for k in ("lr", "weight_decay"):
                if k in group and (not _is_number(group[k]) or group[k] < 0):
                    raise ValueError(f"parameter group {k} of {name!r} must be a finite number >= 0, "
                                     f"got {group[k]!r}")
            if "lr" in group and group["lr"] != lr and lr == 0:
                raise ValueError(f"parameter group lr {group['lr']!r} of {name!r}: group lrs are scales of "
                                 "the base lr, which is 0")
        trainable = [(n, p, g) for n, p, g in named if p.requires_grad]
        if not trainable:
            raise ValueError("Celo2: no parameter requires grad")
        devices = {p.device for _, p, _ in trainable}
        on_cuda = all(d.type == "cuda" for d in devices)
        if backend == "auto":
            backend = "cuda" if on_cuda and _celo2.gpu_engine_supported() else "cpu"
        if backend == "cuda":
            if not _celo2.gpu_engine_supported():
                raise RuntimeError("backend='cuda' needs a CUDA build of celo2 (the engine's cuda backend; "
                                   "celo2._celo2.gpu_engine_supported() is False)")
            if len(devices) != 1 or not on_cuda:
                raise ValueError(f"backend='cuda': every parameter must be on one CUDA device, got "
                                 f"{sorted(map(str, devices))}")
            self._device = next(iter(devices))
        else:
            self._device = torch.device("cpu")
        self._backend = backend
        self._frozen_names = [n for n, p, _ in named if not p.requires_grad]
        # One torch param group per distinct group dict of the caller (in order of appearance).
        group_of: dict[int, int] = {}
        torch_groups: list[dict] = []
        for n, p, g in trainable:
            k = group_of.setdefault(id(g), len(torch_groups))
            if k == len(torch_groups):
                torch_groups.append({**{a: b for a, b in g.items() if a in ("lr", "weight_decay")},
                                     "params": [], "names": []})
            torch_groups[k]["params"].append(p)
            torch_groups[k]["names"].append(n)
        # Groups that set their own decay keep it when the recipe's changes (set_weight_decay,
        # the control plane); the others follow the recipe's.
        self._own_wd = ["weight_decay" in tg for tg in torch_groups]
        self._registering = True
        super().__init__(torch_groups, defaults)
        self._registering = False
        # The engine's per-tensor hyperparameters, per group: lr scale (of the schedule's rate).
        self._scales = [pg["lr"] / lr if lr > 0 else 1.0 for pg in self.param_groups]
        self._pushed = [None] * len(self.param_groups)

        options = dict(variant=variant, config=config, theta=bytes(theta) if isinstance(theta, bytearray) else theta,
                       schedule=schedule if schedule is not None else f"constant:lr={float(lr)!r}",
                       rules=rules, weight_decay=float(weight_decay), mult_1d=float(mult_1d),
                       adam_b1=float(betas[0]), adam_b2=float(betas[1]), adam_eps=float(eps),
                       nan_policy=nan_policy, grads=grads, gather_params=bool(gather_params),
                       control_address=control, control_token=control_token,
                       control_token_file=control_token_file, control_weights_root=control_weights_root,
                       control_checkpoint_dir=control_checkpoint_dir)
        options["backend"] = backend
        options["max_grad_norm"] = float(max_grad_norm)
        if bucket_elements is not None:
            options["bucket_elements"] = int(bucket_elements)
        options["overlap_grad_reduce"] = bool(overlap_grad_reduce)
        self._grads_mode = grads
        self._gather = bool(gather_params)
        if backend == "cuda":
            # Device memory travels over NCCL (or nowhere, on one rank): the C++ client picks it.
            if communicator not in ("auto", "nccl", "local"):
                raise ValueError(f"backend='cuda' runs over NCCL; communicator={communicator!r} is not "
                                 "supported there (use 'auto')")
            comm = "auto" if communicator == "auto" else communicator
            with torch.cuda.device(self._device):
                self._engine = _celo2.Optimizer(options, comm)
        else:
            self._engine = _celo2.Optimizer(options, choose_communicator(communicator))

        total = sum(p.numel() for _, p, _ in trainable)
        self._grad_buffer = torch.zeros(total, dtype=torch.float32, device=self._device)
        self._entries: list[_Entry] = []
        offset = 0
        with torch.no_grad():
            for gi, pg in enumerate(self.param_groups):
                for name, p in zip(pg["names"], pg["params"]):
                    n = p.numel()
                    view = self._grad_buffer[offset:offset + n].view(p.shape)
                    direct = p.device == self._device and p.dtype in _ENGINE_DTYPES and p.is_contiguous()
                    if not direct and not self._gather:
                        raise ValueError(
                            f"gather_params=False needs contiguous float32/bfloat16/float16 parameters on the "
                            f"engine's device ({name!r} is {p.dtype} on {p.device}, the engine on {self._device})")
                    if direct:
                        stage = None
                        target = p.data
                    else:
                        dtype = p.dtype if p.dtype in _ENGINE_DTYPES else torch.float32
                        stage = target = p.detach().to(self._device, dtype).contiguous()
                    if p.grad is not None:
                        view.copy_(p.grad)
                    if direct and p.dtype == torch.float32:
                        p.grad = view
                    self._engine.add_tensor(name, list(p.shape), target.data_ptr(), view.data_ptr(),
                                            _ENGINE_DTYPES[target.dtype], (target, view))
                    self._entries.append(_Entry(name, p, view, stage, gi))
                    offset += n
        self._wd_written = [pg["weight_decay"] for pg in self.param_groups]
        self._push_groups()
        self._sync_off = False
        self._marked: set[int] = set()
        self._hooks: list = []
        if self._engine.overlapping():
            self._register_grad_hooks()
        status = self._engine.status()
        self._external_lr = False
        self._write_lrs(status["lr"])
        self.last_report: dict | None = None
        self.last_step_seconds = 0.0

    # ---------------------------------------------------------------- torch.optim API
    def add_param_group(self, param_group):
        if not getattr(self, "_registering", False):
            raise RuntimeError(f"add_param_group: {_NO_SETTER}; pass every parameter to Celo2(...)")
        super().add_param_group(param_group)

    def _register_grad_hooks(self):
        """overlap_grad_reduce: a hook per parameter, run when backward has accumulated its
        gradient, tells the engine (``grad_ready``); the engine reduces each bucket whose
        tensors are all final on its communication thread while backward goes on."""
        # Which of torch's two hook paths this process takes (tests hold it to the version).
        post = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")  # torch >= 2.1
        self.grad_hook_kind = "post_accumulate_grad" if post else "accumulate_grad_node"
        for i, e in enumerate(self._entries):
            p = e.param
            if post:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._grad_final(i)))
            else:  # torch 1.13 - 2.0: a hook on the parameter's AccumulateGrad node (kept alive)
                with torch.enable_grad():
                    acc = p.expand_as(p).grad_fn.next_functions[0][0]
                self._hooks.append((acc, acc.register_hook(lambda *_a, i=i: self._grad_final(i))))

    def _grad_final(self, i):
        if self._sync_off:
            return
        e = self._entries[i]
        g = e.param.grad
        if g is None:
            return
        e.copy_grad_in(g)
        if self._backend == "cuda":
            # The engine's bucket copies follow the legacy default stream (torch's default);
            # gradients made on another stream are waited for here.
            s = torch.cuda.current_stream(self._device)
            if s != torch.cuda.default_stream(self._device):
                s.synchronize()
        self._marked.add(i)
        self._engine.grad_ready(i)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation with ``overlap_grad_reduce``: backward passes inside this
        block do not start the reduce-scatter (as DDP's ``no_sync``); the last micro-batch's
        backward, outside it, does.

            for k, mb in enumerate(micro_batches):
                with (opt.no_sync() if k < len(micro_batches) - 1 else contextlib.nullcontext()):
                    model(mb).loss.backward()
            opt.step()
        """
        prev, self._sync_off = self._sync_off, True
        try:
            yield
        finally:
            self._sync_off = prev

    @property
    def overlapping(self) -> bool:
        """Whether backward overlaps the gradient reduce-scatter (``overlap_grad_reduce=True``
        with more than one rank over MPI or NCCL; not over the torch/gloo bridge)."""
        return self._engine.overlapping()

    def _sync_grads(self):
        """Copies gradients that are not views of the engine's buffer in; returns one byte
        per tensor, 0 where ``.grad`` is None (the engine leaves a tensor without a
        gradient on every rank unchanged, as torch.optim does)."""
        if self._grads_mode == "sharded":
            return None  # the trainer wrote this rank's slice of grad_buffer
        has = bytearray(len(self._entries))
        for i, e in enumerate(self._entries):
            g = e.param.grad
            if g is None:
                e.grad_view.zero_()
            else:
                has[i] = 1
                if i not in self._marked:  # (a marked tensor's was copied by its hook, and may be in flight)
                    e.copy_grad_in(g)
        self._marked.clear()
        return bytes(has)

    def _check_params(self):
        for e in self._entries:
            if e.direct and e.param.data_ptr() != e.ptr:
                raise RuntimeError(
                    f"parameter {e.name!r} was reallocated after Celo2 was created (model.to(), "
                    "param.data = ...); create the optimizer after the model is in place")

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One update of every registered tensor (collective over ranks). ``loss`` (a number
        or tensor) is reported to the control plane; ``closure`` re-evaluates the model."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params()
        for e in self._entries:
            if e.stage is not None:  # the trainer may have written the parameter since
                e.stage.copy_(e.param)
        has_grad = self._sync_grads()
        lr, loss_value = self._step_args(loss)
        t0 = time.perf_counter()
        if self._backend == "cuda":
            # The engine's device work runs on the legacy default stream and returns when done;
            # work the trainer queued on its own stream is finished first.
            torch.cuda.current_stream(self._device).synchronize()
        report = self._engine.step(loss=loss_value, lr=lr, has_grad=has_grad)
        for e in self._entries:
            if e.stage is not None:
                e.param.copy_(e.stage, non_blocking=True)
        self._record(report, time.perf_counter() - t0)
        return loss

    def zero_grad(self, set_to_none: bool = False):
        """Zero the gradients. The default keeps ``.grad`` as views of the engine's buffer (one
        memset, no copies at step); ``set_to_none=True`` drops them as PyTorch does, and the
        next step copies the recreated gradients in."""
        if set_to_none:
            for e in self._entries:
                e.param.grad = None
            return
        self._grad_buffer.zero_()
        for e in self._entries:
            g = e.param.grad
            if e.direct and e.param.dtype == torch.float32:  # .grad is a view of the buffer
                if g is None or g.data_ptr() != e.grad_view.data_ptr():
                    e.param.grad = e.grad_view
            elif g is not None:
                g.zero_()

    def consolidate_state_dict(self, to: int = 0):
        """Collective (every rank): gather the optimizer state onto rank ``to``, so that
        ``state_dict()`` there needs no communication until the next step, as torch's
        ``ZeroRedundancyOptimizer.consolidate_state_dict(to=0)``. The rank-0 checkpoint of
        nanoGPT and HF Trainer then works:

            opt.consolidate_state_dict(to=0)          # on every rank
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        """
        if not isinstance(to, int) or not 0 <= to < self.world_size:
            raise ValueError(f"to={to!r} is not a rank of this job (0..{self.world_size - 1})")
        data = self._engine.state_bytes()
        step = self._engine.status()["step"]
        self._consolidated = (to, step, data if self.rank == to else None)

    def state_dict(self):
        """``celo2_state_file``: the engine checkpoint's bytes (what ``save`` writes);
        ``param_groups``: the hyperparameters, as torch optimizers keep them. Collective
        (every rank calls it) unless ``consolidate_state_dict(to=r)`` ran on every rank
        since the last step: then rank ``r`` returns the gathered state without
        communicating, and another rank raises (it holds no state)."""
        sd = super().state_dict()
        held = getattr(self, "_consolidated", None)
        if held is not None and held[1] == self._engine.status()["step"]:
            to, _, data = held
            if data is None:
                raise RuntimeError(f"state_dict(): the state was consolidated on rank {to}, not on this "
                                   f"rank ({self.rank}); call state_dict() there, or on every rank "
                                   "without consolidate_state_dict()")
            sd["celo2_state_file"] = data
        else:
            sd["celo2_state_file"] = self._engine.state_bytes()
        sd["celo2"] = {"format": "celo2-optimizer-state/1", "external_lr": self._external_lr,
                       "names": [e.name for e in self._entries], "lr_scales": list(self._scales),
                       "own_weight_decay": list(self._own_wd)}
        return sd

    def load_state_dict(self, state_dict):
        """Collective. Accepts what ``state_dict()`` returned (on any number of ranks) or
        ``{"celo2_state_file": <bytes of an engine checkpoint>}``."""
        if not isinstance(state_dict, dict) or "celo2_state_file" not in state_dict:
            raise ValueError(
                "not a Celo2 state_dict: it has no 'celo2_state_file' (a state_dict of another "
                "optimizer cannot be loaded into Celo2)")
        data = state_dict["celo2_state_file"]
        if isinstance(data, torch.Tensor):
            data = data.cpu().numpy().tobytes()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"celo2_state_file must be bytes, got {type(data).__name__}")
        groups = state_dict.get("param_groups")
        if groups is not None and (not isinstance(groups, list) or len(groups) != len(self.param_groups)):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else '?'} parameter "
                             f"groups, this optimizer {len(self.param_groups)}")
        self._engine.load_state_bytes(bytes(data))
        if groups:
            for mine, saved in zip(self.param_groups, groups):
                for k, v in saved.items():
                    if k not in ("params", "names"):
                        mine[k] = v
        meta = state_dict.get("celo2", {})
        self._external_lr = bool(meta.get("external_lr", False))
        for key, attr in (("lr_scales", "_scales"), ("own_weight_decay", "_own_wd")):
            if isinstance(meta.get(key), list) and len(meta[key]) == len(self.param_groups):
                setattr(self, attr, list(meta[key]))
        self._lr_written = [pg["lr"] for pg in self.param_groups]
        self._wd_written = [pg["weight_decay"] for pg in self.param_groups]
        self._push_groups()

    # ---------------------------------------------------------------- engine extras
    def save(self, path):
        """Collective: the engine checkpoint file (rank 0 writes)."""
        self._engine.save(os.fspath(path))

    def load(self, path):
        """Collective: load an engine checkpoint file (rank 0 reads)."""
        path = os.fspath(path)
        self._engine.load(path)

    def gather_params(self):
        """gather_params=False: every rank's updated slice to every rank (collective)."""
        self._engine.gather_params()

    def local_range(self) -> tuple[int, int]:
        """This rank's slice [lo, hi) of the flat index space (= of ``grad_buffer``)."""
        return tuple(self._engine.local_range())

    def shard_of(self, name: str) -> tuple[int, int]:
        """This rank's part [lo, hi) of one tensor's flattened elements (may be empty)."""
        lo, hi = self.local_range()
        for i, e in enumerate(self._entries):
            if e.name == name:
                off, n = self._engine.offset_of(i), e.param.numel()
                a, b = max(lo, off), min(hi, off + n)
                return (a - off, b - off) if a < b else (0, 0)
        raise KeyError(f"no registered parameter named {name!r}")

    @property
    def grad_buffer(self) -> torch.Tensor:
        return self._grad_buffer

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @property
    def communicator(self):
        return self._engine.communicator

    def status(self) -> dict:
        return self._engine.status()

    def set_weight_decay(self, wd: float):
        """The recipe's weight decay: every group that did not set its own follows it."""
        self._engine.set_weight_decay(wd)
        for gi, pg in enumerate(self.param_groups):
            if not self._own_wd[gi]:
                pg["weight_decay"] = self._wd_written[gi] = wd

    def set_mult_1d(self, m: float):
        self._engine.set_mult_1d(m)
        for pg in self.param_groups:
            pg["mult_1d"] = m

    def set_max_grad_norm(self, v: float):
        """Global gradient-norm clipping threshold (0: off), from the next step on."""
        self._engine.set_max_grad_norm(v)

    @property
    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (averaged gradients, before clipping): what
        ``torch.nn.utils.clip_grad_norm_`` returns."""
        return None if self.last_report is None else self.last_report["grad_norm_total"]

    def __repr__(self):
        st = self._engine.status()
        return (f"Celo2(tensors={st['num_tensors']}, elements={st['total_elements']}, "
                f"rank={st['rank']}/{st['world_size']} ({st['backend']}), schedule={st['schedule']!r})")


def named_parameters_of(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The trainable named parameters of a model, for ``Celo2(...)``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def __getattr__(name):
    # celo2.torch.Celo2CUDA: Celo2 that requires CUDA tensors (celo2/torch_cuda.py), imported lazily.
    if name == "Celo2CUDA":
        from .torch_cuda import Celo2CUDA  # noqa: PLC0415
        return Celo2CUDA
    raise AttributeError(f"module 'celo2.torch' has no attribute {name!r}")
