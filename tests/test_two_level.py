"""Two-level K-FAC: the coarse correction against its closed form with a dense empirical Fisher (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, mlp, train_steps
from precision._common import HostSyncCounter
from test_seng import flat_layer, per_sample_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

FINE = sr.KFAC(inverse_every=1, damping=1e-2)
DAMPING = 0.1


def two_layer() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def gradients(model: nn.Module, batch) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()


def flat_grads(model: nn.Module, names: list[str]) -> torch.Tensor:
    return torch.cat([flat_layer(model.get_submodule(n).weight.grad, model.get_submodule(n).bias.grad, 0) for n in names])


def dense_fisher(model: nn.Module, batch, names: list[str]) -> torch.Tensor:
    """The empirical Fisher ``(1/N) Σ ∇ℓ_n ∇ℓ_nᵀ`` of the managed parameters, formed explicitly."""
    samples = per_sample_gradients(model, batch, "batch")
    rows = torch.cat([flat_layer(samples[f"{n}.weight"], samples[f"{n}.bias"], 1) for n in names], dim=1)
    return rows.T @ rows / rows.shape[0]


def block_matrix(vectors: list[torch.Tensor]) -> torch.Tensor:
    """``R0``: one row per layer, its vector in that layer's block."""
    sizes = [v.numel() for v in vectors]
    r0 = torch.zeros(len(vectors), sum(sizes), dtype=torch.float64)
    start = 0
    for i, vector in enumerate(vectors):
        r0[i, start:start + sizes[i]] = vector.reshape(-1)
        start += sizes[i]
    return r0


