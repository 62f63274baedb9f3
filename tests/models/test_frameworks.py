"""The framework examples of docs/frameworks.md run as written: HF Trainer on GPT-2, timm under bf16 autocast.

Each test executes the page's block marked ``<!-- example: NAME -->`` (the docs
test leaves those blocks out) and checks what it left behind. A framework that
is not installed skips its test, unless ``SINGD_RKFAC_REQUIRE`` (a comma-separated
list, set by ``make test``) names it: then the missing import fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

import singd_rkfac as sr
from models._require import need
from test_docs import docs_example

def run_example(name: str, tmp_path, monkeypatch) -> dict:
    """Execute the docs/frameworks.md example ``name`` in ``tmp_path``; its namespace."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(docs_example("frameworks.md", name), "docs/frameworks.md", "exec"), namespace)
    return namespace


@pytest.fixture
def one_thread():
    """One intra-op thread for this test only (GPT-2's tensors are tiny; see conftest.one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def falls(losses: list[float], by: float) -> bool:
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - by


def test_gpt2_with_hf_trainer(tmp_path, monkeypatch, one_thread):
    need("transformers", "accelerate")
    ns = run_example("gpt2-trainer", tmp_path, monkeypatch)
    opt, trainer, losses = ns["opt"], ns["trainer"], ns["losses"]

    # The Trainer stepped our optimizer (wrapped by accelerate) once per step, and the scheduler with it.
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    assert opt.preconditioner.steps == ns["steps"] == trainer.state.global_step
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates == sorted(rates, reverse=True) and rates[-1] < rates[0], rates
    assert all(g["lr"] < g["initial_lr"] for g in opt.param_groups), "the cosine schedule reaches every group"

    # The loss falls from about ln 256 ≈ 5.5, whichever modules the policy manages.
    assert len(losses) == ns["steps"] // 5
    assert losses[0] < 6.0 and falls(losses, by=1.5), losses


def test_timm_resnet_under_bf16_autocast(tmp_path, monkeypatch):
    need("timm")
    ns = run_example("timm-bf16", tmp_path, monkeypatch)
    opt, losses = ns["opt"], ns["timm_losses"]

    assert ns["logits"].dtype == torch.bfloat16, "the forward ran under bf16 autocast"
    assert len(losses) == 10 and falls(losses, by=1.0), losses

    # The convolutions' SINGD state is bf16, as the policy asks.
    singd = {name: m for name, m in opt.preconditioner.layers.items() if isinstance(m.method, sr.SINGD)}
    assert singd, "the policy manages the convolutions"
    for name, m in singd.items():
        floats = [t for t in m.curvature.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert floats and all(t.dtype == torch.bfloat16 for t in floats), name
