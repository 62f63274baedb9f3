"""Statistics capture: forward hooks that install tensor hooks on layer outputs.

A forward hook keeps a reference to the layer's input (autograd keeps it alive
anyway) and registers a hook on the *output tensor*; when the output gradient
arrives, the pair becomes factor rows ``(a, g)`` for the curvature. A tensor
hook rather than a full-backward module hook, so in-place activations after
the layer work. Nothing is captured in ``eval()``, under ``torch.no_grad()``,
or on steps where the layer's method takes no statistics.

Micro-batches (several forward/backward passes before one ``step()``) add up.
A module called several times in one forward pass is weight sharing across
calls: with K-FAC-expand every call adds rows and the samples count once; with
K-FAC-reduce the per-sample pooling would have to span calls, so a second
call raises a clear error instead of being silently wrong.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import amp
from .curvature import BatchCounts
from .curvature.tied import TiedCounts
from .layers import Layer

__all__ = ["ForwardPasses", "LayerCapture", "TiedCapture"]


class ForwardPasses:
    """Numbers the forward passes of the root model (a pre-hook on it)."""

    def __init__(self, model: nn.Module) -> None:
        self.current = 0
        self._handle = model.register_forward_pre_hook(self._next)

    def _next(self, module: nn.Module, args: tuple) -> None:
        self.current += 1

    def remove(self) -> None:
        self._handle.remove()


class LayerCapture:
    """Feeds the ``(a, g)`` rows of every used call of one layer to ``sink``.

    Args:
        name: qualified module name (for error messages).
        layer: the module's adapter.
        approx: row layout, ``"expand"``, ``"reduce"`` or ``"sample"`` (`share_weights`).
        dtype: dtype of the rows handed to ``sink`` (the curvature's dtype).
        sink: ``sink(a, g)`` with ``a`` ``(m, d_a)`` and ``g`` ``(m, d_g)`` (``"sample"``:
            ``(batch, positions, d)``); a layer whose ``A`` is diagonal by construction
            (`LayerDims.diagonal_a`) hands over ``a`` as ``diag(aᵀa)``, ``(d_a,)``.
        passes: the root model's forward-pass counter.
    """

    def __init__(
        self,
        name: str,
        layer: Layer,
        approx: str,
        dtype: torch.dtype,
        sink: Callable[[Tensor, Tensor], None],
        passes: ForwardPasses,
    ) -> None:
        self.name = name
        self.layer = layer
        self.approx = approx
        self.dtype = dtype
        self.sink = sink
        self.passes = passes
        #: Whether the next forward passes are statistics passes (set by the preconditioner).
        self.active = True
        #: ``1/s`` of the AMP loss scale (a 1-element tensor) applied to output gradients before
        #: any product, so statistics under a large scale cannot overflow (exact: s is a power of 2):
        #: the scaler's current one when known, else the previous step's (set by the preconditioner).
        self.g_prescale: Tensor | None = None
        #: The loop's GradScaler, when the user gave it.
        self.grad_scaler: torch.amp.GradScaler | None = None
        self._rows = 0
        self._samples = 0
        self._last_forward = -1
        self._last_counted = -1
        self._handle: RemovableHandle = layer.module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if not (self.active and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not args:
            return
        forward = self.passes.current
        if self.approx != "expand" and forward == self._last_forward:
            what = "kfac_approx='reduce' pools" if self.approx == "reduce" else "per-sample gradients (SENG, two-level) pool"
            raise RuntimeError(
                f"layer {self.name!r} was called more than once in one forward pass; "
                f"{what} positions per sample and cannot span calls. "
                "Use a method with kfac_approx='expand' for this layer, or sr.Skip()."
            )
        self._last_forward = forward
        output.register_hook(partial(self._on_grad, inputs=args[0].detach(), forward=forward))

    def _on_grad(self, grad_output: Tensor, *, inputs: Tensor, forward: int) -> None:
        a = self.layer.input_rows(inputs, self.approx, self.dtype)
        grad_output = grad_output.detach()
        if self.grad_scaler is not None:
            self.g_prescale = amp.inverse_scale(self.grad_scaler)
        if self.g_prescale is not None:
            grad_output = grad_output * self.g_prescale.to(grad_output.device)
        g = self.layer.output_rows(grad_output, self.approx, self.dtype)
        self.sink(a, g)
        self._rows += g.shape[0]
        if forward != self._last_counted:
            self._last_counted = forward
            self._samples += self.layer.batch_size(inputs)

    def take(self) -> BatchCounts | None:
        """Counts of what was staged since the last call, or ``None`` if nothing; resets them."""
        counts = BatchCounts(rows=self._rows, samples=self._samples) if self._rows else None
        self._rows = self._samples = 0
        return counts

    def remove(self) -> None:
        self._handle.remove()


class TiedCapture:
    """The captures of a tied weight's uses, driven as one (`LayerCapture`'s interface).

    Each use's capture stages its rows with ``stage(use, a, g)``; `take`
    returns the totals with each use's own counts (`TiedCounts`).
    """

    def __init__(self, captures: list[LayerCapture]) -> None:
        self.captures = captures

    @property
    def active(self) -> bool:
        return self.captures[0].active

    @active.setter
    def active(self, value: bool) -> None:
        for capture in self.captures:
            capture.active = value

    @property
    def g_prescale(self) -> Tensor | None:
        return self.captures[0].g_prescale

    @g_prescale.setter
    def g_prescale(self, value: Tensor | None) -> None:
        for capture in self.captures:
            capture.g_prescale = value

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.captures[0].grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, value: torch.amp.GradScaler | None) -> None:
        for capture in self.captures:
            capture.grad_scaler = value

    def take(self) -> TiedCounts | None:
        uses = tuple(capture.take() for capture in self.captures)
        present = [c for c in uses if c is not None]
        if not present:
            return None
        return TiedCounts(rows=sum(c.rows for c in present), samples=max(c.samples for c in present), uses=uses)

    def remove(self) -> None:
        for capture in self.captures:
            capture.remove()
