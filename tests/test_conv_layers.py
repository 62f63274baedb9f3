"""Conv1d / Conv2d / Conv3d adapter: patches, groups, row layouts, K-FAC against curvlinops, training.

Oracles: the convolution itself (rows @ weight = output), autograd (Σ gᵀa = ∇W,
torch.func per-sample gradients), torch's im2col (`F.unfold`), and curvlinops'
K-FAC of an equivalent network made of padding-free ``nn.Conv2d`` layers, one
per group (curvlinops handles neither Conv1d/Conv3d nor non-zero padding modes
nor, in our sense, groups; `Equivalent` checks it computes the same function).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import singd_rkfac as sr
from singd_rkfac.data import load_digits
from singd_rkfac.layers import ConvLayer, layer_class

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning"),  # torch notes a padded copy
]

F64 = torch.float64
SPATIAL = {1: (9,), 2: (7, 6), 3: (4, 5, 4)}


def _weight_matrix(conv: nn.Module) -> Tensor:
    """``[W | b]`` as ``(c_out, d_a)`` straight from the module's parameters (or their ``.grad``)."""
    weight = conv.weight.reshape(conv.weight.shape[0], -1)
    return weight if conv.bias is None else torch.cat([weight, conv.bias[:, None]], 1)


def _grad_matrix(conv: nn.Module) -> Tensor:
    weight = conv.weight.grad.reshape(conv.weight.shape[0], -1)
    return weight if conv.bias is None else torch.cat([weight, conv.bias.grad[:, None]], 1)


def _output_from_rows(rows: Tensor, conv: nn.Module, n: int) -> Tensor:
    """The conv output ``(n, c_out, positions)`` rebuilt from expand rows: row (n, t, j) times group j's weight rows."""
    weight = rearrange(_weight_matrix(conv), "(j c) d -> j c d", j=conv.groups)
    rows = rearrange(rows, "(n t j) d -> n t j d", n=n, j=conv.groups)
    return rearrange(einsum(rows, weight, "n t j d, j c d -> n j c t"), "n j c t -> n (j c) t")


@st.composite
def conv_configs(draw):
    """A Conv1d/2d/3d with random kernel, stride, dilation, padding (numbers, "same", "valid"), mode, groups, bias."""
    dims = draw(st.integers(1, 3))

    def per_dim(low: int, high: int):
        return draw(st.tuples(*[st.integers(low, high)] * dims))

    padding = draw(st.sampled_from(["same", "valid", "numbers"]))
    groups = draw(st.integers(1, 3))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        groups * draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 2)),
        per_dim(1, 3),
        stride=1 if padding == "same" else per_dim(1, 3),
        dilation=per_dim(1, 2),
        padding=per_dim(0, 2) if padding == "numbers" else padding,
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        groups=groups,
        bias=draw(st.booleans()),
    )
    return conv.double()


@settings(max_examples=80, deadline=None)
@given(conv=conv_configs())
def test_rows_reproduce_the_convolution_and_its_weight_gradient(conv):
    """rows @ [W | b]ᵀ = conv(x) per group, and Σ gᵀa = autograd's [∇W | ∇b] (both oracles can fail)."""
    x = torch.randn(2, conv.in_channels, *SPATIAL[conv.weight.dim() - 2], dtype=F64)
    try:
        output = conv(x)
    except RuntimeError:
        return  # a configuration torch itself rejects (kernel or reflect padding wider than the input)
    layer = ConvLayer(conv)
    a = layer.input_rows(x, "expand", F64)
    torch.testing.assert_close(_output_from_rows(a, conv, 2), output.flatten(2))
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    g = layer.output_rows(grad_output, "expand", F64)
    torch.testing.assert_close(g.T @ a, _grad_matrix(conv))


