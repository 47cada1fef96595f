"""Parameter groups: counts on the published UNet configs (meta device) and selection on tiny pipelines."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from ablation.config import ConfigError
from ablation.params import count_parameters, setup_trainable, target_token_ids
from ablation.testing import tiny_pipeline

CONFIGS = json.loads((Path(__file__).parent / "data" / "unet_configs.json").read_text())

# name -> group -> dense parameter count (computed once from the configs; SD 1.4's cross-attn is the
# paper's "about 19.2M", attn its "about 93.5M", full the 860M UNet)
EXPECTED = {
    "sd14": {"cross-attn": 19_169_280, "attn": 93_536_640, "full": 859_520_964},
    "sd21": {"cross-attn": 25_559_040},
    "sdxl": {"cross-attn": 340_787_200},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_group_counts_on_published_configs(name):
    with torch.device("meta"):  # shapes only: no memory, no forward pass
        unet = UNet2DConditionModel(**CONFIGS[name])
    for group, expected in EXPECTED[name].items():
        assert count_parameters(unet, group) == expected, (name, group)


def _grad_names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_cross_attn_and_attn_select_only_their_projections():
    pipe = tiny_pipeline("sd1")
    trainable = setup_trainable(pipe, "cross-attn")
    names = _grad_names(pipe.unet)
    assert names and all(n.split(".")[-3] == "attn2" and n.split(".")[-2] in ("to_k", "to_v") for n in names)
    assert names == set(trainable.param_names["unet"]) == set(trainable.parameters["unet"])
    assert not _grad_names(pipe.text_encoder)

    pipe = tiny_pipeline("sd1")
    setup_trainable(pipe, "attn")
    names = _grad_names(pipe.unet)
    assert {n.split(".")[-2] for n in names} >= {"to_q", "to_k", "to_v", "0"}  # to_out.0 weight and bias
    assert {n.split(".")[-3] for n in names if "to_out" not in n} == {"attn1", "attn2"}


def test_lora_trains_adapters_only():
    pipe = tiny_pipeline("sd2")
    trainable = setup_trainable(pipe, "cross-attn", lora_rank=2, lora_alpha=2)
    names = _grad_names(pipe.unet)
    assert trainable.lora and names and all("lora_" in n for n in names)
    assert all(".attn2.to_k" in n or ".attn2.to_v" in n for n in names)
    # the delta lists the base weights the adapters merge into
    assert all(n.endswith(".weight") and "lora_" not in n for n in trainable.param_names["unet"])


def test_embedding_trains_only_target_rows_of_both_sdxl_encoders():
    pipe = tiny_pipeline("sdxl")
    ids = target_token_ids(pipe.tokenizer, "grumpy cat", "cat")
    assert ids == pipe.tokenizer("grumpy", add_special_tokens=False).input_ids
    before = {n: getattr(pipe, n).get_input_embeddings().weight.detach().clone() for n in ("text_encoder",
                                                                                         "text_encoder_2")}
    trainable = setup_trainable(pipe, "embedding", token_ids=ids)
    assert set(trainable.parameters) == {"text_encoder", "text_encoder_2"}
    assert not _grad_names(pipe.unet)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name)
        assert not _grad_names(encoder)  # the matrix is frozen: no gradient or AdamW state for 49408 rows
        (rows,) = trainable.parameters[name].values()
        assert rows.shape == (len(ids), before[name].shape[1]) and rows.requires_grad
        tokens = pipe.tokenizer(["a grumpy cat", "a cat"], return_tensors="pt", padding="max_length").input_ids
        out = encoder(tokens).last_hidden_state
        out[0].sum().backward()
        assert rows.grad is not None and rows.grad.abs().sum() > 0
        with torch.no_grad():
            rows.add_(1.0)  # as an optimizer step would
            after = encoder(tokens).last_hidden_state
        assert not torch.allclose(after[0], out[0].detach())  # the prompt with the target token changed
        assert torch.allclose(after[1], out[1].detach())  # the prompt without it did not
    trainable.write_back()
    for name in ("text_encoder", "text_encoder_2"):
        weight = getattr(pipe, name).get_input_embeddings().weight
        changed = (weight != before[name]).any(1).nonzero().flatten().tolist()
        assert changed == ids  # exactly the target's rows, now in the matrix
        assert torch.equal(weight[ids], before[name][ids] + 1.0)


def test_embedding_needs_a_token_of_its_own():
    pipe = tiny_pipeline("sd1")
    with pytest.raises(ConfigError, match="no tokens of its own"):
        target_token_ids(pipe.tokenizer, "Cat", "cat")
