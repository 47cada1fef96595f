"""MMDiT (SD3 / SD3.5 / FLUX): parameter groups on the published configs and the flow-matching objective."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

from ablation import losses
from ablation.config import ConfigError
from ablation.params import MMDIT_GROUPS, count_parameters, fused_modules, group_modules, setup_trainable
from ablation.published import FLUX_DEV, SD35_LARGE, SD35_MEDIUM
from ablation.testing import tiny_mmdit_pipeline

# transformer/config.json of the published checkpoints (ablation.published)
PUBLISHED = {"sd3.5-medium": (SD3Transformer2DModel, SD35_MEDIUM), "sd3.5-large": (SD3Transformer2DModel, SD35_LARGE),
             "flux.1-dev": (FluxTransformer2DModel, FLUX_DEV)}


def _kv(blocks: int, width: int) -> int:
    """add_k_proj + add_v_proj of `blocks` joint blocks: 2 x (width x width weight + width bias)."""
    return blocks * 2 * (width * width + width)


def _embedders(width: int, pooled: int, joint: int = 4096) -> int:
    """context_embedder (joint -> width) + text_embedder linear_1 (pooled -> width) and linear_2 (width -> width)."""
    return (joint * width + width) + (pooled * width + width) + (width * width + width)


# name -> group -> dense parameter count (SD 1.4's cross-attn, for scale: 19,169,280; tests/test_params.py)
EXPECTED = {
    "sd3.5-medium": {"cross-attn": 113_319_936, "text-kv+embedders": 125_121_024, "attn": 573_682_176,
                     "full": 2_243_171_520},
    "sd3.5-large": {"cross-attn": 449_696_256, "text-kv+embedders": 470_560_384, "attn": 1_792_867_968,
                    "full": 8_056_627_520},
    "flux.1-dev": {"cross-attn": 358_729_728, "text-kv+embedders": 383_118_336, "attn": 2_511_108_096,
                   "full": 11_901_408_320},
}


def test_expected_counts_follow_from_the_shapes():
    assert EXPECTED["sd3.5-medium"]["cross-attn"] == _kv(24, 1536)
    assert EXPECTED["sd3.5-large"]["cross-attn"] == _kv(38, 2432)
    assert EXPECTED["flux.1-dev"]["cross-attn"] == _kv(19, 3072)  # the 19 double-stream blocks only
    assert EXPECTED["sd3.5-medium"]["text-kv+embedders"] == _kv(24, 1536) + _embedders(1536, 2048)
    assert EXPECTED["sd3.5-large"]["text-kv+embedders"] == _kv(38, 2432) + _embedders(2432, 2048)
    assert EXPECTED["flux.1-dev"]["text-kv+embedders"] == _kv(19, 3072) + _embedders(3072, 768)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_group_counts_on_published_configs(name):
    cls, config = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: no memory
        model = cls(**config)
    counts = {group: count_parameters(model, group) for group in MMDIT_GROUPS}
    assert counts == EXPECTED[name]
    assert counts["full"] == sum(p.numel() for p in model.parameters())


def test_sd35_medium_cross_attn_is_not_attn2():
    cls, config = PUBLISHED["sd3.5-medium"]
    with torch.device("meta"):
        model = cls(**config)
    names = group_modules(model, "cross-attn")
    assert len(names) == 48 and not any("attn2" in n for n in names)
    # attn2 is an image self-attention: it has no text projections at all
    assert not any(n.startswith("transformer_blocks.0.attn2.add_") for n, _ in model.named_modules())
    assert "transformer_blocks.0.attn2.to_k" in group_modules(model, "attn")


def _grad_names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tiny_selection_is_exact(kind):
    pipe = tiny_mmdit_pipeline(kind)
    trainable = setup_trainable(pipe, "cross-attn")
    names = _grad_names(pipe.transformer)
    blocks = len(pipe.transformer.transformer_blocks)
    assert names == {f"transformer_blocks.{i}.attn.add_{p}_proj.{w}" for i in range(blocks) for p in "kv"
                     for w in ("weight", "bias")}
    assert set(trainable.param_names) == {"transformer"} and set(trainable.param_names["transformer"]) == names
    assert not any(p.requires_grad for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                   if getattr(pipe, n, None) is not None for p in getattr(pipe, n).parameters())

    pipe = tiny_mmdit_pipeline(kind)
    setup_trainable(pipe, "text-kv+embedders")
    extra = {n.rsplit(".", 1)[0] for n in _grad_names(pipe.transformer) - names}
    assert extra == {"context_embedder", "time_text_embed.text_embedder.linear_1",
                     "time_text_embed.text_embedder.linear_2"}


def test_flux_attn_group_includes_single_stream_blocks_but_cross_attn_does_not():
    pipe = tiny_mmdit_pipeline("flux")
    attn = group_modules(pipe.transformer, "attn")
    assert {"single_transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_add_out"} <= set(attn)
    assert not any(n.startswith("single_") for n in group_modules(pipe.transformer, "text-kv+embedders"))


def test_mmdit_embedding_group_only_without_t5_and_names_its_groups():
    pipe = tiny_mmdit_pipeline("sd3")  # with T5: the concept would still reach the transformer through T5
    with pytest.raises(ConfigError, match="SD3 loaded without T5"):
        setup_trainable(pipe, "embedding", token_ids=[1])
    with pytest.raises(ConfigError, match="T5"):
        setup_trainable(tiny_mmdit_pipeline("flux"), "embedding", token_ids=[1])
    with pytest.raises(ConfigError, match="text-kv\\+embedders"):
        group_modules(pipe.transformer, "bogus")
    pipe.text_encoder_3 = pipe.tokenizer_3 = None  # SD3 without T5: the CLIP rows are the whole text path
    trainable = setup_trainable(pipe, "embedding", token_ids=[5, 7])
    assert set(trainable.parameters) == {"text_encoder", "text_encoder_2"}
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fused_projections_are_refused_then_unfused(kind):
    pipe = tiny_mmdit_pipeline(kind)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from ablation.architectures import adapter_for

    adapter = adapter_for(pipe)
    cond = adapter.encode_prompts(pipe, ["a cat"], "cpu")
    t = torch.tensor([400.0])
    with torch.no_grad():
        before = adapter.predict(pipe.transformer, x, t, cond)
    pipe.transformer.fuse_qkv_projections()
    assert any(n.endswith("to_added_qkv") for n in fused_modules(pipe.transformer))
    with pytest.raises(ConfigError, match="fused"):
        group_modules(pipe.transformer, "cross-attn")
    setup_trainable(pipe, "cross-attn")
    assert fused_modules(pipe.transformer) == []
    out = adapter.predict(pipe.transformer, x, t, cond)
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()  # the trained layers are on the forward path again
    assert pipe.transformer.transformer_blocks[0].attn.add_k_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# flow matching
# --------------------------------------------------------------------------------------------------

SD3_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0)
FLUX_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)


def test_flow_interpolation_and_velocity_by_hand():
    z0 = torch.tensor([[2.0, 4.0]])
    eps = torch.tensor([[-1.0, 0.0]])
    # (1 - 0.25) * 2 + 0.25 * (-1) = 1.25;  0.75 * 4 = 3
    noisy = losses.flow_noisy_latents(z0, eps, torch.tensor([0.25]))
    assert noisy.tolist() == [[1.25, 3.0]]
    assert losses.flow_velocity(z0, eps).tolist() == [[-3.0, -4.0]]
    # the velocity is d z_t / dt: z_1 - z_0 along the straight path
    z1 = losses.flow_noisy_latents(z0, eps, torch.tensor([1.0]))
    z_0 = losses.flow_noisy_latents(z0, eps, torch.tensor([0.0]))
    torch.testing.assert_close(z1 - z_0, losses.flow_velocity(z0, eps))
    # noise-based loss: mean of ((-3 - -2)^2, (-4 - -4)^2) = 0.5
    assert losses.noise_based_loss(torch.tensor([[-2.0, -4.0]]), losses.flow_velocity(z0, eps)).item() == 0.5


def test_static_shift_sd3_by_hand():
    u = torch.tensor([0.25, 0.5, 0.75])
    # 3u / (1 + 2u): 0.75/1.5 = 0.5, 1.5/2 = 0.75, 2.25/2.5 = 0.9
    torch.testing.assert_close(losses.flow_sigmas(u, SD3_SCHEDULER), torch.tensor([0.5, 0.75, 0.9]))


def test_dynamic_shift_flux_by_hand():
    # mu = 0.5 + (seq - 256) * 0.65 / 3840: 256 tokens (512 px) -> 0.5, 1024 -> 0.63, 4096 (1024 px) -> 1.15
    assert losses.image_shift_mu(FLUX_SCHEDULER, 256) == pytest.approx(0.5)
    assert losses.image_shift_mu(FLUX_SCHEDULER, 1024) == pytest.approx(0.63)
    assert losses.image_shift_mu(FLUX_SCHEDULER, 4096) == pytest.approx(1.15)
    u = torch.tensor([0.5])
    # e^mu / (e^mu + 1/u - 1) at u = 0.5 is sigmoid(mu): 0.62246 at 512 px, 0.75951 at 1024 px
    assert losses.flow_sigmas(u, FLUX_SCHEDULER, 256).item() == pytest.approx(0.622459, abs=1e-6)
    assert losses.flow_sigmas(u, FLUX_SCHEDULER, 4096).item() == pytest.approx(0.759510, abs=1e-6)
    with pytest.raises(ValueError, match="sequence length"):
        losses.flow_sigmas(u, FLUX_SCHEDULER)


def test_sampled_sigmas_are_shifted_logit_normal():
    g = torch.Generator().manual_seed(7)
    sigmas = losses.sample_flow_sigmas(SD3_SCHEDULER, 4, g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (4,), generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(sigmas, 3 * u / (1 + 2 * u))
    # logit-normal(0, 1) has median 1/2; shift 3 moves it to 0.75; FLUX at 1024 px to sigmoid(1.15) = 0.7595
    many = losses.sample_flow_sigmas(SD3_SCHEDULER, 20000, torch.Generator().manual_seed(0))
    assert many.median().item() == pytest.approx(0.75, abs=0.01)
    many = losses.sample_flow_sigmas(FLUX_SCHEDULER, 20000, torch.Generator().manual_seed(0), image_seq_len=4096)
    assert many.median().item() == pytest.approx(0.7595, abs=0.01)
    assert many.min() > 0 and many.max() < 1


def test_loss_weights_and_weighted_mse_by_hand():
    sigmas = torch.tensor([0.5, 0.25])
    # cosmap: 2 / (pi (1 - 2s + 2s^2)): s = 0.5 -> 4/pi; s = 0.25 -> 2 / (pi * 0.625)
    torch.testing.assert_close(losses.flow_loss_weights(sigmas, "cosmap"),
                               torch.tensor([4 / math.pi, 2 / (math.pi * 0.625)]))
    assert losses.flow_loss_weights(sigmas, "logit_normal").tolist() == [1.0, 1.0]
    pred, target = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    # per sample: mean(1, 1) = 1, mean(4, 0) = 2; weights (1, 3): (1 + 6) / 2 = 3.5
    assert losses.weighted_mse(pred, target, torch.tensor([1.0, 3.0])).item() == 3.5
    assert losses.weighted_mse(pred, target).item() == losses.noise_based_loss(pred, target).item() == 1.5