@pytest.mark.parametrize("kernel,dilation", [(2, 1), (4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_same_padding_with_odd_or_even_total_matches_torch(dims, kernel, dilation):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, kernel, dilation=dilation, padding="same").double()
    x = torch.randn(2, 2, *(7,) * dims, dtype=F64)
    rows = ConvLayer(conv).input_rows(x, "expand", F64)
    torch.testing.assert_close(_output_from_rows(rows, conv, 2), conv(x).flatten(2))


@pytest.mark.parametrize(
    "kwargs",
    [{"padding": 1}, {"stride": 2, "dilation": (2, 1), "padding": (2, 0)}, {"padding": "valid"}, {"padding": "same", "bias": False}],
)
def test_groups_one_rows_are_torchs_im2col_patches(kwargs):
    """With ``groups=1`` the rows are exactly `F.unfold`'s patches (the previous Conv2d adapter's rows)."""
    conv = nn.Conv2d(3, 4, 3, **kwargs).double()
    x = torch.randn(2, 3, 8, 7, dtype=F64)
    padding = (1, 1) if kwargs["padding"] == "same" else (0 if kwargs["padding"] == "valid" else kwargs["padding"])
    patches = rearrange(
        F.unfold(x, 3, dilation=conv.dilation, padding=padding, stride=conv.stride), "n d t -> (n t) d"
    )
    rows = ConvLayer(conv).input_rows(x, "expand", F64)
    torch.testing.assert_close(rows[:, : patches.shape[1]], patches, rtol=0, atol=0)


CONVS = {
    "conv2d-stride-pad": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 6)),
    "conv1d-groups2-reflect": (nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect", groups=2), (4, 9)),
    "conv2d-depthwise-circular": (nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="circular", groups=3), (3, 7, 6)),
    "conv3d-groups2-same": (nn.Conv3d(4, 2, (2, 3, 1), dilation=(1, 1, 2), padding="same", groups=2), (4, 3, 5, 4)),
}


@pytest.mark.parametrize("name", CONVS)
def test_layouts_shapes_and_per_sample_gradients(name):
    """``sample``: Σ over each sample's (position, group) rows of gᵀa is torch.func's per-sample gradient;
    ``reduce``: one row per (sample, group); ``expand``: one per (sample, position, group)."""
    conv, shape = CONVS[name]
    conv = copy.deepcopy(conv).double()
    n = 3
    x = torch.randn(n, *shape, dtype=F64)
    output = conv(x)
    grad_output = torch.randn_like(output)
    layer = ConvLayer(conv)
    positions, groups, d_a, d_g = output[0, 0].numel(), conv.groups, layer.dims.d_a, layer.dims.d_g
    a, g = layer.input_rows(x, "sample", F64), layer.output_rows(grad_output, "sample", F64)
    assert a.shape == (n, positions * groups, d_a) and g.shape == (n, positions * groups, d_g)
    assert layer.input_rows(x, "reduce", F64).shape == (n * groups, d_a)
    assert layer.output_rows(grad_output, "reduce", F64).shape == (n * groups, d_g)
    assert layer.input_rows(x, "expand", F64).shape == (n * positions * groups, d_a)

    params = {k: v.detach() for k, v in conv.named_parameters()}

    def loss(p, x_i, g_i):
        return (functional_call(conv, p, (x_i[None],)) * g_i[None]).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, grad_output)
    expected = torch.cat([per_sample["weight"].flatten(2), per_sample["bias"][..., None]], 2)
    torch.testing.assert_close(einsum(g, a, "n p o, n p i -> n o i"), expected)


def test_unbatched_input_is_one_sample():
    conv = nn.Conv1d(4, 2, 3, groups=2).double()
    layer = ConvLayer(conv)
    x = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(layer.input_rows(x, "expand", F64), layer.input_rows(x[None], "expand", F64))
    torch.testing.assert_close(layer.output_rows(conv(x), "reduce", F64), layer.output_rows(conv(x)[None], "reduce", F64))
    assert layer.batch_size(x) == 1 and layer.batch_size(x[None]) == 1


