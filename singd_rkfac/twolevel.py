"""Two-level K-FAC: a cross-layer coarse correction on top of each layer's own method (DESIGN §3.5).

Fine level: the layers' preconditioned gradients ``ζ_i = M_i⁻¹ ∇_i``. Coarse
level: one vector ``r_i`` per managed layer (a ``d_g × d_a`` matrix like its
gradient), ``R0`` their block matrix, and

    F_c = R0 F R0ᵀ + λ·diag(‖r_i‖²),    ζ ← ζ + R0ᵀ F_c⁻¹ R0 ∇.

``F`` is the empirical Fisher of every managed parameter, but only its
projections are needed: ``(R0 ∇ℓ_n)_i = ⟨G_{n,i}, r_i⟩`` from each layer's
per-sample rows, so ``F_c = c·PᵀP + λD`` with ``P`` the ``N × L`` matrix of
raw projections and ``c`` the per-sample scale. A refresh (every
``update_every`` steps) captures that step's rows in the ``"sample"`` layout,
rebuilds the vectors and factors ``F_c`` (``L × L``); every step applies the
kept ones to its fresh gradient.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from .capture import ForwardPasses, LayerCapture
from .curvature.base import BatchCounts, per_sample_scale
from .curvature.factors import layer_generator
from .linalg import FailureTracker, robust_cholesky
from .linalg.samples import leading_eigenvector, sample_combination, sample_projections
from .methods import TwoLevel

if TYPE_CHECKING:
    from .preconditioner import ManagedLayer

__all__ = ["CoarseCorrection"]


class CoarseCorrection:
    """The coarse space and ``L × L`` system of two-level K-FAC over a preconditioner's managed layers.

    Args:
        config: the `TwoLevel` options.
        layers: the preconditioner's managed layers, by name; those whose
            adapter cannot give per-sample rows (`Layer.layouts`, e.g.
            Embedding) are left out of the coarse space.
        passes: the root model's forward-pass counter (for the captures).
        grad_scaler: the loop's GradScaler, if given (captured rows are unscaled like the layers' own).
        max_failures: consecutive failed factorizations before `DecompositionError`.
    """

    def __init__(
        self,
        config: TwoLevel,
        layers: Mapping[str, "ManagedLayer"],
        passes: ForwardPasses,
        grad_scaler: torch.amp.GradScaler | None,
        max_failures: int,
    ) -> None:
        if not layers:
            raise ValueError("two_level needs at least one managed layer (the policy manages none)")
        #: Layers whose adapter cannot give per-sample rows (Embedding): they keep their own direction.
        self.excluded = [name for name, m in layers.items() if "sample" not in m.layer.layouts]
        layers = {name: m for name, m in layers.items() if name not in self.excluded}
        if not layers:
            raise ValueError(f"two_level needs a managed layer with per-sample rows (none among {self.excluded})")
        self.config = config
        self.names = list(layers)
        weights = [m.layer.weight for m in layers.values()]
        self.device = weights[0].device
        self.dtype = torch.promote_types(torch.float32, weights[0].dtype)
        for weight in weights[1:]:
            self.dtype = torch.promote_types(self.dtype, weight.dtype)
        self._staged: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in self.names}
        self.captures = {
            name: LayerCapture(name, m.layer, "sample", self.dtype, partial(self._stage, name), passes)
            for name, m in layers.items()
        }
        for capture in self.captures.values():
            capture.grad_scaler = grad_scaler
        #: The coarse vectors ``r_i`` (``d_g × d_a``) and the factor of ``F_c`` (``L × L``), once refreshed.
        self.vectors: dict[str, Tensor] = {}
        self.system: Tensor | None = None
        #: Spectral space: the leading eigenvectors ``(v_A, u_G)`` per layer (warm starts).
        self.eigenvectors: dict[str, tuple[Tensor, Tensor]] = {}
        self.refreshes = 0
        self.failures = FailureTracker("two-level coarse system", max_failures)
        self._dims = {name: (m.layer.dims.d_a, m.layer.dims.d_g) for name, m in layers.items()}

    def _stage(self, name: str, a: Tensor, g: Tensor) -> None:
        self._staged[name].append((a, g))

    # -- schedule --------------------------------------------------------------------------------
    def schedule(self, steps: int) -> None:
        """Capture rows on refresh steps only."""
        for capture in self.captures.values():
            capture.active = steps % self.config.update_every == 0

    def discard(self) -> None:
        """Drop this step's captured rows (a skipped step)."""
        for name, capture in self.captures.items():
            capture.take()
            self._staged[name].clear()

    def remove(self) -> None:
        for capture in self.captures.values():
            capture.remove()

    # -- the correction ------------------------------------------------------------------------------
    def correct(
        self, grads: Mapping[str, Tensor], directions: Mapping[str, Tensor], counts: Mapping[str, BatchCounts | None]
    ) -> dict[str, Tensor]:
        """``ζ + R0ᵀ F_c⁻¹ R0 ∇`` per layer, refreshing the coarse space first when rows were captured.

        ``grads`` and ``directions`` (the fine level's ``ζ``) are ``d_g × d_a``
        matrices of the layers that have a gradient this step; ``counts`` are
        this step's counts of the two-level captures (with the loss scale).
        """
        rows = {name: self._take_rows(name) for name in self.names}
        if all(rows[name] is not None and counts.get(name) is not None for name in self.names):
            self._refresh(rows, counts, grads, directions)  # type: ignore[arg-type]
        if self.system is None:
            return dict(directions)
        present = [name for name in self.names if name in grads]
        rhs = torch.zeros(len(self.names), dtype=self.dtype, device=self.device)
        for i, name in enumerate(self.names):
            if name in grads:
                rhs[i] = torch.vdot(self.vectors[name].reshape(-1), grads[name].to(self.dtype).reshape(-1))
        coefficients = torch.cholesky_solve(rhs[:, None], self.system)[:, 0]
        out = dict(directions)
        for name in present:
            i = self.names.index(name)
            out[name] = (directions[name].to(self.dtype) + coefficients[i] * self.vectors[name]).to(directions[name].dtype)
        return out

    def _take_rows(self, name: str) -> tuple[Tensor, Tensor] | None:
        staged = self._staged[name]
        if not staged:
            return None
        rows = torch.cat([a for a, _ in staged]), torch.cat([g for _, g in staged])
        staged.clear()
        return rows

    def _refresh(
        self,
        rows: Mapping[str, tuple[Tensor, Tensor]],
        counts: Mapping[str, BatchCounts],
        grads: Mapping[str, Tensor],
        directions: Mapping[str, Tensor],
    ) -> None:
        samples = {rows[name][0].shape[0] for name in self.names}
        if len(samples) != 1:
            raise RuntimeError(
                "two-level K-FAC needs every managed layer to see the same samples per step "
                f"(got {sorted(samples)} samples across layers); use sr.Skip() on the layers that see fewer"
            )
        scale = torch.as_tensor(
            per_sample_scale(counts[self.names[0]], self.config.loss_average, self.dtype, self.device),
            dtype=self.dtype, device=self.device,
        ).reshape(())
        vectors = self._coarse_vectors(rows, scale, grads, directions)
        projections = torch.stack([sample_projections(*rows[name], vectors[name]) for name in self.names], dim=1)
        norms = torch.stack([vectors[name].square().sum() for name in self.names])
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero vector: a decoupled, inert unknown
        system = scale * (projections.T @ projections) + torch.diag(self.config.damping * norms)
        factor = robust_cholesky(system)
        self.failures.record(factor is not None)
        if factor is not None:
            self.vectors, self.system = vectors, factor
            self.refreshes += 1

    def _coarse_vectors(
        self,
        rows: Mapping[str, tuple[Tensor, Tensor]],
        scale: Tensor,
        grads: Mapping[str, Tensor],
        directions: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        coarse = self.config.coarse
        if coarse == "nicolaides":
            return {name: torch.ones(d_g, d_a, dtype=self.dtype, device=self.device) for name, (d_a, d_g) in self._dims.items()}
        if coarse == "spectral":
            return {name: self._spectral_vector(name, *rows[name]) for name in self.names}
        # residual of the fine level: ∇ − (F + λI) ζ, with F ζ = c Σ_n (Σ_j ⟨G_{n,j}, ζ_j⟩) G_n
        fine = {name: directions.get(name, torch.zeros(d_g, d_a, dtype=self.dtype, device=self.device)).to(self.dtype)
                for name, (d_a, d_g) in self._dims.items()}
        fisher_weights = sum(sample_projections(*rows[name], fine[name]) for name in self.names)
        vectors = {}
        for name, (d_a, d_g) in self._dims.items():
            grad = grads[name].to(self.dtype) if name in grads else torch.zeros_like(fine[name])
            fisher_product = scale * sample_combination(*rows[name], fisher_weights)
            vectors[name] = grad - fisher_product - self.config.damping * fine[name]
        return vectors

    def _spectral_vector(self, name: str, a: Tensor, g: Tensor) -> Tensor:
        """``u_G v_Aᵀ`` from the leading eigenvectors of the batch factors, by warm-started power iteration."""
        d_a, d_g = self._dims[name]
        if name in self.eigenvectors:
            start_a, start_g = self.eigenvectors[name]
        else:
            generator = layer_generator(self.device, f"{name}/two-level")
            start_a = torch.randn(d_a, generator=generator, device=self.device, dtype=self.dtype)
            start_g = torch.randn(d_g, generator=generator, device=self.device, dtype=self.dtype)
        iterations = self.config.power_iters
        v_a = leading_eigenvector(a.reshape(-1, d_a), start_a, iterations)
        u_g = leading_eigenvector(g.reshape(-1, d_g), start_g, iterations)
        self.eigenvectors[name] = (v_a, u_g)
        return torch.outer(u_g, v_a)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Vectors, factor, warm starts and counters: plain tensors and numbers."""
        return {
            "config": self.config.summary(),
            "vectors": dict(self.vectors),
            "system": self.system,
            "eigenvectors": {name: list(pair) for name, pair in self.eigenvectors.items()},
            "refreshes": self.refreshes,
            "failures": self.failures.consecutive,
            "failures_total": self.failures.total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["config"] != self.config.summary():
            raise ValueError(f"checkpoint was made with {state['config']}, this preconditioner uses {self.config.summary()}")
        convert = partial(Tensor.to, device=self.device, dtype=self.dtype)
        self.vectors = {name: convert(value) for name, value in state["vectors"].items()}
        self.system = None if state["system"] is None else convert(state["system"])
        self.eigenvectors = {name: (convert(v), convert(u)) for name, (v, u) in state["eigenvectors"].items()}
        self.refreshes = int(state["refreshes"])
        self.failures.consecutive = int(state["failures"])
        self.failures.total = int(state["failures_total"])

    def memory_bytes(self) -> int:
        """Bytes of the persistent coarse state."""
        tensors = [*self.vectors.values(), *(t for pair in self.eigenvectors.values() for t in pair)]
        if self.system is not None:
            tensors.append(self.system)
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        """One line for ``describe()``."""
        text = f"{self.config.summary()} over {len(self.names)} layers"
        return text + (f" (not {', '.join(self.excluded)}: no per-sample rows)" if self.excluded else "")
