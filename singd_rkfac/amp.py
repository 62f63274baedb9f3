"""AMP bookkeeping: the loss scale statistics were captured under, fused inf checks.

DESIGN §4. Curvature statistics are captured in the backward pass, so under a
`torch.amp.GradScaler` the output gradients carry the loss scale ``s`` and
every G-side statistic carries ``s²``; the curvature divides by it when the
statistics are folded (exact: scales are powers of two). So that a large scale
(it keeps growing while gradients stay finite) cannot overflow the statistics,
the capture multiplies output gradients by ``1/s`` first — the scaler's current
scale when the optimizer was given ``grad_scaler=``, else the previous step's —
leaving at most the step-to-step ratio of scales in them. Gradients are checked
for inf/NaN with PyTorch's fused multi-tensor kernel — one launch per device,
no per-layer host synchronisation; the caller reads the single flag once per
step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["effective_scale", "inverse_scale", "loss_scale", "unscale_and_check_"]


def loss_scale(grad_scaler: "torch.amp.GradScaler | None") -> Tensor | None:
    """The scaler's current scale as a 1-element tensor (no host sync), or ``None`` if off.

    Between ``scaler.scale(loss).backward()`` and ``scaler.update()`` this is
    the scale the backward pass ran under.
    """
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    getter = getattr(grad_scaler, "_get_scale_async", None)  # the tensor itself, without .item()
    scale = getter() if getter is not None else None
    if scale is None:  # no backward has been scaled yet: the scale the next one will use
        scale = torch.tensor([grad_scaler.get_scale()], dtype=torch.float32)  # GradScaler's own scale dtype
    return scale


def inverse_scale(grad_scaler: "torch.amp.GradScaler | None") -> Tensor | None:
    """``1/s`` of the scaler's current scale (exact: a power of two), or ``None`` when there is none."""
    scale = loss_scale(grad_scaler)
    return None if scale is None else scale.double().reciprocal().float()


def effective_scale(loss_scale: Tensor | None, prescale: Tensor | None) -> Tensor:
    """The scale statistics carry: the loss scale times the prescale the capture applied (both optional)."""
    if prescale is None:
        return loss_scale
    return prescale if loss_scale is None else loss_scale.to(prescale.device) * prescale


def unscale_and_check_(grads: Iterable[Tensor], inv_scale: Tensor | None = None) -> Tensor:
    """Multiply ``grads`` in place by ``inv_scale`` (if given) and flag any non-finite entry.

    Returns a 0-d float32 tensor (whatever the default dtype: the fused kernel takes float32
    flags and scales only), ``> 0`` when some gradient held inf/NaN, on the first gradient's
    device (CPU when there are none). One fused kernel per device.
    """
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for grad in grads:
        by_device[grad.device].append(grad)
    flags = []
    for device, tensors in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=device)  # the fused kernel demands float32 flag and scale
        inverse = torch.ones(1, dtype=torch.float32, device=device) if inv_scale is None else inv_scale.to(device, torch.float32).reshape(1)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inverse)
        flags.append(found)
    if not flags:
        return torch.zeros((), dtype=torch.float32)
    first = flags[0].device
    return sum(flag.to(first) for flag in flags).reshape(())
