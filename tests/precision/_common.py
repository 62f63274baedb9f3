"""Helpers shared by the precision tests: state snapshots, small models, training loops."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import singd_rkfac as sr


def flat_state(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor (cloned) and plain value of a nested state, keyed by its dotted path."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flat_state(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out.update(flat_state(value, f"{prefix}{index}."))
    elif isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj.detach().clone()
    else:
        out[prefix.rstrip(".")] = copy.deepcopy(obj)
    return out


def assert_same_state(got: dict[str, Any], want: dict[str, Any], *, what: str = "state") -> None:
    """Same keys; tensors with the same dtype and bit-identical values; plain values equal."""
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for key, value in want.items():
        other = got[key]
        if isinstance(value, Tensor):
            assert isinstance(other, Tensor), (what, key)
            assert other.dtype == value.dtype, (what, key, other.dtype, value.dtype)
            assert torch.equal(other, value), (what, key)
        else:
            assert other == value, (what, key, other, value)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters plus the optimizer's whole state (update-rule buffers and curvature), cloned."""
    state = flat_state(opt.state_dict(), "opt.")
    state.update({f"param.{name}": p.detach().clone() for name, p in model.named_parameters()})
    return state


def curvature_tensors(pre: sr.Preconditioner) -> dict[str, Tensor]:
    """Every tensor of every managed layer's curvature state, keyed ``layer.key``."""
    return {
        f"{name}.{key}": value
        for name, m in pre.layers.items()
        for key, value in m.curvature.state_dict().items()
        if isinstance(value, Tensor)
    }


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(got: Iterable[Tensor], want: Iterable[Tensor], where: str = "") -> None:
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"parameter {index} differs {where}"


def wide_mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """24 → 20 → 16 → 3: wide enough for Brand (rank + rows < dim) with batches of 6 and rank 4."""
    return nn.Sequential(
        nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)


def deep_mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Four linear layers 6 → 7 → 7 → 5 → 3."""
    return nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def single_layer(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """One linear layer 6 → 3."""
    return nn.Sequential(nn.Linear(6, 3)).to(dtype)


class HostSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (the op behind ``.item()``, ``bool(t)``, ``float(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class GradPoison:
    """A gradient hook on ``param`` that writes ``value`` into one entry while armed."""

    def __init__(self, param: nn.Parameter, value: float) -> None:
        self.armed = False
        self.value = value
        self.handle = param.register_hook(self._hook)

    def _hook(self, grad: Tensor) -> Tensor:
        if not self.armed:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = self.value
        return grad

    def remove(self) -> None:
        self.handle.remove()
