"""The control-prompt penalty (ablation/preserve.py): its value by hand, LoRA and dense, and its effect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ablation.concepts import resolve_concepts
from ablation.config import ConceptSpec
from ablation.preserve import KVPreservation, control_prompts, second_moment


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_k = nn.Linear(2, 2, bias=False)
        self.to_v = nn.Linear(2, 2, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = _Attn()


def test_penalty_by_hand():
    block = _Block()
    with torch.no_grad():
        block.attn2.to_k.weight.copy_(torch.eye(2))
        block.attn2.to_v.weight.copy_(2 * torch.eye(2))
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # C = I / 2
    moment = second_moment(tokens)
    assert torch.equal(moment, torch.eye(2) / 2)
    dense = {f"attn2.{n}.weight": getattr(block.attn2, n).weight for n in ("to_k", "to_v")}
    penalty = KVPreservation(block, dense, moment)
    assert penalty().item() == 0.0  # nothing trained yet
    with torch.no_grad():
        block.attn2.to_k.weight[0, 0] += 1.0  # dW = [[1, 0], [0, 0]]
    # to_k: tr(dW C dW^T) / tr(W0 C W0^T) = 0.5 / 1.0; to_v unchanged: 0 -> mean 0.25
    assert penalty().item() == pytest.approx(0.25)
    penalty().backward()
    assert block.attn2.to_k.weight.grad[0, 0].item() == pytest.approx(0.5)  # d/dw (w^2 / 2 / 1) / 2 layers


def test_lora_penalty_uses_the_adapter_product():
    from peft import LoraConfig, inject_adapter_in_model

    block = _Block()
    block = inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["to_k", "to_v"]), block)
    moment = torch.eye(2)
    penalty = KVPreservation(block, None, moment)
    assert len(penalty.layers) == 2 and penalty().item() == 0.0  # lora_B starts at zero
    with torch.no_grad():
        block.attn2.to_k.lora_B["default"].weight.fill_(1.0)
    a = block.attn2.to_k.lora_A["default"].weight
    delta = torch.ones(2, 1) @ a
    w0 = block.attn2.to_k.base_layer.weight
    expected = (delta * delta).sum() / (w0 * w0).sum() / 2
    assert penalty().item() == pytest.approx(expected.item(), rel=1e-5)


def test_control_prompts_are_everything_but_the_target():
    concepts = resolve_concepts([ConceptSpec("grumpy cat", "cat")], toy=True)
    prompts = control_prompts(concepts, toy=True, limit=10_000)
    assert prompts and not any("grumpy" in p for p in prompts)
    for word in ("robot", "dog", "tabby cat", "van gogh"):  # other families, the neighbours, the styles
        assert any(word in p for p in prompts), word
    assert any(p.endswith(" cat") or " cat " in p for p in prompts if "tabby" not in p)  # the anchor itself
    real = control_prompts(resolve_concepts([ConceptSpec("Grumpy Cat", "cat")], toy=False), toy=False)
    assert real and len(real) <= 256 and not any("grumpy" in p.lower() for p in real)


def _kv_change(tmp_path, model_dir, prompts, **options) -> float:
    """Train a few steps on the tiny model; the K/V change dW measured on `prompts`' tokens, sum tr(dW C dW^T)."""
    from ablation.config import build_config
    from ablation.trainer import train

    out = tmp_path / "-".join(f"{k}{v}" for k, v in options.items())
    cfg = build_config(None, dict(model=model_dir, target=["Grumpy Cat"], anchor=["cat"], output_dir=str(out),
                                  cache_dir=str(tmp_path / "cache"), resolution=32, num_anchor_images=4,
                                  anchor_steps=2, max_steps=6, train_batch_size=2, learning_rate=3e-2,
                                  prior_preservation=False, checkpointing_steps=0, **options))
    result = train(cfg)
    moment = second_moment(_embeddings(result.pipeline, prompts))
    changes = []
    base = _fresh_unet(model_dir)
    for name, module in result.pipeline.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            d = module.weight.detach() - base.get_submodule(name).weight.detach()
            changes.append(((d @ moment) * d).sum())
    return float(torch.stack(changes).sum())


def test_training_with_the_penalty_moves_control_tokens_less(tmp_path, model_dir):
    """Same run with and without the penalty: the control prompts' K/V outputs change less with it."""
    controls = control_prompts(resolve_concepts([ConceptSpec("Grumpy Cat", "cat")], toy=False), toy=False)[:32]
    assert _kv_change(tmp_path, model_dir, controls, preserve_weight=100.0) < 0.5 * _kv_change(
        tmp_path, model_dir, controls, preserve_weight=0.0)


def test_the_unconditional_penalty_holds_the_empty_prompt(tmp_path, model_dir):
    """--preserve-uncond: the empty prompt (classifier-free guidance's other half) keeps its keys/values."""
    free = _kv_change(tmp_path, model_dir, [""], preserve_uncond=0.0)
    held = _kv_change(tmp_path, model_dir, [""], preserve_uncond=1000.0)
    assert free > 0 and held < 0.05 * free, (free, held)


def test_penalties_add_their_weighted_terms():
    from ablation.preserve import Penalties

    class Term:
        moment = torch.zeros(2, 2)

        def __init__(self, value: float) -> None:
            self.value = value

        def __call__(self) -> torch.Tensor:
            return torch.tensor(self.value)

    assert Penalties([(10.0, Term(0.5)), (1000.0, Term(0.002))])().item() == pytest.approx(5.0 + 2.0)


def _fresh_unet(model_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")


def _embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    from ablation.architectures import encode_prompts

    pipe.text_encoder.to("cpu")
    with torch.no_grad():
        return encode_prompts(pipe, prompts, "cpu").embeds
