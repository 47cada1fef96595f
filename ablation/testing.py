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

from ablation.config import GUIDANCE
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


# --------------------------------------------------------------------------------------------------
# MMDiT (SD3 / SD3.5 / FLUX) tiny pipelines, after diffusers' tests/pipelines/{stable_diffusion_3,flux}
# `get_dummy_components`, but offline: the T5 tokenizer is built in memory, not downloaded.
# --------------------------------------------------------------------------------------------------

MMDiTKind = Literal["sd3", "flux", "flux-schnell"]
MMDIT_KINDS: tuple[MMDiTKind, ...] = ("sd3", "flux", "flux-schnell")


def tiny_t5_tokenizer(model_max_length: int = TINY_MAX_LENGTH):
    """A character-level T5 tokenizer (`T5TokenizerFast`: pad 0, eos 1, unk 2) built in memory, no files."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,'-"]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(d_model: int, vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=1,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _flow_vae(seed: int = 0) -> AutoencoderKL:
    """4 latent channels, 2x down-sampling; shift and scale factors as SD3/FLUX VAEs have them."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def tiny_mmdit_components(kind: MMDiTKind = "sd3", seed: int = 0, t5: bool = True) -> dict:
    """Components of a tiny SD3 or FLUX pipeline, seeded (`tiny_mmdit_pipeline` builds the pipeline).

    Args:
        kind: `sd3` (SD3.5-medium-like: two CLIP towers with projection, T5, QK RMS-norm, a dual-attention
            block whose `attn2` is an image self-attention, scheduler shift 3), `flux` (FLUX.1-dev-like:
            CLIP pooled + T5 sequence, guidance embedding, 2 double- and 2 single-stream blocks, dynamic
            resolution shift), `flux-schnell` (the same without guidance embedding).
        seed: torch seed for the random weights.
        t5: SD3 only: include the T5 encoder (False: the pipeline feeds zeros in its place, as
            `StableDiffusion3Pipeline` does without `text_encoder_3`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    t5_tokenizer = tiny_t5_tokenizer()
    if kind == "sd3":
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        return dict(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed),
            text_encoder=_text_encoder(16, projection=True, seed=seed), tokenizer=clip_tokenizer(TINY_MAX_LENGTH),
            text_encoder_2=_text_encoder(16, projection=True, seed=seed + 1),
            tokenizer_2=clip_tokenizer(TINY_MAX_LENGTH),
            text_encoder_3=_t5_encoder(32, len(t5_tokenizer), seed + 2) if t5 else None,
            tokenizer_3=t5_tokenizer if t5 else None, image_encoder=None, feature_extractor=None)
    if kind in ("flux", "flux-schnell"):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=kind == "flux", axes_dims_rope=[4, 4, 8])
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return dict(transformer=transformer, scheduler=scheduler, vae=_flow_vae(seed),
                    text_encoder=_text_encoder(16, seed=seed), tokenizer=clip_tokenizer(TINY_MAX_LENGTH),
                    text_encoder_2=_t5_encoder(32, len(t5_tokenizer), seed + 2), tokenizer_2=t5_tokenizer,
                    image_encoder=None, feature_extractor=None)
    raise ValueError(f"unknown tiny MMDiT pipeline kind {kind!r}; choose one of {MMDIT_KINDS}")


def tiny_mmdit_pipeline(kind: MMDiTKind = "sd3", seed: int = 0, t5: bool = True):
    """A tiny `StableDiffusion3Pipeline` or `FluxPipeline` with seeded random weights (16 px -> 8x8x4 latents)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls(**tiny_mmdit_components(kind, seed, t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(path) -> str:
    """Save a tiny random `CLIPModel` + `CLIPProcessor` (a judge whose numbers mean nothing) to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(path)
    return str(path)


#: the trained tensors of the default group, by parameter-name suffix
CROSS_ATTN_WEIGHTS = ("attn2.to_k.weight", "attn2.to_v.weight")


def parameter_names(module, suffixes=CROSS_ATTN_WEIGHTS) -> list[str]:
    """Names of a module's parameters ending in one of `suffixes`."""
    return [n for n, _ in module.named_parameters() if n.endswith(suffixes)]


def perturb(module, names, seed: int = 1, scale: float = 0.1) -> None:
    """Add seeded Gaussian noise to the named parameters in place (a stand-in for training)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(scale * torch.randn(params[n].shape, generator=gen))


def unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction on a fixed input (latents, timestep 10, "a photo of a cat"): what an export must keep."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=gen)
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, 10, encoder_hidden_states=text).sample


def delta_metadata(pipe, **overrides) -> dict[str, str]:
    """`make_metadata` for a made-up cross-attn grumpy-cat delta of `pipe` (fields overridable)."""
    from ablation.delta import make_metadata, pipeline_config_hash

    args = dict(base_model="toy", base_config_hash=pipeline_config_hash(pipe),
                concepts=[{"target": "grumpy cat", "anchor": "cat"}], params="cross-attn", lora_rank=0, steps=3,
                learning_rate=2e-6, variant="model-based")
    args.update(overrides)
    return make_metadata(**args)


def toy_family_accuracy(pipe, judge, family: str, concepts: int = 2, images: int = 4, steps: int = 15) -> dict:
    """Toy-CLIP family accuracy of a toy-world pipeline's images of a family's first concepts (target, anchor),
    on held-out prompts with fixed seeds: what the shipped toy models' tests assert on."""
    from ablation.evaluation.metrics import family_accuracy
    from ablation.toyworld import catalog

    fam = catalog().families[family]
    texts = judge.text_features([catalog().concepts[c].judge_text for c in fam.classes])
    out = {}
    for index, concept in enumerate(fam.classes[:concepts]):
        prompts = list(fam.prompts_for(concept, "heldout")[:images])
        gens = [torch.Generator().manual_seed(10**9 + i) for i in range(len(prompts))]
        result = pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=gens).images
        assert result[0].size == (64, 64), result[0].size
        out[concept] = family_accuracy(judge.image_features(result), texts, index)
    return out
