"""What ``celo2.torch.Celo2`` and ``celo2.torch_cuda.Celo2CUDA`` share: argument checks,
the parameter list walk, and the engine front (settings, control plane, rank, the
learning-rate bookkeeping of ``step()``). Both modules import this one; neither imports the
other at import time (``Celo2`` imports ``torch_cuda`` only when given CUDA tensors)."""
from __future__ import annotations

import math
import os

import torch

_GRADS = ("local", "reduced", "sharded")
_VARIANTS = ("celo2", "celo2-base")
_NAN = ("skip", "error", "zero")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _named(params) -> list[tuple[str, torch.Tensor, dict]]:
    """(name, tensor, group options) for every parameter, from a module, named_parameters(),
    a list of tensors or a list of parameter-group dicts."""
    if isinstance(params, torch.nn.Module):
        params = params.named_parameters()
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, "
                        "not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("Celo2 got an empty parameter list")
    out: list[tuple[str, torch.Tensor, dict]] = []

    def add(item, group, index):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, t = item
        elif isinstance(item, torch.Tensor):
            name, t = f"params.{index}", item
        else:
            raise TypeError(f"parameter {index}: expected a tensor or a (name, tensor) pair, got "
                            f"{type(item).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"parameter {name!r}: expected a tensor, got {type(t).__name__}")
        out.append((name, t, group))

    default: dict = {}  # the one group of parameters given outside group dicts
    for i, item in enumerate(items):
        if isinstance(item, dict):
            group = {k: v for k, v in item.items() if k != "params"}
            if "params" not in item:
                raise ValueError(f"parameter group {i} has no 'params'")
            ps = item["params"]
            if isinstance(ps, torch.nn.Module):
                ps = ps.named_parameters()
            if isinstance(ps, torch.Tensor):
                ps = [ps]
            for j, p in enumerate(list(ps)):
                add(p, group, len(out) if not isinstance(p, tuple) else j)
        else:
            add(item, default, i)
    names, seen = set(), set()
    for name, t, _ in out:
        if name in names:
            raise ValueError(f"parameter name {name!r} appears twice")
        if id(t) in seen:
            raise ValueError(f"parameter {name!r} appears twice (the same tensor under two names)")
        names.add(name)
        seen.add(id(t))
    return out


class _EngineFront:
    """What both optimizers share over their engine (``self._engine``): the settings, the
    control plane, the rank, and the learning-rate bookkeeping of ``step()``."""

    # ---- learning rates and decays of the param groups (self._scales, self._own_wd, set by
    # the optimizer) -------------------------------------------------------------------
    def _push_groups(self):
        """Sends each group's lr scale and weight decay (None: the recipe's) to the engine for
        its tensors, where they changed."""
        for gi, pg in enumerate(self.param_groups):
            if pg["weight_decay"] != self._wd_written[gi]:
                wd = pg["weight_decay"]
                if not _is_number(wd) or wd < 0:
                    raise ValueError(f"param_groups[{gi}]['weight_decay'] = {wd!r} is not a finite number >= 0")
                self._own_wd[gi] = True  # the trainer set it
                self._wd_written[gi] = wd
            key = (self._scales[gi], float(pg["weight_decay"]) if self._own_wd[gi] else None)
            if key != self._pushed[gi]:
                for e in self._entries:
                    if e.group == gi:
                        self._engine.set_group(e.name, key[0], key[1])
                self._pushed[gi] = key

    def _write_lrs(self, lr):
        """The groups' lr after a step at the schedule's rate `lr`."""
        for gi, pg in enumerate(self.param_groups):
            pg["lr"] = lr * self._scales[gi]
        self._lr_written = [pg["lr"] for pg in self.param_groups]

    def _step_args(self, loss):
        """(lr for the engine, or None to follow its schedule; loss as a float or None). A
        group lr changed from outside switches to following the groups' lr values: the
        engine steps at the first group's (or the largest) and each group's scale is its
        ratio to that."""
        lrs = [pg["lr"] for pg in self.param_groups]
        if not self._external_lr and lrs != self._lr_written:
            self._external_lr = True
        step_lr = None
        if self._external_lr:
            for gi, lr in enumerate(lrs):
                if not _is_number(lr) or lr < 0:
                    raise ValueError(f"param_groups[{gi}]['lr'] = {lr!r} is not a finite number >= 0")
            step_lr = float(lrs[0] if lrs[0] > 0 else max(lrs))
            if step_lr > 0:
                self._scales = [lr / step_lr for lr in lrs]
        self._push_groups()
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        return step_lr, loss_value

    def _record(self, report, seconds):
        if self._external_lr:
            self._lr_written = [pg["lr"] for pg in self.param_groups]
        else:
            self._write_lrs(report["lr"])
        self.last_report = report
        self.last_step_seconds = seconds

    @property
    def rank(self) -> int:
        return self._engine.rank

    @property
    def world_size(self) -> int:
        return self._engine.world_size

    @property
    def control_address(self) -> str:
        return self._engine.control_address

    def start_control(self) -> str:
        """Collective: start the control plane now (else at the first step); its address."""
        self._engine.start_control()
        return self._engine.control_address

    def set_schedule(self, text: str):
        self._engine.set_schedule(text)
        self._external_lr = False
        self._lr_written = [pg["lr"] for pg in self.param_groups]

    def set_rules(self, text: str):
        self._engine.set_rules(text)

    def set_theta(self, path):
        self._engine.set_theta_file(os.fspath(path))

    def routing_table(self) -> str:
        return self._engine.routing_table()

    def plan_report(self) -> str:
        return self._engine.plan_report()

    def phase_seconds(self) -> dict:
        return dict(self._engine.phase_seconds())


