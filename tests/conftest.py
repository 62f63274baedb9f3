"""Shared fixtures: small deterministic models and batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (restored after).

    Extra OpenMP threads only synchronise on tiny matrices; on a busy 2-core
    machine a second thread makes them 10–100× slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(dtype: torch.dtype = torch.float64, inplace: bool = False) -> nn.Sequential:
    """A small tanh/ReLU MLP: 6 → 7 → 5 → 3."""
    return nn.Sequential(
        nn.Linear(6, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def cnn(dtype: torch.dtype = torch.float64, **conv_kwargs) -> nn.Sequential:
    """Conv2d(2→3) with the given kwargs, ReLU, flatten, Linear(→4), on 2×8×8 inputs."""
    conv = nn.Conv2d(2, 3, **{"kernel_size": 3, **conv_kwargs})
    with torch.no_grad():
        features = conv(torch.zeros(1, 2, 8, 8)).numel()
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 4)).to(dtype)


def classification_batch(n: int, shape: tuple[int, ...], classes: int, dtype=torch.float64):
    """Inputs ``(n, *shape)`` and integer labels."""
    return torch.randn(n, *shape, dtype=dtype), torch.randint(0, classes, (n,))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    """One cross-entropy step per ``(x, y)`` batch; the losses."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def backward_and_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """``loss.backward(); opt.step()``, or the `GradScaler` loop's scale / step / update."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
