"""The preconditioner: owns the managed layers, their hooks, schedules and state.

`Preconditioner` can be used on its own (its `step`
overwrites ``.grad`` of the managed parameters, so any optimizer can take the
step) and is the engine inside `Optimizer`.
"""

from __future__ import annotations

import warnings
from functools import partial
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._table import format_bytes, format_table
from . import amp
from .capture import ForwardPasses, LayerCapture, TiedCapture
from . import distributed
from .curvature import BatchCounts, Curvature, curvature_class
from .curvature.tied import TiedCurvature
from .layers import Layer
from .layers.tied import TiedLayer
from .methods import CurvatureMethod, TwoLevel
from .policy import DESCRIBE_COLUMNS, LayerPlan, Policy, fallback_row, plan_layer, tied_row
from .twolevel import CoarseCorrection

__all__ = ["Preconditioner", "ManagedLayer", "LARGE_STATE_BYTES"]

#: Estimated curvature state of one layer above which construction warns (before allocating it).
LARGE_STATE_BYTES = 2**30


def _warn_large_state(plans: list[LayerPlan]) -> None:
    """One warning naming every layer whose method will hold more than `LARGE_STATE_BYTES` (a dense vocabulary factor)."""
    large = []
    for plan in plans:
        if not plan.manages:
            continue
        layer = plan_layer(plan)
        implementation = curvature_class(plan.method)
        size = implementation.estimate_bytes(plan.method, layer.dims, implementation.state_dtype(plan.method, layer.weight.dtype))
        if size > LARGE_STATE_BYTES:
            large.append(f"{plan.name} ({layer.shape_text}, {plan.method.summary()}: {format_bytes(size)})")
    if large:
        warnings.warn(
            "these layers will hold more than 1 GiB of curvature state each: " + "; ".join(large)
            + ". Factors chosen by width (sr.KFAC(a='auto', g='auto'), the default policy) or a diagonal / low-rank "
            "representation keep vocabulary-sized sides linear in their width",
            UserWarning,
            stacklevel=4,
        )


@dataclass
class ManagedLayer:
    """One managed module: its adapter, method, curvature state and hooks."""

    name: str
    layer: Layer | TiedLayer
    method: CurvatureMethod
    curvature: Curvature
    capture: LayerCapture | TiedCapture
    warned_no_statistics: bool = False