def test_every_conv_dimension_is_managed_and_transposed_convs_are_not():
    for module in (nn.Conv1d(2, 2, 1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv3d(2, 4, 1, groups=2)):
        assert layer_class(module) is ConvLayer
    assert layer_class(nn.ConvTranspose2d(2, 2, 3)) is None
    layer = ConvLayer(nn.Conv2d(6, 4, (3, 2), groups=2))
    assert (layer.dims.d_a, layer.dims.d_g) == (3 * 3 * 2 + 1, 4)


# -- K-FAC against curvlinops ------------------------------------------------------------------------------
class Equivalent(nn.Module):
    """``conv``'s function from padding-free ``nn.Conv2d`` layers (curvlinops' kind), one per group.

    The input is padded explicitly with torch's own padding of the module, then
    made 2-D: Conv1d sees a height-1 image; a Conv3d whose kernel is as deep as
    the padded input folds depth into channels (its one output depth is the
    only one). Weights and biases are copies, split by group.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.dims = conv.weight.dim() - 2
        self.pads = conv._reversed_padding_repeated_twice  # torch's resolution of every padding option
        self.mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        weight = conv.weight.detach()
        weight = weight[:, :, None] if self.dims == 1 else weight.flatten(1, 2) if self.dims == 3 else weight
        pad_free = dict(stride=(1, *conv.stride)[-2:], dilation=(1, *conv.dilation)[-2:], bias=conv.bias is not None)
        self.convs = nn.ModuleList()
        biases = conv.bias.detach().chunk(conv.groups) if conv.bias is not None else [None] * conv.groups
        for w, b in zip(weight.chunk(conv.groups), biases):
            part = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], **pad_free).to(w.dtype)
            with torch.no_grad():
                part.weight.copy_(w)
                if b is not None:
                    part.bias.copy_(b)
            self.convs.append(part)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, self.pads, mode=self.mode)
        x = x[:, :, None] if self.dims == 1 else x.flatten(1, 2) if self.dims == 3 else x
        y = torch.cat([part(chunk) for part, chunk in zip(self.convs, x.chunk(len(self.convs), 1))], 1)
        return y[:, :, 0] if self.dims == 1 else y[:, :, None] if self.dims == 3 else y


VARIANTS = {
    "conv1d-stride-dilation-circular": (nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="circular"), (2, 11)),
    "conv1d-same-even-kernel": (nn.Conv1d(2, 3, 4, padding="same"), (2, 9)),
    "conv1d-groups2-reflect": (nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect", groups=2), (4, 9)),
    "conv2d-circular": (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6, 6)),
    "conv2d-reflect-stride-dilation": (
        nn.Conv2d(2, 3, 3, stride=(2, 1), dilation=(1, 2), padding=(1, 2), padding_mode="reflect"), (2, 7, 6)
    ),
    "conv2d-same-asymmetric-no-bias": (nn.Conv2d(2, 3, (2, 4), padding="same", bias=False), (2, 5, 6)),
    "conv2d-groups2-replicate": (nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", groups=2), (4, 5, 5)),
    "conv2d-depthwise-circular": (nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="circular", groups=3), (3, 7, 6)),
    "conv2d-depthwise-diagonal-g": (nn.Conv2d(3, 3, 3, padding=1, groups=3), (3, 5, 5)),
    "conv3d-stride-dilation": (nn.Conv3d(2, 3, (3, 2, 3), stride=(1, 2, 1), dilation=(1, 1, 2), padding=(0, 1, 1)), (2, 3, 5, 6)),
    "conv3d-groups2-same": (nn.Conv3d(4, 2, (3, 3, 2), padding="same", groups=2), (4, 1, 4, 5)),
}


def _models(name: str):
    """Our network (conv, ReLU, flatten, linear) and its curvlinops-compatible twin."""
    conv, shape = VARIANTS[name]
    conv = copy.deepcopy(conv).double()
    with torch.no_grad():
        features = conv(torch.zeros(1, *shape, dtype=F64)).numel()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 4).double())
    twin = nn.Sequential(Equivalent(conv), nn.ReLU(), nn.Flatten(), copy.deepcopy(model[3]))
    batch = torch.randn(6, *shape, dtype=F64), torch.randint(0, 4, (6,))
    return model, twin, batch


def _curvlinops_factors(twin: nn.Module, batch, approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer of our model: curvlinops' (A, G), the groups' convs combined as (mean of A_j, block-diag of G_j)."""
    curvlinops = pytest.importorskip("curvlinops")
    kfac = curvlinops.KFACLinearOperator(
        twin, nn.CrossEntropyLoss(), list(twin.parameters()), [batch], fisher_type="empirical",
        kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    parts = [f"0.convs.{j}" for j in range(len(twin[0].convs))]
    a_conv = torch.stack([kfac._input_covariances[p] for p in parts]).mean(0)
    g_conv = torch.block_diag(*[kfac._gradient_covariances[p] for p in parts])
    return {"0": (a_conv, g_conv), "3": (kfac._input_covariances["3"], kfac._gradient_covariances["3"])}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", VARIANTS)
def test_factors_and_exactly_damped_direction_equal_curvlinops(name, approx):
    damping = 1e-2
    model, twin, batch = _models(name)
    torch.testing.assert_close(twin(batch[0]), model(batch[0]))  # the twin is the same function
    expected = _curvlinops_factors(twin, batch, approx)
    pre = sr.Preconditioner(model, sr.Policy(sr.KFAC(kfac_approx=approx, damping=damping, damping_mode="exact")))
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    gradients = {"0": _grad_matrix(model[0]).clone(), "3": _grad_matrix(model[3]).clone()}  # step() overwrites .grad
    pre.step()
    assert set(pre.layers) == set(expected)
    for layer, (a, g) in expected.items():
        curvature = pre.layers[layer].curvature
        torch.testing.assert_close(curvature.a_factor.value, a, rtol=1e-12, atol=1e-14)
        if pre.layers[layer].layer.dims.diagonal_g:  # depthwise: G is diagonal by construction, kept as d numbers
            assert curvature.g_factor.value.shape == (g.shape[0],) and torch.equal(g, torch.diag(g.diagonal()))
            torch.testing.assert_close(curvature.g_factor.value, g.diagonal(), rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(curvature.g_factor.value, g, rtol=1e-12, atol=1e-14)
        # (A ⊗ G + λI)⁻¹ vec ∇W, dense; row-major vec(G X A) = (G ⊗ A) vec(X)
        system = torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=F64)
        direction = torch.linalg.solve(system, gradients[layer].flatten()).reshape(gradients[layer].shape)
        torch.testing.assert_close(_grad_matrix(model[int(layer)]), direction, rtol=1e-9, atol=1e-12)


# -- training ---------------------------------------------------------------------------------------------
def _grouped_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 8, 3, stride=2, padding="valid", groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 10),
    )


