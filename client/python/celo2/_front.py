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
            add(item, {}, i)
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

    def _step_args(self, loss):
        """(lr for the engine, or None to follow its schedule; loss as a float or None)."""
        lr = self.param_groups[0]["lr"]
        if not self._external_lr and lr != self._lr_written:
            self._external_lr = True
        if self._external_lr and (not _is_number(lr) or lr < 0):
            raise ValueError(f"param_groups[0]['lr'] = {lr!r} is not a finite number >= 0")
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        return (float(lr) if self._external_lr else None), loss_value

    def _record(self, report, seconds):
        self.param_groups[0]["lr"] = report["lr"]
        self._lr_written = report["lr"]
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