class Preconditioner:
    """Kronecker-factored preconditioning of a model's managed layers.

    Args:
        model: the network (hooks are installed on its managed modules).
        policy: which method each layer gets (default: ``Policy()``, K-FAC everywhere).
        max_decomposition_failures: consecutive failed decompositions of one
            layer after which a `DecompositionError` is raised.
        grad_scaler: the `torch.amp.GradScaler` of the training loop, if any:
            statistics captured under its loss scale are unscaled exactly.
        process_group: distributed training (see ``docs/distributed.md``).
            ``None`` (default): automatic — the group of a
            ``DistributedDataParallel`` ``model``, else the default group when
            ``torch.distributed`` is initialized with more than one rank;
            ``False``: one process regardless; ``True``: the default group; or
            a ``ProcessGroup``. Statistics are averaged over the group, each
            layer's decompositions / SINGD updates run on one rank and are
            broadcast, and every rank ends each step with identical parameters.
        grad_worker_fraction: KAISA's trade-off of memory for communication:
            ``1`` (COMM-OPT: every rank keeps every preconditioner; owners
            broadcast decompositions when they refresh them) or ``1/world``
            (MEM-OPT: each K-FAC-family layer's decompositions stay on its
            owner, which broadcasts the preconditioned gradient every step;
            checkpoints are then per rank). Other values raise ``ValueError``.
        two_level: a `sr.TwoLevel` adds two-level K-FAC's cross-layer coarse
            correction on top of every managed layer's own method (one process
            only); ``None`` (default) = off.

    Call `step` after ``backward()`` and before the optimizer's step. The
    gradients may still be scaled (preconditioning is linear; the scaler's
    ``step`` unscales them) or already unscaled by ``scaler.unscale_``. A
    step whose managed gradients hold inf/NaN folds no statistics and leaves
    the gradients for the scaler to skip (without a scaler it warns).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | None = None,
        *,
        max_decomposition_failures: int = 10,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        grad_worker_fraction: float = 1.0,
        two_level: TwoLevel | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a sr.Policy (got {type(policy).__name__})")
        if isinstance(max_decomposition_failures, bool) or not isinstance(max_decomposition_failures, int) or max_decomposition_failures < 1:
            raise ValueError(f"max_decomposition_failures must be an integer >= 1 (got {max_decomposition_failures!r})")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None (got {type(grad_scaler).__name__})")
        if two_level is not None and not isinstance(two_level, TwoLevel):
            raise ValueError(f"two_level must be a sr.TwoLevel or None (got {type(two_level).__name__})")
        # distributed: hooks and layer names belong to the module inside a DDP wrapper
        wrapper, model = model, distributed.unwrap(model)
        group = distributed.resolve_group(wrapper, process_group)
        if group is None:  # one process: only 1 (in a group, the driver checks it after the plan check)
            distributed.check_grad_worker_fraction(grad_worker_fraction, world=1)
        elif two_level is not None:
            raise ValueError("two_level does not support multi-process training yet (use process_group=False on one process)")
        self.model = model
        self.policy = Policy() if policy is None else policy
        self.grad_scaler = grad_scaler
        self.steps = 0
        #: Steps skipped because a gradient held inf/NaN.
        self.skipped_steps = 0
        self._passes = ForwardPasses(model)
        plans = self.policy.plan(model)
        _warn_large_state(plans)
        self.layers: dict[str, ManagedLayer] = {
            p.name: self._manage(p, max_decomposition_failures) for p in plans if p.manages
        }
        self.fallback_plans: list[LayerPlan] = [p for p in plans if p.method is None]
        #: Uses of tied weights served by another module's layer (`LayerPlan.tied_to`).
        self.tied_plans: list[LayerPlan] = [p for p in plans if p.tied_to is not None]
        #: Two-level K-FAC's coarse correction, or ``None``.
        self.two_level: CoarseCorrection | None = None
        if two_level is not None:
            try:
                self.two_level = CoarseCorrection(two_level, self.layers, self._passes, grad_scaler, max_decomposition_failures)
            except Exception:
                self.remove()
                raise
        unexpected = [f"{p.name or '(root)'} ({p.note})" for p in plans if p.warn and p.method is None]
        if unexpected:
            warnings.warn("these modules go to the fallback rule: " + "; ".join(unexpected), UserWarning, stacklevel=3)
        overruled = [f"{p.name} ({p.note})" for p in plans if p.warn and p.method is not None]
        if overruled:
            warnings.warn("tied weights: " + "; ".join(overruled), UserWarning, stacklevel=3)
        self._schedule_capture()
        #: The multi-process driver (`singd_rkfac.distributed.Distributed`), ``None`` in one process.
        self.distributed = None
        if group is not None:
            try:
                self.distributed = distributed.Distributed(self, group, grad_worker_fraction)
            except Exception:
                self.remove()  # a failed construction leaves no hooks behind
                raise

    def _manage(self, plan: LayerPlan, max_failures: int) -> ManagedLayer:
        layer = plan_layer(plan)
        method = plan.method
        implementation = curvature_class(method)
        dtype = implementation.state_dtype(method, layer.weight.dtype)
        curvature: Curvature = implementation(
            method, layer.dims, device=layer.weight.device, dtype=dtype, name=plan.name, max_failures=max_failures
        )
        capture: LayerCapture | TiedCapture
        if isinstance(layer, TiedLayer):  # one curvature, one capture per use staging into it
            curvature = TiedCurvature(curvature, layer.uses)
            capture = TiedCapture([
                LayerCapture(use.name, use.layer, method.row_layout, dtype, partial(curvature.stage, i), self._passes)
                for i, use in enumerate(layer.uses)
            ])
        else:
            capture = LayerCapture(plan.name, layer, method.row_layout, dtype, curvature.accumulate, self._passes)
        capture.grad_scaler = self.grad_scaler
        return ManagedLayer(plan.name, layer, method, curvature, capture)

    # -- parameters -----------------------------------------------------------
    def managed_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of every managed layer, by layer name."""
        return {name: m.layer.params for name, m in self.layers.items()}

    def fallback_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the managed layers (for the fallback rule)."""
        managed = {id(p) for m in self.layers.values() for p in m.layer.params}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in managed]

    # -- the step ---------------------------------------------------------------
    def _schedule_capture(self) -> None:
        for m in self.layers.values():
            m.capture.active = self.steps % m.method.statistics_every == 0
        if self.two_level is not None:
            self.two_level.schedule(self.steps)

    @torch.no_grad()
    def step(self) -> bool:
        """Fold statistics, refresh what is due, overwrite ``.grad`` with preconditioned gradients.

        Returns ``False`` (and changes nothing but dropping this step's
        statistics) when a managed gradient holds inf/NaN. One fused check and
        one host sync per step, none per layer.
        """
        grads = [p.grad for params in self.managed_parameters().values() for p in params if p.grad is not None]
        if self.found_nonfinite(amp.unscale_and_check_(grads)):
            self.skip_nonfinite(warn=self.grad_scaler is None)
            return False
        self.precondition(loss_scale=amp.loss_scale(self.grad_scaler))
        return True

    def found_nonfinite(self, found: Tensor) -> bool:
        """Read this step's non-finite flag (``found > 0``): the step's one host sync.

        Distributed, the flag is combined over ranks first (together with the
        statistics' row counts), so that every rank skips when any must.
        """
        if self.distributed is None:
            return bool(found)
        return self.distributed.agree(found, self)

    def skip_nonfinite(self, *, warn: bool) -> None:
        """Drop this step's statistics after a non-finite gradient (warning when nobody else will say so)."""
        self.skip()
        self.skipped_steps += 1
        if warn:
            warnings.warn(
                f"non-finite gradient at step {self.steps}: step skipped, curvature and parameters "
                f"unchanged ({self.skipped_steps} skipped so far)",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def precondition(self, *, inner_products: bool = False, loss_scale: Tensor | None = None) -> dict[str, Tensor]:
        """Fold statistics, refresh, precondition; optionally return ``⟨V, ∇⟩`` per layer.

        ``loss_scale`` is the AMP scale the backward pass ran under (statistics
        are unscaled by it). The inner products (0-d tensors, no host sync)
        serve the optimizer's KL-style clipping.
        """
        if self.distributed is not None:  # statistics, work and results shared across ranks
            inner = self.distributed.precondition(self, inner_products=inner_products, loss_scale=loss_scale)
        elif self.two_level is not None:
            inner = self._precondition_two_level(inner_products, loss_scale)
        else:
            inner = {}
            for m in self.layers.values():
                m.curvature.update(self.steps, self.step_counts(m.capture, m.capture.take(), loss_scale))
                self.precondition_layer(m, inner_products, inner)
        self.steps += 1
        self._schedule_capture()
        return inner

    def _precondition_two_level(self, inner_products: bool, loss_scale: Tensor | None) -> dict[str, Tensor]:
        """Every layer's own direction, then two-level K-FAC's coarse correction across them."""
        assert self.two_level is not None
        grads, directions = {}, {}
        for name, m in self.layers.items():
            m.curvature.update(self.steps, self.step_counts(m.capture, m.capture.take(), loss_scale))
            grad = self.layer_gradient(m)
            if grad is not None:
                grads[name], directions[name] = grad, m.curvature.precondition(grad)
        counts = {name: self.step_counts(c, c.take(), loss_scale) for name, c in self.two_level.captures.items()}
        directions = self.two_level.correct(grads, directions, counts)
        inner: dict[str, Tensor] = {}
        for name, direction in directions.items():
            self.write_direction(self.layers[name], grads[name], direction, inner_products, inner)
        return inner

    def step_counts(self, capture: LayerCapture, counts: BatchCounts | None, loss_scale: Tensor | None) -> BatchCounts | None:
        """This step's counts of a capture's staged statistics, with the scale they carry (AMP)."""
        if counts is not None and (loss_scale is not None or capture.g_prescale is not None):
            counts = replace(counts, loss_scale=amp.effective_scale(loss_scale, capture.g_prescale))
        capture.g_prescale = None if loss_scale is None else loss_scale.double().reciprocal().float()
        return counts

    def layer_gradient(self, m: ManagedLayer) -> Tensor | None:
        """The layer's ``(d_g, d_a)`` gradient matrix if it can be preconditioned (a gradient and statistics)."""
        grad = m.layer.grad_matrix()
        if grad is None:
            return None
        if not m.curvature.ready:
            self._warn_no_statistics(m)
            return None
        return grad

    def write_direction(
        self, m: ManagedLayer, grad: Tensor, direction: Tensor, inner_products: bool, inner: dict[str, Tensor]
    ) -> None:
        """Overwrite a layer's gradient with ``direction`` (and note ``⟨direction, ∇⟩``)."""
        if inner_products:
            work = torch.promote_types(direction.dtype, torch.float32)
            inner[m.name] = torch.vdot(direction.reshape(-1).to(work), grad.reshape(-1).to(work))
        m.layer.write_grad(direction)

    def precondition_layer(
        self, m: ManagedLayer, inner_products: bool, inner: dict[str, Tensor], direction: Tensor | None = None
    ) -> None:
        """Overwrite a layer's gradient with the preconditioned one (and note ``⟨V, ∇⟩``).

        ``direction``: the preconditioned gradient computed elsewhere (MEM-OPT:
        by the layer's owner), used instead of applying the curvature here.
        """
        if direction is None and self._scale_in_place(m, inner_products, inner):
            return
        grad = self.layer_gradient(m)
        if grad is None:
            return
        if direction is None:
            direction = m.curvature.precondition(grad)
        self.write_direction(m, grad, direction, inner_products, inner)

    @staticmethod
    def _scale_in_place(m: ManagedLayer, inner_products: bool, inner: dict[str, Tensor]) -> bool:
        """``∇ ← diag(r)² ∇ diag(c)²`` on the gradient's own memory when the curvature allows it.

        Returns whether it did. ``⟨V, ∇⟩ = ‖diag(r) ∇ diag(c)‖²`` is read
        halfway. fp16 gradients take the copying path, which stages in fp32.
        """
        factors = m.curvature.elementwise_factors()
        parts = m.layer.grad_parts() if factors is not None and m.curvature.ready else None
        if parts is None or parts[0].dtype == torch.float16:
            return False
        weight, bias = parts
        rows, cols = (f.to(weight.dtype) for f in factors)  # type: ignore[union-attr]
        d_in = weight.shape[1]

        def scale(r: Tensor, c: Tensor) -> None:
            weight.mul_(c[:d_in]).mul_(r.unsqueeze(1))
            if bias is not None:
                bias.mul_(r * c[d_in])

        if not inner_products:
            scale(rows.square(), cols.square())
            return True
        scale(rows, cols)
        work = torch.promote_types(weight.dtype, torch.float32)
        parts = [weight] if bias is None else [weight, bias]  # any strides: a norm reads views without copying
        inner[m.name] = sum(torch.linalg.vector_norm(t, dtype=work).square() for t in parts)
        scale(rows, cols)
        return True

    def skip(self) -> None:
        """Drop the statistics captured since the last step; change nothing else."""
        for m in self.layers.values():
            m.capture.take()
            m.curvature.discard()
        if self.two_level is not None:
            self.two_level.discard()

    @staticmethod
    def _warn_no_statistics(m: ManagedLayer) -> None:
        if not m.warned_no_statistics:
            m.warned_no_statistics = True
            warnings.warn(
                f"layer {m.name!r} has a gradient but no curvature statistics yet "
                "(is it used through a functional path rather than called?); its "
                "gradient is used without preconditioning until statistics arrive",
                UserWarning,
                stacklevel=4,
            )

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step counter and each layer's curvature state.

        Under MEM-OPT (``grad_worker_fraction = 1/world``) a rank holds the
        decompositions of the layers it owns only: each rank saves its own
        state (``"without_preconditioner"`` lists the layers it lacks) and
        loads it back.
        """
        state: dict[str, Any] = {
            "steps": self.steps,
            "layers": {
                name: {"method": m.method.summary(), "curvature": m.curvature.state_dict()}
                for name, m in self.layers.items()
            },
        }
        if self.two_level is not None:
            state["two_level"] = self.two_level.state_dict()
        if self.distributed is not None and self.distributed.memory_split:
            driver = self.distributed
            state["without_preconditioner"] = [name for name in self.layers if not driver.holds_preconditioner(name)]
            state["saved_by"] = {"rank": driver.rank, "world": driver.world}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; layers and methods must match.

        A MEM-OPT state (saved per rank) loads only where it holds every
        decomposition this preconditioner needs: on the rank that saved it,
        with the same world size and policy.
        """
        saved = state["layers"]
        if set(saved) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(saved)), sorted(set(saved) - set(self.layers))
            raise ValueError(
                f"checkpoint does not match the managed layers: missing {missing}, unexpected {extra}"
            )
        for name, m in self.layers.items():
            if saved[name]["method"] != m.method.summary():
                raise ValueError(
                    f"layer {name!r}: checkpoint was made with {saved[name]['method']}, "
                    f"this preconditioner uses {m.method.summary()}"
                )
        lacking = set(state.get("without_preconditioner", ()))
        needed = [name for name in self.layers if self.distributed is None or self.distributed.holds_preconditioner(name)]
        missing = [name for name in needed if name in lacking]
        if missing:
            by = state.get("saved_by", {})
            raise ValueError(
                f"checkpoint was saved by rank {by.get('rank', '?')} of {by.get('world', '?')} under MEM-OPT "
                f"(grad_worker_fraction = 1/world) and lacks the preconditioners of layers {missing}, which this "
                "process needs: under MEM-OPT every rank saves its own state and loads it back "
                "(same world size and policy)"
            )
        if ("two_level" in state) != (self.two_level is not None):
            raise ValueError(
                "checkpoint and preconditioner disagree on two_level: saved "
                f"{'with' if 'two_level' in state else 'without'} it, this preconditioner runs "
                f"{'with' if self.two_level is not None else 'without'} it"
            )
        if self.two_level is not None:
            self.two_level.load_state_dict(state["two_level"])
        for name, m in self.layers.items():
            m.curvature.load_state_dict(saved[name]["curvature"])
            if name not in needed:  # MEM-OPT, a layer another rank owns: keep no decomposition of it
                m.curvature.release()
        self.steps = int(state["steps"])
        self._schedule_capture()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of persistent curvature state per managed layer (and ``"(two-level)"`` for the coarse space)."""
        sizes = {name: m.curvature.memory_bytes() for name, m in self.layers.items()}
        if self.two_level is not None:
            sizes["(two-level)"] = self.two_level.memory_bytes()
        return sizes

    def describe(self) -> str:
        """Table of managed layers (method, actual state bytes) and fallback modules."""
        rows = []
        for name, m in self.layers.items():
            note = m.curvature.note()
            if not m.curvature.ready:
                note = (note + "; " if note else "") + "no statistics yet"
            rows.append(
                [name, type(m.layer.module).__name__, m.layer.adapter_text, m.layer.shape_text, m.method.summary(),
                 format_bytes(m.curvature.memory_bytes()), note]
            )
        rows.extend(tied_row(p) for p in self.tied_plans)
        rows.extend(fallback_row(p) for p in self.fallback_plans)
        total = sum(self.memory_bytes().values())
        table = format_table(list(DESCRIBE_COLUMNS), rows)
        text = f"{table}\ncurvature state: {format_bytes(total)}"
        if self.two_level is not None:
            text += f"\n{self.two_level.describe()}: {format_bytes(self.two_level.memory_bytes())}"
        return text if self.distributed is None else f"{text}\n{self.distributed.describe()}"

    def remove(self) -> None:
        """Remove every hook from the model."""
        self._passes.remove()
        for m in self.layers.values():
            m.capture.remove()
        if self.two_level is not None:
            self.two_level.remove()
