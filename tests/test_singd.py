"""SINGD against the `singd` package, the IKFAC fixed point, training in every structure and in bf16."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from conftest import classification_batch, cnn, mlp
from singd_rkfac.data import load_digits

LR = 0.01
STRUCTURES = ["dense", "diagonal", "block", "lowrank", "hierarchical", "toeplitz"]


# -- step-for-step agreement with the reference package ------------------------------------------
def _reference_pair(build, method: sr.SINGD, update_options: dict):
    """Two copies of one model: one under ``singd.optim.optimizer.SINGD``, one under ours."""
    reference_singd = pytest.importorskip("singd.optim.optimizer")
    model = build()
    ours = copy.deepcopy(model)
    reference = reference_singd.SINGD(
        model, T=method.update_every, structures=(method.structure, method.structure),
        kfac_like=method.kfac_like, alpha1=method.momentum, lr_cov=method.lr_cov, damping=method.damping,
        kfac_approx=method.kfac_approx, normalize_lr_cov=method.normalize_lr_cov, **update_options,
    )
    optimizer = sr.Optimizer(ours, sr.Policy(method), clip=None, **update_options)
    return (model, reference), (ours, optimizer)


def _train_step(model, optimizer, batch) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


ANCHOR_CASES = [
    (model_name, structure, kfac_like, approx)
    for model_name in ("mlp", "cnn")
    for structure in ("dense", "diagonal")
    for kfac_like in (False, True)
    for approx in (("expand",) if model_name == "mlp" else ("expand", "reduce"))
]
ANCHOR_BUILD = {
    "mlp": (lambda: mlp(), (6,), 3),
    "cnn": (lambda: cnn(padding=1, stride=2), (2, 8, 8), 4),
}


def _check_anchor(model_name: str, method: sr.SINGD, steps: int = 12) -> None:
    build, shape, classes = ANCHOR_BUILD[model_name]
    update_options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    (ref_model, ref_opt), (our_model, our_opt) = _reference_pair(build, method, update_options)
    sgd_model = copy.deepcopy(our_model)
    sgd = torch.optim.SGD(sgd_model.parameters(), **update_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            batch = classification_batch(10, shape, classes)
            for model, opt in ((ref_model, ref_opt), (our_model, our_opt), (sgd_model, sgd)):
                _train_step(model, opt, batch)
            for want, got in zip(ref_model.parameters(), our_model.parameters()):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the preconditioner really acted: the trajectory left plain SGD's
    moved = max((p - q).abs().max() for p, q in zip(our_model.parameters(), sgd_model.parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("model_name,structure,kfac_like,approx", ANCHOR_CASES)
def test_matches_singd_package_every_step(model_name, structure, kfac_like, approx):
    method = sr.SINGD(
        structure=structure, kfac_like=kfac_like, kfac_approx=approx, update_every=1, lr_cov=0.05, normalize_lr_cov=False
    )
    _check_anchor(model_name, method)


@pytest.mark.parametrize(
    "options",
    [
        {"normalize_lr_cov": True, "lr_cov": 0.3},
        {"update_every": 3, "alpha1": 0.3, "normalize_lr_cov": False},
        {"lr_cov": lambda step: 0.01 * (1 + step), "update_every": 2, "normalize_lr_cov": False},
    ],
    ids=["normalized", "T3-alpha1", "schedule"],
)
def test_matches_singd_package_options(options):
    _check_anchor("mlp", sr.SINGD(structure="dense", **{"update_every": 1, **options}))


# -- IKFAC fixed point ------------------------------------------------------------------------------
def test_ikfac_dense_converges_to_damped_kfac_inverse():
    curvlinops = pytest.importorskip("curvlinops")
    model, batch = mlp(), classification_batch(32, (6,), 3)
    loss = nn.CrossEntropyLoss()
    kfac = curvlinops.KFACLinearOperator(
        model, loss, list(model.parameters()), [batch], fisher_type="empirical",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    damping = 0.1
    pre = sr.Preconditioner(model, sr.Policy(sr.SINGD(kfac_like=True, update_every=1, damping=damping, lr_cov=0.5)))
    for _ in range(300):  # weights never change: a fixed batch, so fixed A and G
        model.zero_grad()
        loss(model(batch[0]), batch[1]).backward()
        pre.step()
    for name, managed in pre.layers.items():
        for factor, oracle in ((managed.curvature.K, kfac._input_covariances[name]),
                               (managed.curvature.C, kfac._gradient_covariances[name])):
            dense = factor.to_dense()
            eye = torch.eye(oracle.shape[0], dtype=oracle.dtype)
            torch.testing.assert_close(dense @ dense.T, torch.linalg.inv(oracle + damping * eye), rtol=1e-10, atol=1e-10)


# -- training --------------------------------------------------------------------------------------------
def _digits_run(method: sr.SINGD, dtype: torch.dtype, *, steps: int, autocast: bool = False, seed: int = 0):
    data = load_digits(dtype=dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    opt = sr.Optimizer(model, sr.Policy(method), lr=LR, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, data.x_train.shape[0], (64,), generator=generator)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(data.x_train).float(), data.y_train)
    return model, opt, torch.stack(losses), final


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "structure",
    [*STRUCTURES, sr.structures.LowRank(rank=4, lower=False), sr.structures.Toeplitz(lower=False)],
    ids=[*STRUCTURES, "lowrank-upper", "toeplitz-upper"],
)
def test_every_structure_trains(structure, dtype):
    method = sr.SINGD(structure=structure, update_every=2, lr_cov=0.05)
    _, opt, losses, final = _digits_run(method, dtype, steps=60)
    assert torch.isfinite(losses).all()
    assert final < 0.5 * losses[0]
    for managed in opt.preconditioner.layers.values():
        assert all(torch.isfinite(t).all() for t in managed.curvature.state_dict().values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("structure", ["diagonal", "dense", "block"])
def test_bf16_autocast_with_bf16_state_matches_fp32(structure):
    steps = 150
    fp32 = sr.SINGD(structure=structure, update_every=5, lr_cov=0.05)
    bf16 = sr.SINGD(structure=structure, update_every=5, lr_cov=0.05, dtype=torch.bfloat16)
    _, _, _, reference = _digits_run(fp32, torch.float32, steps=steps)
    model, opt, losses, final = _digits_run(bf16, torch.float32, steps=steps, autocast=True)
    assert torch.isfinite(losses).all()
    for managed in opt.preconditioner.layers.values():
        state = [t for t in managed.curvature.state_dict().values() if isinstance(t, torch.Tensor)]
        assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in state)
    assert abs(final - reference) <= 0.03 * reference


def test_diagonal_bf16_state_is_about_half_of_adamw():
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    adamw_model = copy.deepcopy(model)
    adamw = torch.optim.AdamW(adamw_model.parameters())
    opt = sr.Optimizer(model, sr.Policy(sr.SINGD(structure="diagonal", dtype=torch.bfloat16)), lr=0.01, momentum=0.9)
    for m, o in ((model, opt), (adamw_model, adamw)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    adamw_bytes = sum(t.numel() * t.element_size() for s in adamw.state.values() for t in s.values())
    assert opt.state_bytes() <= 0.55 * adamw_bytes


# -- robustness and configuration ------------------------------------------------------------------------------
def test_non_finite_statistics_leave_the_factors_untouched():
    model = mlp()
    pre = sr.Preconditioner(model, sr.Policy(sr.SINGD(structure="block", block_size=3, update_every=1)))
    x, y = classification_batch(8, (6,), 3)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    before = {name: {k: v.clone() for k, v in m.curvature.state_dict().items() if isinstance(v, torch.Tensor)}
              for name, m in pre.layers.items()}
    x[0, 0] = float("nan")  # propagates into every layer's rows
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    for name, managed in pre.layers.items():
        for key, value in before[name].items():
            assert torch.equal(managed.curvature.state_dict()[key], value), (name, key)


SMALL_STRUCTURES = [sr.structures.Dense(), sr.structures.Diagonal(), sr.structures.Block(3),
                    sr.structures.LowRank(2), sr.structures.Hierarchical(2, 2), sr.structures.Toeplitz()]


@pytest.mark.parametrize("structure", SMALL_STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_entry_in_any_part_of_the_update_is_rejected(structure, bad):
    """The finiteness check reads only ``K m̂`` and ``C m̂``: a bad entry anywhere in ``m̂`` must reach them."""
    model = mlp()  # first layer: d_a = d_g = 7, so every part of every structure is non-empty
    pre = sr.Preconditioner(model, sr.Policy(sr.SINGD(structure=structure, update_every=1, alpha1=0.5)))
    curvature = pre.layers["0"].curvature
    for matrix in (curvature.K, curvature.C, curvature.m_K, curvature.m_C):  # a generic, non-identity state
        for t in matrix.tensors().values():
            t.add_(0.1 * torch.randn_like(t))
    before = {k: v.clone() for k, v in curvature.state_dict().items() if isinstance(v, torch.Tensor)}
    for side in ("K", "C"):
        for part, tensor in getattr(curvature, side).tensors().items():
            for index in range(tensor.numel()):  # every entry, off the trace too (the dense tail is empty)
                h = {s: getattr(curvature, s).zeros_like() for s in ("K", "C")}
                getattr(h[side], part).view(-1)[index] = bad
                curvature._step_factors(0, h["K"], h["C"])
                for key, value in before.items():
                    assert torch.equal(curvature.state_dict()[key], value), (side, part, index, key)


@pytest.mark.parametrize("structure", SMALL_STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize(("period", "alpha1"), [(1, 0.5), (10, 0.0)])
def test_estimated_bytes_equal_the_state_held_caches_included(structure, period, alpha1):
    """`estimate_bytes` (the policy's describe) predicts `memory_bytes`: K, C, momenta and cached K Kᵀ, C Cᵀ."""
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)).to(torch.float64)
    method = sr.SINGD(structure=structure, update_every=period, alpha1=alpha1)
    pre = sr.Preconditioner(model, sr.Policy(method))
    for managed in pre.layers.values():
        curvature = managed.curvature
        state = sum(t.numel() * t.element_size() for t in curvature.state_dict().values() if isinstance(t, torch.Tensor))
        caches = [m for m in (curvature.KKt, curvature.CCt) if m is not None]
        assert curvature.memory_bytes() == state + sum(m.nbytes() for m in caches)
        assert type(curvature).estimate_bytes(method, managed.layer.dims, torch.float64) == curvature.memory_bytes()
    # the narrow last layer (d_g = 3) keeps no dense K Kᵀ at T = 1: two products on 3 columns are cheaper
    if structure == sr.structures.Dense() and period == 1:
        assert pre.layers["2"].curvature.KKt is None


