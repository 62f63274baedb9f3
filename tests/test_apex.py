"""NVIDIA apex fused optimizers behind `sr.Preconditioner` (optional: skipped without apex and CUDA)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import singd_rkfac as sr

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("apex") is None or not torch.cuda.is_available(),
    reason="needs NVIDIA apex and a CUDA device",
)


@pytest.mark.parametrize("method", [sr.KFAC(inverse_every=2), sr.SINGD(update_every=1)], ids=["kfac", "singd"])
def test_preconditioner_with_apex_fused_sgd_equals_torch_sgd(method):
    """Under a GradScaler, ``Preconditioner`` + apex ``FusedSGD`` takes the steps of ``Preconditioner`` + ``torch.optim.SGD``."""
    from apex.optimizers import FusedSGD

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).cuda()
    batches = [(torch.randn(32, 16, device="cuda"), torch.randint(0, 4, (32,), device="cuda")) for _ in range(5)]
    results = []
    for make in (lambda p: FusedSGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)):
        model = copy.deepcopy(base)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
        pre = sr.Preconditioner(model, sr.Policy(method), grad_scaler=scaler)
        opt = make(model.parameters())
        for x, y in batches:
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            pre.step()
            scaler.step(opt)
            scaler.update()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
