"""``sr.Optimizer``: a ``torch.optim.Optimizer`` = Preconditioner + update rule."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import amp
from .methods import TwoLevel
from .policy import Policy
from .preconditioner import Preconditioner
from .update_rules import ADAMW_KEYS, SGD_KEYS, adamw_step, sgd_step

__all__ = ["Optimizer"]

FALLBACK_RULES = ("sgd", "adamw")


def _check_number(name: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value >= high if high_open else value > high):
        bracket = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be a finite number in [{low}, {high}{bracket} (got {value!r})")


class Optimizer(torch.optim.Optimizer):
    """Natural-gradient optimizer whose curvature method is chosen per layer.

    One param group per managed layer (``group["name"]`` is the layer's
    qualified name, ``group["rule"] == "curvature"``) and, when the model has
    other trainable parameters, one ``"fallback"`` group updated by
    ``fallback`` (SGD or AdamW). LR schedulers change every group.

    Args:
        model: the network.
        policy: per-layer methods (default ``Policy()``: K-FAC on every supported layer).
        lr: learning rate (every group unless ``fallback_options`` overrides it).
        momentum: heavy-ball momentum μ on the preconditioned gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: γ, added to the preconditioned gradient (coupled) or
            applied as ``W ← (1 − lr·γ) W`` (``decoupled_weight_decay=True``).
        decoupled_weight_decay: see ``weight_decay``.
        clip: KL-style norm constraint κ: scales the preconditioned gradients by
            ``min(1, sqrt(κ / |Σ lr² ⟨V, ∇⟩|))``; ``None`` = off. On by default:
            with the default damping an early, stale inverse can otherwise take
            steps many times the weights' norm (kfac-pytorch pairs the same
            damping with the same ``kl_clip``).
        fallback: ``"sgd"`` or ``"adamw"`` for parameters outside managed layers.
        fallback_options: overrides for the fallback group (``lr``,
            ``weight_decay``; SGD: ``momentum``, ``nesterov``,
            ``decoupled_weight_decay``; AdamW: ``betas``, ``eps``).
        max_decomposition_failures: see `Preconditioner`.
        grad_scaler: the loop's `torch.amp.GradScaler`; only needed when the
            loop calls ``scaler.unscale_(opt)`` (e.g. to clip gradients): then
            ``scaler.step`` no longer hands the loss scale over, and the
            curvature statistics must still be unscaled.
        process_group: distributed training: ``None`` (default) detects a
            ``DistributedDataParallel`` ``model`` or an initialized
            ``torch.distributed``; ``False`` turns it off; ``True`` or a
            ``ProcessGroup`` picks the group. See `Preconditioner` and
            ``docs/distributed.md``.
        grad_worker_fraction: see `Preconditioner` (``1``, COMM-OPT, or
            ``1/world``, MEM-OPT).
        two_level: ``sr.TwoLevel(...)`` adds two-level K-FAC's coarse
            correction across the managed layers (see `Preconditioner`).

    AMP: ``scaler.step(opt)`` hands the optimizer ``grad_scale`` and
    ``found_inf`` (``_step_supports_amp_scaling``); the optimizer unscales the
    gradients itself, divides the G-side statistics by the scale squared and,
    on ``found_inf``, drops the step's statistics and changes nothing. Without
    a scaler, a non-finite gradient skips the step with a ``UserWarning``. One
    fused check and one host sync per step, none per layer.
    """

    #: ``GradScaler.step`` hands over ``grad_scale`` / ``found_inf`` instead of unscaling itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | None = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        clip: float | None = 1e-3,
        fallback: str = "sgd",
        fallback_options: Mapping[str, Any] | None = None,
        max_decomposition_failures: int = 10,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        grad_worker_fraction: float = 1.0,
        two_level: TwoLevel | None = None,
    ) -> None:
        _check_number("lr", lr, 0.0)
        _check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        _check_number("weight_decay", weight_decay, 0.0)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if clip is not None:
            _check_number("clip", clip, 0.0)
            if clip == 0:
                raise ValueError("clip must be > 0 or None (got 0)")
        if fallback not in FALLBACK_RULES:
            raise ValueError(f"fallback must be one of {FALLBACK_RULES} (got {fallback!r})")
        defaults = {
            "lr": lr, "momentum": momentum, "nesterov": bool(nesterov),
            "weight_decay": weight_decay, "decoupled_weight_decay": bool(decoupled_weight_decay),
        }
        fallback_group = self._fallback_group(fallback, defaults, fallback_options or {})
        self.preconditioner = Preconditioner(
            model, policy, max_decomposition_failures=max_decomposition_failures, grad_scaler=grad_scaler,
            process_group=process_group, grad_worker_fraction=grad_worker_fraction, two_level=two_level,
        )
        self._warned_unknown_scale = False
        self.clip = clip
        self.fallback = fallback
        groups: list[dict[str, Any]] = [
            {"params": params, "name": name, "rule": "curvature"}
            for name, params in self.preconditioner.managed_parameters().items()
        ]
        rest = self.preconditioner.fallback_parameters()
        if rest:
            groups.append({"params": rest, "name": "fallback", "rule": fallback, **fallback_group})
        if not groups:
            raise ValueError("model has no trainable parameters")
        super().__init__(groups, defaults)

    @staticmethod
    def _fallback_group(rule: str, defaults: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        allowed = SGD_KEYS if rule == "sgd" else ADAMW_KEYS
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"fallback_options: unknown key(s) {unknown} for fallback={rule!r}; allowed: {list(allowed)}")
        group = {k: defaults[k] for k in allowed if k in defaults}
        if rule == "adamw":
            group.update(betas=(0.9, 0.999), eps=1e-8)
        group.update(options)
        _check_number("fallback_options['lr']", group["lr"], 0.0)
        _check_number("fallback_options['weight_decay']", group["weight_decay"], 0.0)
        if rule == "adamw":
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"fallback_options['betas'] must be a pair (got {betas!r})")
            group["betas"] = tuple(betas)
            for i, beta in enumerate(group["betas"]):
                _check_number(f"fallback_options['betas'][{i}]", beta, 0.0, 1.0, high_open=True)
            _check_number("fallback_options['eps']", group["eps"], 0.0)
        else:
            _check_number("fallback_options['momentum']", group["momentum"], 0.0, 1.0, high_open=True)
        return group

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the managed gradients, then apply the update rules."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        proceed, scale = self._amp_step()
        if not proceed:
            return loss
        inner = self.preconditioner.precondition(inner_products=self.clip is not None, loss_scale=scale)
        curvature_groups = [g for g in self.param_groups if g["rule"] == "curvature"]
        if self.clip is not None and inner:
            self._clip(curvature_groups, inner)
        sgd_step([g for g in self.param_groups if g["rule"] in ("curvature", "sgd")], self.state)
        adamw_step([g for g in self.param_groups if g["rule"] == "adamw"], self.state)
        return loss

    def _amp_step(self) -> tuple[bool, torch.Tensor | None]:
        """Unscale and check the gradients: ``(proceed, loss scale of this step's statistics)``.

        ``grad_scale`` set by ``GradScaler.step``: the gradients are still
        scaled, so they are unscaled here, fused with the inf check. Only
        ``found_inf`` set: the user called ``scaler.unscale_`` (gradients
        unscaled and checked already). Neither: no scaler; the gradients are
        checked. ``proceed`` is ``False`` when a gradient held inf/NaN.
        """
        handed_scale = getattr(self, "grad_scale", None)
        handed_inf = getattr(self, "found_inf", None)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if handed_scale is not None:
            found = amp.unscale_and_check_(grads, handed_scale.double().reciprocal()) + handed_inf.reshape(())
        elif handed_inf is not None:
            found = handed_inf
        else:
            found = amp.unscale_and_check_(grads)
        if self.preconditioner.found_nonfinite(found):  # the step's one host sync (distributed: all ranks agree)
            self.preconditioner.skip_nonfinite(warn=handed_inf is None)
            return False, None
        if handed_scale is not None:
            return True, handed_scale
        scale = amp.loss_scale(self.preconditioner.grad_scaler)
        if scale is None and handed_inf is not None and not self._warned_unknown_scale:
            self._warned_unknown_scale = True
            warnings.warn(
                "GradScaler.step after scaler.unscale_(opt) does not hand over the loss scale: pass "
                "grad_scaler=scaler to sr.Optimizer so curvature statistics are unscaled too",
                UserWarning,
                stacklevel=3,
            )
        return True, scale

    def _clip(self, groups: list[dict[str, Any]], inner: dict[str, torch.Tensor]) -> None:
        """Scale preconditioned gradients by ``min(1, sqrt(κ / |Σ lr²⟨V,∇⟩|))`` (no host sync)."""
        total = sum(g["lr"] ** 2 * inner[g["name"]] for g in groups if g["name"] in inner)
        scale = torch.sqrt(self.clip / total.abs().clamp_min(torch.finfo(total.dtype).tiny)).clamp(max=1.0)
        grads = [p.grad for g in groups if g["name"] in inner for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim state (momenta, groups) plus the curvature state; loads with ``weights_only=True``."""
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict` output; curvature tensors keep their own dtypes."""
        state_dict = dict(state_dict)
        curvature = state_dict.pop("preconditioner", None)
        if curvature is None:
            raise ValueError("state_dict has no 'preconditioner' entry (not made by sr.Optimizer.state_dict)")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(curvature)

    def memory_bytes(self) -> dict[str, int]:
        """Persistent curvature-state bytes per managed layer."""
        return self.preconditioner.memory_bytes()

    def state_bytes(self) -> int:
        """All persistent optimizer state: update-rule buffers (momenta, Adam moments) plus curvature."""
        return state_bytes(self)

    def describe(self) -> str:
        """The resolved policy with actual state sizes, and the update rules."""
        rules = f"update: lr={self.defaults['lr']}, momentum={self.defaults['momentum']}, " \
                f"weight_decay={self.defaults['weight_decay']}" \
                f"{' (decoupled)' if self.defaults['decoupled_weight_decay'] else ''}, " \
                f"clip={self.clip}, fallback={self.fallback}"
        return f"{self.preconditioner.describe()}\n{rules}"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Persistent state bytes of any torch optimizer: the tensors in ``optimizer.state``,
    plus the curvature state when it is an `Optimizer` (for like-for-like comparisons)."""
    buffers = sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if isinstance(t, torch.Tensor)
    )
    curvature = sum(optimizer.memory_bytes().values()) if isinstance(optimizer, Optimizer) else 0
    return buffers + curvature