def test_policy_from_toml_form_and_describe(tmp_path):
    policy = sr.Policy.from_dict({
        "default": {"method": "singd", "structure": "block", "block_size": 4, "dtype": "bfloat16"},
        "rules": [{"match": "4", "method": "singd", "structure": "lowrank", "rank": 64, "structure_g": "diagonal"}],
    })
    model = mlp()
    methods = policy.resolve(model)
    assert methods["0"].k_structure == sr.structures.Block(4) and methods["0"].dtype == torch.bfloat16
    text = sr.Optimizer(model, policy).describe()
    assert "K block(4), C block(4)" in text
    assert "rank 64" not in text and "clipped" in text  # rank 64 > d_a = 6 is clipped, and said so
    estimated = policy.describe(model)
    assert "K lowrank(64, true), C diagonal" in estimated


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"structure": "banded"}, "structure"),
        ({"structure": "block", "block_size": 0}, "block_size"),
        ({"structure": "lowrank", "rank": -2}, "rank"),
        ({"structure": "hierarchical", "k1": -1}, "k1"),
        ({"structure": "dense", "block_size": 8}, "block_size"),
        ({"dtype": torch.int8}, "dtype"),
        ({"lr_cov": -1.0}, "lr_cov"),
        ({"kfac_like": True, "alpha1": 0.5}, "alpha1"),
        ({"update_every": 0}, "update_every"),
        ({"structure_g": 3}, "structure_g"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SINGD.{field}"):
        sr.SINGD(**kwargs)


def test_structure_objects_and_separate_output_structure():
    method = sr.SINGD(structure=sr.structures.Hierarchical(2, 3), structure_g="toeplitz", lower=False)
    assert method.k_structure == sr.structures.Hierarchical(2, 3)
    assert method.c_structure == sr.structures.Toeplitz(lower=False)
    assert sr.SINGD().momentum == 0.5 and sr.SINGD(kfac_like=True).momentum == 0.0


# -- the in-place elementwise path of diagonal SINGD ------------------------------------------------
class _TokensAndFeatures(nn.Module):
    """An Embedding, a Linear with bias and a Conv2d: every `Layer.grad_parts` variant."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(4 + 3 * 16, 5)

    def forward(self, tokens, images):
        features = torch.cat([self.embed(tokens).mean(1), self.conv(images).flatten(1)], dim=1)
        return self.head(torch.tanh(features))


@pytest.mark.parametrize("inner_products", [False, True], ids=["no-clip", "clip"])
def test_diagonal_in_place_scaling_equals_the_matrix_path(inner_products):
    """Diagonal K and C scale ``[∇W | ∇b]`` in place: the same direction and ``⟨V, ∇⟩`` as
    ``C Cᵀ [∇W | ∇b] K Kᵀ`` formed on a copied matrix (float64)."""
    torch.manual_seed(0)
    model = _TokensAndFeatures().double()
    pre = sr.Preconditioner(model, sr.Policy(sr.SINGD(structure="diagonal", update_every=1, lr_cov=0.5)))
    tokens, images = torch.randint(0, 7, (6, 3)), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    for _ in range(3):  # K, C move away from the identity
        model.zero_grad()
        model(tokens, images).square().sum().backward()
        pre.precondition()
    model.zero_grad()
    model(tokens, images).square().sum().backward()
    for m in pre.layers.values():  # the next update must not change K, C: compare against them after it
        m.capture.active = False
    grads = {name: m.layer.grad_matrix().clone() for name, m in pre.layers.items()}
    inner = pre.precondition(inner_products=inner_products)
    for name, m in pre.layers.items():
        assert not torch.equal(m.curvature.K.diag, torch.ones_like(m.curvature.K.diag))
        want = m.curvature.precondition(grads[name])
        torch.testing.assert_close(m.layer.grad_matrix(), want, rtol=1e-13, atol=0)
        if inner_products:
            torch.testing.assert_close(inner[name], torch.vdot(want.reshape(-1), grads[name].reshape(-1)), rtol=1e-12, atol=0)
        else:
            assert name not in inner