def closed_form(r0: torch.Tensor, fisher: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``R0ᵀ (R0 F R0ᵀ + λ·diag(‖r_i‖²))⁻¹ R0 ∇``."""
    coarse = r0 @ fisher @ r0.T + DAMPING * torch.diag((r0**2).sum(1))
    return r0.T @ torch.linalg.solve(coarse, r0 @ gradient)


def leading(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(matrix).eigenvectors[:, -1]


def independent_vectors(coarse, model, batch, names, fisher, gradient, fine_direction):
    """The coarse vectors from their definitions, by dense linear algebra."""
    if coarse == "nicolaides":
        return [torch.ones(model.get_submodule(n).weight.shape[0], model.get_submodule(n).weight.shape[1] + 1,
                           dtype=torch.float64) for n in names]
    if coarse == "residual":
        residual = gradient - (fisher + DAMPING * torch.eye(fisher.shape[0], dtype=torch.float64)) @ fine_direction
        sizes = [model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel() for n in names]
        return list(residual.split(sizes))
    vectors, inputs = [], batch[0]
    with torch.no_grad():
        hidden = model[1](model[0](inputs))
    samples = per_sample_gradients(model, batch, "batch")
    for name, layer_input in zip(names, (inputs, hidden)):
        a = torch.cat([layer_input, torch.ones(len(layer_input), 1, dtype=torch.float64)], 1)
        output_grads = samples[f"{name}.bias"]  # per-sample ∂ℓ_n/∂output = the bias gradient (up to 1/N)
        vectors.append(torch.outer(leading(output_grads.T @ output_grads), leading(a.T @ a)))
    return vectors


def same_up_to_sign(got: torch.Tensor, want: torch.Tensor) -> None:
    sign = torch.sign((got * want).sum())
    torch.testing.assert_close(sign * got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("coarse", ["nicolaides", "spectral", "residual"])
def test_correction_equals_the_closed_form_with_a_dense_fisher(coarse):
    torch.manual_seed(3)
    model = two_layer()
    batch = classification_batch(8, (5,), 3)
    names = ["0", "2"]
    reference = copy.deepcopy(model)  # without hooks, for the oracle's per-sample gradients
    fine_model = copy.deepcopy(model)
    fine = sr.Preconditioner(fine_model, sr.Policy(FINE))
    two = sr.Preconditioner(model, sr.Policy(FINE), two_level=sr.TwoLevel(
        coarse=coarse, damping=DAMPING, update_every=1, power_iters=200))  # eigenvectors to rounding
    gradients(fine_model, batch)
    gradients(model, batch)
    gradient = flat_grads(model, names)
    fine.step()
    two.step()
    fine_direction = flat_grads(fine_model, names)
    fisher = dense_fisher(reference, batch, names)
    vectors = [two.two_level.vectors[n] for n in names]
    expected = independent_vectors(coarse, reference, batch, names, fisher, gradient, fine_direction)
    for got, want in zip(vectors, expected):
        if coarse == "spectral":
            same_up_to_sign(got.reshape(-1), want.reshape(-1))
        else:
            torch.testing.assert_close(got.reshape(-1), want.reshape(-1), rtol=1e-10, atol=1e-12)
    correction = flat_grads(model, names) - fine_direction
    want = closed_form(block_matrix(vectors), fisher, gradient)
    assert want.abs().max() > 1e-3  # the correction is not negligible
    torch.testing.assert_close(correction, want, rtol=1e-9, atol=1e-12)


def test_between_refreshes_the_kept_space_corrects_the_fresh_gradient():
    model = two_layer()
    first, second = classification_batch(8, (5,), 3), classification_batch(8, (5,), 3)
    names = ["0", "2"]
    reference = copy.deepcopy(model)
    fine_model = copy.deepcopy(model)
    fine = sr.Preconditioner(fine_model, sr.Policy(FINE))
    two = sr.Preconditioner(model, sr.Policy(FINE), two_level=sr.TwoLevel(coarse="spectral", damping=DAMPING, update_every=3))
    for m, pre in ((fine_model, fine), (model, two)):
        gradients(m, first)
        pre.step()
    fisher = dense_fisher(reference, first, names)  # the refresh batch's
    vectors = [v.clone() for v in (two.two_level.vectors[n] for n in names)]
    for m, pre in ((fine_model, fine), (model, two)):
        gradients(m, second)
    gradient = flat_grads(model, names)
    fine.step()
    two.step()
    assert two.two_level.refreshes == 1
    correction = flat_grads(model, names) - flat_grads(fine_model, names)
    torch.testing.assert_close(correction, closed_form(block_matrix(vectors), fisher, gradient), rtol=1e-9, atol=1e-12)


def _digits_like(n_batches: int, width: int = 12):
    teacher = nn.Linear(width, 4).double()
    return [(x, teacher(x).argmax(1)) for x in torch.randn(n_batches, 32, width, dtype=torch.float64)]


@pytest.mark.parametrize("coarse", ["nicolaides", "spectral", "residual"])
@pytest.mark.parametrize("fine", ["kfac", "mixed"])
def test_every_coarse_space_trains_finitely(coarse, fine):
    """With K-FAC everywhere or a mixed fine level (SINGD, B-KFAC, SENG), the loss falls and stays finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    policy = sr.Policy(sr.KFAC(inverse_every=2, damping=1e-2))
    if fine == "mixed":
        policy = sr.Policy(sr.SINGD(update_every=1, lr_cov=0.05), rules=[("2", sr.BKFAC(rank=3)), ("4", sr.SENG())])
    opt = sr.Optimizer(model, policy, lr=0.1, momentum=0.5, two_level=sr.TwoLevel(coarse=coarse, update_every=2))
    losses = train_steps(model, opt, _digits_like(25))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert opt.preconditioner.two_level.refreshes == 13


# -- the product around it ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [({"coarse": "galerkin"}, "coarse"), ({"damping": 0.0}, "damping"), ({"damping": -1.0}, "damping"),
     ({"update_every": 0}, "update_every"), ({"power_iters": 0}, "power_iters"), ({"loss_average": "sum"}, "loss_average")],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TwoLevel.{field}"):
        sr.TwoLevel(**kwargs)


