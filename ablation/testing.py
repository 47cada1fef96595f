"""Tiny, seeded, in-memory pipelines for tests and examples (no downloads).

Modelled on diffusers' `get_dummy_components`: every model has a few thousand to a few hundred
thousand parameters, all built from the real diffusers/transformers classes, so code that runs on
these runs on the published checkpoints of the same family.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ablation.tokenizer_util import clip_tokenizer

TinyKind = Literal["sd1", "sd2", "sdxl", "inpaint", "upscale"]
TINY_KINDS: tuple[TinyKind, ...] = ("sd1", "sd2", "sdxl", "inpaint", "upscale")
# Text length shorter than 77 keeps the tiny models fast; training and pipeline use the same value.
TINY_MAX_LENGTH = 16


def _text_encoder(hidden: int, projection: bool = False, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden, intermediate_size=2 * hidden,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=TINY_MAX_LENGTH, projection_dim=hidden, hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(blocks: int = 2, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16][:blocks], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32,
    ).eval()


def tiny_components(kind: TinyKind = "sd1", seed: int = 0) -> dict:
    """Components of a tiny pipeline of the given family, seeded.

    Args:
        kind: `sd1` (epsilon, one text encoder), `sd2` (v-prediction, wider cross-attention, linear
            projections), `sdxl` (two text encoders, pooled embeddings, added time ids), `inpaint`
            (9-channel UNet), `upscale` (x4 upscaler, 7-channel UNet, low-res noise scheduler).
        seed: torch seed for the random weights.

    Returns:
        Keyword arguments for the matching diffusers pipeline class (see `tiny_pipeline`).
    """
    tokenizer = clip_tokenizer(TINY_MAX_LENGTH)
    unet_common = dict(
        sample_size=16, layers_per_block=1, out_channels=4, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    sched_common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed)
    if kind in ("sd1", "inpaint"):
        unet = UNet2DConditionModel(block_out_channels=(8, 16), in_channels=9 if kind == "inpaint" else 4,
                                    cross_attention_dim=32, attention_head_dim=2, **unet_common)
        return dict(unet=unet, scheduler=DDIMScheduler(**sched_common), vae=_vae(seed=seed),
                    text_encoder=_text_encoder(32, seed=seed), tokenizer=tokenizer, safety_checker=None,
                    feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    if kind == "sd2":
        unet = UNet2DConditionModel(block_out_channels=(8, 16), in_channels=4, cross_attention_dim=48,
                                    attention_head_dim=(2, 4), use_linear_projection=True, **unet_common)
        return dict(unet=unet, scheduler=DDIMScheduler(prediction_type="v_prediction", **sched_common),
                    vae=_vae(seed=seed), text_encoder=_text_encoder(48, seed=seed), tokenizer=tokenizer,
                    safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), in_channels=4, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=16 + 6 * 4, cross_attention_dim=32 + 16, **unet_common,
        )
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return dict(unet=unet, scheduler=scheduler, vae=_vae(seed=seed), text_encoder=_text_encoder(32, seed=seed),
                    text_encoder_2=_text_encoder(16, projection=True, seed=seed + 1), tokenizer=tokenizer,
                    tokenizer_2=clip_tokenizer(TINY_MAX_LENGTH), image_encoder=None, feature_extractor=None)
    if kind == "upscale":
        unet = UNet2DConditionModel(block_out_channels=(8, 16), in_channels=7, cross_attention_dim=32,
                                    attention_head_dim=2, num_class_embeds=1000, **unet_common)
        vae = _vae(blocks=3, seed=seed)  # 4x: the upscaler's UNet works at low-res size
        vae.register_to_config(scaling_factor=0.08333)
        return dict(unet=unet, scheduler=DDIMScheduler(prediction_type="v_prediction", **sched_common),
                    low_res_scheduler=DDPMScheduler(), vae=vae, text_encoder=_text_encoder(32, seed=seed),
                    tokenizer=tokenizer, max_noise_level=350, safety_checker=None, feature_extractor=None,
                    watermarker=None)
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {TINY_KINDS}")


PIPELINE_CLASSES = {
    "sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
    "inpaint": StableDiffusionInpaintPipeline, "upscale": StableDiffusionUpscalePipeline,
}


def tiny_pipeline(kind: TinyKind = "sd1", seed: int = 0):
    """A tiny diffusers pipeline of the given family with seeded random weights (see `tiny_components`)."""
    pipe = PIPELINE_CLASSES[kind](**tiny_components(kind, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
