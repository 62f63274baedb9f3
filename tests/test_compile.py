"""``torch.compile``: a compiled model keeps the capture hooks and gives the eager trajectory.

Most tests compile with ``backend="aot_eager"`` (Dynamo's graph capture and
AOTAutograd, no code generation): inductor's C++ build takes about 20 s per
model on a 2-core machine, so inductor runs on one CPU model and, with CUDA,
on every method.
``torch.compile(opt.step)`` works too; it breaks the graph at the step's host
syncs, so it buys little (see docs/layers.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from singd_rkfac import cli
from conftest import classification_batch, cnn, mlp

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here"),
]

METHODS = {"kfac": sr.KFAC(inverse_every=2), "singd": sr.SINGD(update_every=1)}
MODELS = {"mlp": (mlp, (6,), 3), "cnn": (cnn, (2, 8, 8), 4)}
#: (model, method) pairs: each compile costs seconds, so not every combination.
CASES = {"mlp-kfac": ("mlp", "kfac"), "cnn-singd": ("cnn", "singd")}


def _train(model: nn.Module, method: sr.Method, batches, *, compile_model: str | None = None, compile_step: bool = False):
    """Parameters and curvature state after training on ``batches`` (the model optionally compiled)."""
    torch._dynamo.reset()
    forward = model if compile_model is None else torch.compile(model, backend=compile_model)
    opt = sr.Optimizer(model, sr.Policy(method), lr=0.1, momentum=0.5)
    step = torch.compile(opt.step, backend="aot_eager") if compile_step else opt.step
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        step()
    state = opt.preconditioner.state_dict()["layers"]
    tensors = [t for layer in state.values() for t in layer["curvature"].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()], tensors


@pytest.mark.parametrize("case", CASES)
def test_compiled_model_gives_the_eager_trajectory(case):
    name, method_name = CASES[case]
    build, shape, classes = MODELS[name]
    method = METHODS[method_name]
    batches = [classification_batch(8, shape, classes) for _ in range(3)]
    model = build()
    eager_params, eager_state = _train(copy.deepcopy(model), method, batches)
    params, state = _train(model, method, batches, compile_model="aot_eager")
    assert len(state) == len(eager_state) > 0  # the hooks captured statistics through the compiled model
    for got, want in zip(params + state, eager_params + eager_state):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # float64; AOTAutograd may reorder sums


def test_compiled_transformer_lm_gives_the_eager_trajectory():
    """The ``lm`` benchmark's tiny LM: embeddings, a transformer block (attention on the fallback), a head."""
    lm = cli.load_benchmark("lm")
    size = lm.SIZES["quick"]
    model = lm.build_lm(size.vocab, size.dim, size.layers, False, heads=size.heads, context=size.context).double()
    twin = copy.deepcopy(model)
    batches = lm.token_batches(size.vocab, size.context, size.batch, 3, seed=1)
    for net, compile_model in ((model, None), (twin, "aot_eager")):
        torch._dynamo.reset()
        forward = net if compile_model is None else torch.compile(net, backend=compile_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the attention goes to the fallback rule
            opt = sr.Optimizer(net, sr.Policy(sr.KFAC(inverse_every=1)), lr=0.1, fallback="adamw")
        for batch in batches:
            opt.zero_grad()
            lm.lm_loss(forward, batch).backward()
            opt.step()
    for got, want in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_optimizer_built_on_the_compiled_model_uses_the_model_names():
    batches = [classification_batch(8, (6,), 3) for _ in range(3)]
    model = mlp()
    twin = copy.deepcopy(model)
    policy = sr.Policy(sr.KFAC(inverse_every=1), rules=[("4", sr.SINGD(update_every=1))])
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")
    assert policy.resolve(compiled) == policy.resolve(model)  # "4", not "_orig_mod.4"
    runs = []
    for net, forward in ((model, model), (twin, compiled)):
        opt = sr.Optimizer(forward, policy, lr=0.1)
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
        runs.append(opt)
    assert list(runs[1].preconditioner.layers) == ["0", "2", "4"] == list(runs[0].preconditioner.layers)
    for got, want in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiled_step_gives_the_eager_trajectory():
    method = METHODS["kfac"]
    batches = [classification_batch(8, (6,), 3) for _ in range(3)]
    model = mlp()
    eager_params, _ = _train(copy.deepcopy(model), method, batches)
    params, _ = _train(model, method, batches, compile_step=True)
    for got, want in zip(params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _inductor_matches_eager(method: sr.Method, device: str) -> None:
    batches = [tuple(t.to(device) for t in classification_batch(32, (6,), 3, dtype=torch.float32)) for _ in range(3)]
    model = mlp(torch.float32).to(device)
    eager_params, _ = _train(copy.deepcopy(model), method, batches)
    params, _ = _train(model, method, batches, compile_model="inductor")
    for got, want in zip(params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fused float32 kernels round differently


def test_inductor_on_cpu_gives_the_eager_trajectory():
    """One model on the CPU (inductor's C++ build costs ~20 s here); every method runs on CUDA below."""
    _inductor_matches_eager(METHODS["kfac"], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_inductor_on_cuda_gives_the_eager_trajectory(method):
    _inductor_matches_eager(method, "cuda")