def _grouped_conv1d() -> nn.Sequential:
    """Digits as sequences: 8 rows (channels) × 8 columns (positions)."""
    return nn.Sequential(
        nn.Unflatten(1, (8, 8)),
        nn.Conv1d(8, 8, 3, padding="same", padding_mode="circular", groups=2), nn.ReLU(),
        nn.Conv1d(8, 12, 3, stride=2, dilation=2, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 2, 10),
    )


@pytest.mark.parametrize("method", [sr.KFAC(damping=1e-2), sr.KFAC(kfac_approx="reduce", damping=1e-2), sr.SINGD(lr_cov=0.05)],
                         ids=["kfac-expand", "kfac-reduce", "singd"])
@pytest.mark.parametrize("build,images", [(_grouped_cnn, True), (_grouped_conv1d, False)], ids=["conv2d", "conv1d"])
def test_grouped_conv_networks_are_managed_and_train(build, images, method):
    data = load_digits(images=images)
    model = build()
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.05, momentum=0.9)
    convs = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    assert convs <= set(opt.preconditioner.layers) and any(model.get_submodule(c).groups > 1 for c in convs)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        index = torch.randint(0, data.x_train.shape[0], (64,), generator=generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    with torch.no_grad():
        final = F.cross_entropy(model(data.x_train), data.y_train)
    assert torch.isfinite(torch.stack(losses)).all() and all(torch.isfinite(p).all() for p in model.parameters())
    assert final < 0.5 * losses[0]
