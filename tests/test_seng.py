"""SENG against the dense solve built from explicit per-sample gradients (torch.func), float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import singd_rkfac as sr
from conftest import classification_batch, cnn, mlp, train_steps
from singd_rkfac.linalg.samples import GRAM_PATHS, gram_path, sample_gram

pytestmark = pytest.mark.usefixtures("one_thread")

DAMPING = 0.3


def per_sample_gradients(model: nn.Module, batch, loss_average: str | None) -> dict[str, torch.Tensor]:
    """``∇ℓ_n`` for every parameter, ``(N, *shape)``: the oracle's per-sample gradients."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    reduction = "mean" if loss_average == "batch" else "sum"

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None], reduction=reduction)

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, *batch)


def flat_layer(weight: torch.Tensor, bias: torch.Tensor | None, batch_dims: int) -> torch.Tensor:
    """``vec([W | b])`` (row-major ``d_g × d_a``) with ``batch_dims`` leading dimensions kept."""
    lead = weight.shape[:batch_dims]
    d_g = weight.shape[batch_dims]
    matrix = weight.reshape(*lead, d_g, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(*lead, d_g, 1)], dim=-1)
    return matrix.reshape(*lead, -1)


def dense_seng(model, batch, loss_average, damping, gradient_batch=None):
    """``(UᵀU + λI)⁻¹ ∇`` per layer with ``U = [∇ℓ_n / √N]`` formed explicitly (and ∇ from ``gradient_batch``)."""
    samples = per_sample_gradients(model, batch, loss_average)
    n = batch[0].shape[0]
    out = {}  # U of each layer: the empirical Fisher is (1/N) Σ ∇ℓ_n ∇ℓ_nᵀ for a mean or a summed loss alike
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out[name] = flat_layer(samples[f"{name}.weight"], samples.get(f"{name}.bias"), 1) / n**0.5
    model.zero_grad()
    x, y = gradient_batch or batch
    nn.functional.cross_entropy(model(x), y, reduction="mean" if loss_average == "batch" else "sum").backward()
    directions = {}
    for name, rows in out.items():
        module = model.get_submodule(name)
        gradient = flat_layer(module.weight.grad, None if module.bias is None else module.bias.grad, 0)
        fisher = rows.T @ rows + damping * torch.eye(rows.shape[1], dtype=rows.dtype)
        directions[name] = torch.linalg.solve(fisher, gradient)
    return directions


def ours(model, pre, batch, loss_average):
    model.zero_grad()
    x, y = batch
    nn.functional.cross_entropy(model(x), y, reduction="mean" if loss_average == "batch" else "sum").backward()
    pre.step()
    return {
        name: flat_layer(m.layer.weight.grad, None if m.layer.bias is None else m.layer.bias.grad, 0)
        for name, m in pre.layers.items()
    }


MODELS = {
    "mlp": (mlp, (9, (6,), 3)),
    "cnn-stride-pad": (lambda: cnn(stride=2, padding=1), (5, (2, 8, 8), 4)),
    "cnn-dilation-same-nobias": (lambda: cnn(dilation=2, padding="same", bias=False), (4, (2, 8, 8), 4)),
}


@pytest.mark.parametrize("loss_average", ["batch", None])
@pytest.mark.parametrize("name", MODELS)
def test_seng_equals_the_dense_solve_from_per_sample_gradients(name, loss_average):
    build, shape = MODELS[name]
    model = build()
    batch = classification_batch(*shape)
    expected = dense_seng(copy.deepcopy(model), batch, loss_average, DAMPING)
    pre = sr.Preconditioner(model, sr.Policy(sr.SENG(damping=DAMPING, loss_average=loss_average)))
    got = ours(model, pre, batch, loss_average)
    assert set(got) == set(expected)
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-10, atol=1e-13)


def test_update_every_keeps_the_refresh_batch_and_preconditions_the_fresh_gradient():
    """Step 1 of ``update_every=2``: U from step 0's batch, ∇ from step 1's."""
    model = cnn(stride=2, padding=1)
    first, second = classification_batch(6, (2, 8, 8), 4), classification_batch(6, (2, 8, 8), 4)
    pre = sr.Preconditioner(model, sr.Policy(sr.SENG(damping=DAMPING, update_every=2)))
    ours(model, pre, first, "batch")
    expected = dense_seng(copy.deepcopy(model), first, "batch", DAMPING, gradient_batch=second)
    got = ours(model, pre, second, "batch")
    assert all(m.curvature.refreshes == 1 for m in pre.layers.values())
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("positions", [1, 6])
def test_both_gram_paths_equal_the_per_sample_gradient_gram(positions):
    a = torch.randn(5, positions, 4, dtype=torch.float64)
    g = torch.randn(5, positions, 3, dtype=torch.float64)
    per_sample = torch.einsum("ntg,nta->nga", g, a).reshape(5, -1)
    for path in GRAM_PATHS:
        torch.testing.assert_close(sample_gram(a, g, path), per_sample @ per_sample.T, rtol=1e-12, atol=1e-12)
    assert gram_path(128, 1, 4096, 4096) == "kernel"  # a wide Linear never forms per-sample gradients
    assert gram_path(128, 64, 577, 64) == "materialize"  # a conv with many positions does
    with pytest.raises(ValueError, match="path"):
        sample_gram(a, g, "dense")


# -- sketching ---------------------------------------------------------------------------------------------------
def _sketch_draws(curvature, gradient, draws: int) -> torch.Tensor:
    return torch.stack([curvature.precondition(gradient).reshape(-1) for _ in range(draws)])


