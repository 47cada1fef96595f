"""Published configs of the real checkpoints, as their hub folders hold them (the hub is unreachable here).

Used for random-weight benchmark models (`scripts/benchmark_train.py`), the memory planner's checks and the
24 GB recipes' plans (`config_folder`: a diffusers folder of config files only, which `ablation.memory` builds on
the meta device), and the MMDiT parameter-count tests.
"""

from __future__ import annotations

import json
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
    sample_size=512, act_fn="silu",
)
SD15_TEXT = dict(  # openai/clip-vit-large-patch14, text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=49407,
)
# stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text towers)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu",
)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT = {**SD15_TEXT}  # CLIP-L, as SD 1.5's
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14, text tower with projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0,
)
# transformer/config.json of the MMDiT checkpoints
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large (no dual attention)
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm")
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56])
FLOW_VAE = dict(  # SD3's and FLUX's 16-channel autoencoder
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
    sample_size=1024, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(  # google/t5-v1_1-xxl encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, relative_attention_num_buckets=32)

_CLIP = ("transformers", "CLIPTextModel")
_CLIP_PROJ = ("transformers", "CLIPTextModelWithProjection")
_T5 = ("transformers", "T5EncoderModel")
_TOKENIZER = ("transformers", "CLIPTokenizer")
#: name -> (pipeline class, {component: ((library, class), config)}, {tokenizer: model_max_length})
FOLDERS = {
    "sd15": ("StableDiffusionPipeline", {"unet": (("diffusers", "UNet2DConditionModel"), SD15_UNET),
                                         "vae": (("diffusers", "AutoencoderKL"), SD15_VAE),
                                         "text_encoder": (_CLIP, SD15_TEXT)}, {"tokenizer": 77}),
    "sdxl": ("StableDiffusionXLPipeline", {"unet": (("diffusers", "UNet2DConditionModel"), SDXL_UNET),
                                           "vae": (("diffusers", "AutoencoderKL"), SDXL_VAE),
                                           "text_encoder": (_CLIP, SDXL_TEXT),
                                           "text_encoder_2": (_CLIP_PROJ, SDXL_TEXT_2)},
             {"tokenizer": 77, "tokenizer_2": 77}),
    **{name: ("StableDiffusion3Pipeline", {"transformer": (("diffusers", "SD3Transformer2DModel"), config),
                                           "vae": (("diffusers", "AutoencoderKL"), FLOW_VAE),
                                           "text_encoder": (_CLIP_PROJ, SD15_TEXT),
                                           "text_encoder_2": (_CLIP_PROJ, SDXL_TEXT_2),
                                           "text_encoder_3": (_T5, T5_XXL)},
              {"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": 256})
       for name, config in (("sd35-medium", SD35_MEDIUM), ("sd35-large", SD35_LARGE))},
    "flux-dev": ("FluxPipeline", {"transformer": (("diffusers", "FluxTransformer2DModel"), FLUX_DEV),
                                  "vae": (("diffusers", "AutoencoderKL"), FLOW_VAE),
                                  "text_encoder": (_CLIP, SD15_TEXT), "text_encoder_2": (_T5, T5_XXL)},
                 {"tokenizer": 77, "tokenizer_2": 512}),
}


def config_folder(name: str, dest: str | Path) -> Path:
    """Write `dest` as a diffusers folder of config files only (no weights) for the published model `name`."""
    pipeline, components, tokenizers = FOLDERS[name]
    root = Path(dest)
    index: dict = {"_class_name": pipeline, "_diffusers_version": "0.32.0"}
    for comp, ((library, cls), config) in components.items():
        index[comp] = [library, cls]
        (root / comp).mkdir(parents=True, exist_ok=True)
        body = {"_class_name": cls, **config} if library == "diffusers" else {
            "architectures": [cls], "model_type": "t5" if "T5" in cls else "clip_text_model", **config}
        (root / comp / "config.json").write_text(json.dumps(body, indent=1))
    for tok, length in tokenizers.items():
        index[tok] = ["transformers", "CLIPTokenizer" if length <= 77 else "T5TokenizerFast"]
        (root / tok).mkdir(parents=True, exist_ok=True)
        (root / tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": length}))
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root
