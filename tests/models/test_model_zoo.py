"""The common model zoos, built from tiny configs: almost every weight is preconditioned, and steps stay finite.

For each model: at least 95 % of the trainable parameters are in managed
layers (norm layers' parameters and a few vector-like ones may fall back),
with the default policy and with diagonal SINGD (and dense K-FAC on the
transformers models, whose factors are small), and two fp32 steps and one
step under CPU bf16 autocast are finite. transformers runs in the core test
env; timm and torchvision in ``.venv-vision`` (``make test``); a missing
package skips its models unless ``SINGD_RKFAC_REQUIRE`` names it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import singd_rkfac as sr
from models._require import need

MIN_SHARE = 0.95


def _transformers(name: str) -> nn.Module:
    import transformers as hf

    tiny = {"vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "gpt2":
        return hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, **tiny))
    if name == "bert":
        return hf.BertForMaskedLM(hf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                                intermediate_size=128, max_position_embeddings=64, **tiny))
    return hf.LlamaForCausalLM(hf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, **tiny))


def _vision(name: str) -> nn.Module:
    if name == "torchvision-resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    import timm

    kwargs = {"img_size": 32, "patch_size": 4} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=10, **kwargs)


TEXT = ["gpt2", "bert", "llama"]
VISION = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_050", "efficientnet_b0", "torchvision-resnet18"]
POLICIES = {"default": sr.Policy, "singd-diagonal": lambda: sr.Policy(sr.SINGD(structure="diagonal")), "kfac": lambda: sr.Policy(sr.KFAC())}


def _managed_share(model: nn.Module, opt: sr.Optimizer) -> float:
    managed = {id(p) for params in opt.preconditioner.managed_parameters().values() for p in params}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable if id(p) in managed) / sum(p.numel() for p in trainable)


def _steps(model: nn.Module, opt: sr.Optimizer, loss_of) -> list[float]:
    """Two fp32 steps and one under CPU bf16 autocast; the losses."""
    losses = []
    for autocast in (False, False, True):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check(model: nn.Module, policy: sr.Policy, loss_of) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # which modules fall back is the share's business here
        opt = sr.Optimizer(model, policy, lr=1e-3, fallback="adamw", fallback_options={"lr": 1e-4})
    share = _managed_share(model, opt)
    assert share >= MIN_SHARE, f"{share:.3f} of the parameters managed\n{opt.describe()}"
    losses = _steps(model, opt, loss_of)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.skipped_steps == 0


@pytest.mark.parametrize("policy", POLICIES, ids=POLICIES.keys())
@pytest.mark.parametrize("name", TEXT)
def test_transformers_models_are_managed_and_step_finitely(name, policy):
    need("transformers")
    torch.manual_seed(0)
    model = _transformers(name)
    tokens = torch.randint(1, 1000, (2, 16))
    _check(model, POLICIES[policy](), lambda m: m(input_ids=tokens, labels=tokens).loss)


@pytest.mark.parametrize("policy", ["default", "singd-diagonal"])
@pytest.mark.parametrize("name", VISION)
def test_vision_models_are_managed_and_step_finitely(name, policy):
    need("torchvision" if name.startswith("torchvision") else "timm")
    torch.manual_seed(0)
    model = _vision(name)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _check(model, POLICIES[policy](), lambda m: nn.functional.cross_entropy(m(x).float(), y))


def test_gpt2_with_a_real_vocabulary_keeps_its_curvature_state_small():
    """vocabulary 50 257, width 64: the tied wte/lm_head's vocabulary side is diagonal, the state < 2× AdamW's."""
    need("transformers")
    import transformers as hf

    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=50257))
    opt = sr.Optimizer(model, sr.Policy(), lr=1e-3, fallback="adamw")
    assert "A: diagonal (auto: width 50257 > 8192)" in opt.describe()
    tokens = torch.randint(0, 50257, (2, 16))
    losses = _steps(model, opt, lambda m: m(input_ids=tokens, labels=tokens).loss)
    assert all(math.isfinite(v) for v in losses)
    adamw_state = 2 * 4 * sum(p.numel() for p in model.parameters())  # exp_avg + exp_avg_sq, fp32
    assert sum(opt.memory_bytes().values()) < 2 * adamw_state