def _max_z_score(samples: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |mean − exact| in standard errors of the mean, over coordinates that vary."""
    mean, error = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    varying = error > 1e-12
    assert torch.equal(mean[~varying], exact[~varying]) or torch.allclose(mean[~varying], exact[~varying])
    return float(((mean - exact).abs()[varying] / error[varying]).max())


def test_sketched_direction_is_an_unbiased_estimate_and_a_shared_draw_would_not_be():
    """The mean of many sketched directions matches the exact one within 4.5 standard errors in
    every coordinate; the same test rejects the variant that reuses one column draw for both
    products with U (biased), so it can fail."""
    model = mlp()
    batch = classification_batch(8, (6,), 3)
    exact_pre = sr.Preconditioner(copy.deepcopy(model), sr.Policy(sr.SENG(damping=DAMPING)))
    sketch_pre = sr.Preconditioner(model, sr.Policy(sr.SENG(damping=DAMPING, sketch_size=3)))
    for pre in (exact_pre, sketch_pre):
        ours(pre.model, pre, batch, "batch")
    layer = "2"  # 7 inputs + bias: 3 of 8 columns per draw
    gradient = torch.randn(5, 8, dtype=torch.float64)
    exact = exact_pre.layers[layer].curvature.precondition(gradient).reshape(-1)
    curvature = sketch_pre.layers[layer].curvature
    draws = _sketch_draws(curvature, gradient, 4000)
    assert not torch.allclose(draws[0], exact)  # really sketched
    assert _max_z_score(draws, exact) < 4.5

    shared = []
    original = curvature._columns
    for _ in range(4000):
        columns = original()
        curvature._columns = lambda: columns  # the negative control: one draw for both products
        shared.append(curvature.precondition(gradient).reshape(-1))
    curvature._columns = original
    assert _max_z_score(torch.stack(shared), exact) > 10


def test_sketch_at_or_above_the_column_count_is_exact():
    model = mlp()
    batch = classification_batch(8, (6,), 3)
    exact = sr.Preconditioner(copy.deepcopy(model), sr.Policy(sr.SENG()))
    wide = sr.Preconditioner(model, sr.Policy(sr.SENG(sketch_size=100)))
    want = ours(exact.model, exact, batch, "batch")
    got = ours(model, wide, batch, "batch")
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0)


# -- the product around it ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [({"sketch_size": 0}, "sketch_size"), ({"sketch_size": -3}, "sketch_size"), ({"sketch_size": 2.5}, "sketch_size"),
     ({"update_every": 0}, "update_every"), ({"damping": 0.0}, "damping"), ({"loss_average": "mean"}, "loss_average")],
)
def test_bad_input_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SENG.{field}"):
        sr.SENG(**kwargs)


def test_seng_is_not_a_kronecker_method():
    with pytest.raises(TypeError):
        sr.SENG(kfac_approx="reduce")  # per-sample gradients need no weight-sharing approximation


def test_policy_names_toml_and_describe(tmp_path):
    config = tmp_path / "policy.toml"
    config.write_text('[default]\nmethod = "seng"\nupdate_every = 4\nsketch_size = 16\n\n'
                      '[[rules]]\nmatch = "4"\nmethod = "kfac"\n')
    policy = sr.Policy.from_toml(config)
    model = mlp()
    resolved = policy.resolve(model)
    assert resolved["0"] == sr.SENG(update_every=4, sketch_size=16) and isinstance(resolved["4"], sr.KFAC)
    assert sr.Policy.from_dict({"default": "seng"}).resolve(model)["0"] == sr.SENG()
    text = policy.describe(model)
    assert "seng(update_every=4, sketch_size=16)" in text and "state grows with the batch" in text
    pre = sr.Preconditioner(model, policy)
    ours(model, pre, classification_batch(9, (6,), 3), "batch")
    assert "9 samples × 1 positions" in pre.describe()
    assert pre.memory_bytes()["0"] > 9 * (7 + 7) * 8  # rows a, g and the 9 × 9 factor, float64


def test_training_is_finite_the_loss_falls_and_a_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    teacher = nn.Linear(6, 3).double()
    batches = [(x, teacher(x).argmax(1)) for x in torch.randn(30, 32, 6, dtype=torch.float64)]
    opt = sr.Optimizer(model, sr.Policy(sr.SENG(damping=1.0, update_every=2, sketch_size=5)), lr=0.3, momentum=0.5, clip=None)

    losses = train_steps(model, opt, batches[:20])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.6 * losses[0]
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    rest = train_steps(model, opt, batches[20:])
    resumed_model = copy.deepcopy(model)
    state = torch.load(path, weights_only=True)
    resumed_model.load_state_dict(state["model"])
    resumed = sr.Optimizer(resumed_model, sr.Policy(sr.SENG(damping=1.0, update_every=2, sketch_size=5)), lr=0.3, momentum=0.5, clip=None)
    resumed.load_state_dict(state["opt"])
    assert train_steps(resumed_model, resumed, batches[20:]) == rest


def test_loss_scale_is_undone_exactly():
    """Gradients and rows of a loss scaled by 2¹⁰ give the same SENG direction ×2¹⁰ (DESIGN §4)."""
    model = mlp()
    batch = classification_batch(8, (6,), 3)
    plain = sr.Preconditioner(copy.deepcopy(model), sr.Policy(sr.SENG(damping=DAMPING)))
    want = ours(plain.model, plain, batch, "batch")
    scaled = sr.Preconditioner(model, sr.Policy(sr.SENG(damping=DAMPING)))
    model.zero_grad()
    (nn.functional.cross_entropy(model(batch[0]), batch[1]) * 2.0**10).backward()
    scaled.precondition(loss_scale=torch.tensor(2.0**10))
    for name, m in scaled.layers.items():
        got = flat_layer(m.layer.weight.grad, m.layer.bias.grad, 0) / 2.0**10
        torch.testing.assert_close(got, want[name], rtol=1e-12, atol=1e-15)