def test_two_level_without_managed_layers_or_of_the_wrong_type_raises():
    model = mlp()
    with pytest.raises(ValueError, match="at least one managed layer"):
        sr.Optimizer(model, sr.Policy(sr.Skip()), two_level=sr.TwoLevel())
    assert not model._forward_hooks and not model[0]._forward_hooks  # nothing left behind
    with pytest.raises(ValueError, match="two_level must be a sr.TwoLevel"):
        sr.Optimizer(model, two_level="nicolaides")


def test_checkpoint_resumes_exactly_and_a_mismatch_is_refused(tmp_path):
    model = mlp()
    batches = [classification_batch(8, (6,), 3) for _ in range(8)]

    def make(m, two_level=sr.TwoLevel(coarse="spectral", update_every=3)):
        return sr.Optimizer(m, sr.Policy(FINE), lr=0.1, momentum=0.9, two_level=two_level)

    def train(m, opt, batches):
        for batch in batches:
            opt.zero_grad()
            gradients(m, batch)
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    opt = make(model)
    train(model, opt, batches[:4])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    want = train(model, opt, batches[4:])
    state = torch.load(path, weights_only=True)
    resumed_model = mlp()
    resumed_model.load_state_dict(state["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(state["opt"])
    for got, expected in zip(train(resumed_model, resumed, batches[4:]), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="two_level"):
        make(mlp(), two_level=None).load_state_dict(state["opt"])
    with pytest.raises(ValueError, match="nicolaides"):
        make(mlp(), two_level=sr.TwoLevel()).load_state_dict(state["opt"])


def test_describe_and_memory_show_the_coarse_space():
    model = mlp()
    opt = sr.Optimizer(model, sr.Policy(FINE), two_level=sr.TwoLevel(coarse="residual"))
    gradients(model, classification_batch(8, (6,), 3))
    opt.step()
    text = opt.describe()
    assert "two-level(residual, damping=0.001, update_every=10) over 3 layers" in text
    sizes = opt.memory_bytes()
    vectors = (7 * 7 + 5 * 8 + 3 * 6) * 8
    assert sizes["(two-level)"] == vectors + 3 * 3 * 8


def test_one_host_sync_per_step_between_refreshes():
    model = nn.Sequential(*[layer for _ in range(3) for layer in (nn.Linear(6, 6), nn.Tanh())], nn.Linear(6, 3))
    opt = sr.Optimizer(model, sr.Policy(sr.KFAC(inverse_every=1000)), two_level=sr.TwoLevel(update_every=1000))
    counts = []
    for batch in [classification_batch(8, (6,), 3, dtype=torch.float32) for _ in range(4)]:
        opt.zero_grad()
        gradients(model, batch)
        with HostSyncCounter() as counter:
            opt.step()
        counts.append(counter.count)
    assert counts[1:] == [1, 1, 1], counts


def test_layers_without_per_sample_rows_keep_their_own_direction():
    """An Embedding (one-hot rows are token counts) stays out of the coarse space; the rest is corrected."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4 * 5, 3)).double()

    x, y = torch.randint(0, 20, (16, 5)), torch.randint(0, 3, (16,))
    fine_model, model = build(), build()
    fine = sr.Preconditioner(fine_model, sr.Policy(FINE))
    # spectral: on a softmax head the all-ones vector is orthogonal to every gradient (Σ_k ∂ℓ/∂z_k = 0)
    two = sr.Preconditioner(model, sr.Policy(FINE), two_level=sr.TwoLevel(coarse="spectral", update_every=1))
    assert two.two_level.names == ["2"] and two.two_level.excluded == ["0"]
    for m, pre in ((fine_model, fine), (model, two)):
        gradients(m, (x, y))
        pre.step()
    torch.testing.assert_close(model[0].weight.grad, fine_model[0].weight.grad, rtol=0, atol=0)
    assert not torch.allclose(model[2].weight.grad, fine_model[2].weight.grad)
    assert "(not 0: no per-sample rows)" in two.describe()
    with pytest.raises(ValueError, match="per-sample rows"):
        sr.Preconditioner(build(), sr.Policy(FINE, rules=[("2", sr.Skip())]), two_level=sr.TwoLevel())
