"""Single-file checkpoints: the one-`.safetensors` layouts that model sites distribute.

Layouts written (`save_single_file`) and read (`load_single_file`):

- SD 1.x / 2.x / SDXL: the original LDM / AUTOMATIC1111 layout (UNet `model.diffusion_model.*`, VAE
  `first_stage_model.*`, text encoders `cond_stage_model.*` or `conditioner.embedders.*`).
- SD3 / SD3.5: the layout of Stability's SD3 single files (MMDiT `model.diffusion_model.joint_blocks.*` with
  fused q/k/v, VAE `first_stage_model.*`, text encoders `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`).

Loading goes through diffusers' `from_single_file`, offline. diffusers needs the diffusers-format
configs of the model's family; it would download them from the hub, so here they come from (in order)
an explicit `config` folder, the configs this project embeds in the files it writes, or the local
Hugging Face cache; otherwise a ConfigError names the `model_config` remedy.

Writing maps diffusers names back to the original ones. The installed diffusers (0.42) converts
original -> diffusers only (`diffusers.loaders.single_file_utils`); the reverse exists only as the
repository script `scripts/convert_diffusers_to_original_stable_diffusion.py` (SD 1.x's block counts
hard-coded; nothing for SD3), which is not part of the package. So the mappings below are written by
hand -- the UNet's derived from its config (any `layers_per_block` / block count), the MMDiT's as the
exact inverse of `convert_sd3_transformer_checkpoint_to_diffusers` -- and the tests check them by
loading the files back with `from_single_file` and comparing outputs. Text encoders: Hugging Face CLIP
for SD 1.x and SDXL's first, OpenCLIP (fused q/k/v) for SD 2.x and SDXL's second, as in the original
checkpoints; SD3's CLIP-L / CLIP-G / T5 in transformers' own names under their `text_encoders.*` prefix.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ablation.config import ConfigError
from ablation.io import atomic_write_file
from ablation.merge import dense_pipeline

logger = logging.getLogger("ablation.checkpoint")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CONFIG_KEY = "ablation_diffusers_configs"  # metadata entry holding the diffusers configs (offline reload)
SINGLE_FILE_FORMAT = "ablation-single-file/1"
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
# model type (diffusers' `infer_diffusers_model_type`) -> pipeline class name this project can use
_PIPELINES = {"v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline", "xl_base": "StableDiffusionXLPipeline",
              "inpainting": "StableDiffusionInpaintPipeline", "inpainting_v2": "StableDiffusionInpaintPipeline",
              "xl_inpaint": "StableDiffusionXLInpaintPipeline", "upscale": "StableDiffusionUpscalePipeline",
              "sd3": "StableDiffusion3Pipeline", "sd35_medium": "StableDiffusion3Pipeline",
              "sd35_large": "StableDiffusion3Pipeline"}
SD3_TYPES = ("sd3", "sd35_medium", "sd35_large")
# what every SD3 / SD3.5 MMDiT has (diffusers' `CHECKPOINT_KEY_NAMES["sd3"]`, with the prefix)
SD3_KEY = UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias"
# SD3 pipeline text encoder -> its prefix in Stability's files (what diffusers' SD3 loader reads)
SD3_TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                     "text_encoder_2": "text_encoders.clip_g.transformer.",
                     "text_encoder_3": "text_encoders.t5xxl.transformer."}


class SingleFileError(ConfigError):
    """A single-file checkpoint that cannot be recognised, configured or written."""


# --------------------------------------------------------------------------------------------------
# diffusers -> original names
# --------------------------------------------------------------------------------------------------


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_map(unet) -> dict[str, str]:
    """diffusers UNet parameter name -> LDM name (without `model.diffusion_model.`), from the UNet's config."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    cfg = unet.config
    per = cfg.layers_per_block
    if not isinstance(per, int):
        raise SingleFileError(f"per-block layers_per_block {per} has no single-file layout")
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if cfg.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if cfg.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    if cfg.get("num_class_embeds") is not None:
        fixed["class_embedding.weight"] = "label_emb.weight"
    up_has_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for key in unet.state_dict():
        if key in fixed:
            out[key] = fixed[key]
            continue
        parts = key.split(".")
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[key] = f"input_blocks.{(per + 1) * i + j + 1}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"input_blocks.{(per + 1) * i + j + 1}.1.{rest}"
            elif kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight -> ....0.op.weight
                out[key] = f"input_blocks.{(per + 1) * (i + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            out[key] = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[key] = f"output_blocks.{(per + 1) * i + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"output_blocks.{(per + 1) * i + j}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if up_has_attn[i] else 1
                out[key] = f"output_blocks.{(per + 1) * i + per}.{slot}.{'.'.join(parts[4:])}"  # conv.weight
        if key not in out:
            raise SingleFileError(f"UNet parameter {key!r} has no single-file (LDM) name")
    return out


def vae_key_map(vae) -> dict[str, str]:
    """diffusers VAE parameter name -> LDM name (without `first_stage_model.`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    out = {}
    for key in vae.state_dict():
        if key in fixed:
            out[key] = fixed[key]
            continue
        parts = key.split(".")
        side = parts[0]
        if parts[1] == "down_blocks":
            i, kind = int(parts[2]), parts[3]
            if kind == "resnets":
                out[key] = f"{side}.down.{i}.block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut",
                                                                                                "nin_shortcut")
            else:  # downsamplers.0.conv.*
                out[key] = f"{side}.down.{i}.downsample." + ".".join(parts[5:])
        elif parts[1] == "up_blocks":
            i, kind = n_up - 1 - int(parts[2]), parts[3]
            if kind == "resnets":
                out[key] = f"{side}.up.{i}.block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut",
                                                                                              "nin_shortcut")
            else:
                out[key] = f"{side}.up.{i}.upsample." + ".".join(parts[5:])
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "resnets":
                out[key] = f"{side}.mid.block_{int(parts[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                for new, old in _VAE_ATTN:
                    if rest.startswith(new):
                        rest = old + rest[len(new):]
                        break
                out[key] = f"{side}.mid.attn_1.{rest}"
        if key not in out:
            raise SingleFileError(f"VAE parameter {key!r} has no single-file (LDM) name")
    return out


_MMDIT_FIXED = (("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj", "x_embedder.proj"),
                ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
                ("context_embedder", "context_embedder"), ("proj_out", "final_layer.linear"))


def mmdit_entries(transformer) -> dict[str, torch.Tensor]:
    """An SD3 / SD3.5 MMDiT's weights in Stability's names (without `model.diffusion_model.`).

    diffusers 0.42 has only the forward direction (`convert_sd3_transformer_checkpoint_to_diffusers`), so
    this is its inverse written by hand, rule for rule: q/k/v fused into `attn.qkv` (image stream `x_block`,
    text stream `context_block`; SD3.5's second image attention `attn2`), qk-norm `ln_q` / `ln_k`,
    `adaLN_modulation.1`, and the last block without text output projection or feed-forward. The last
    context block's and `final_layer`'s modulation store (shift, scale) where diffusers has (scale, shift);
    swapping the halves is its own inverse. Every weight must be used exactly once.

    Raises:
        SingleFileError: a weight the original layout has no name for (another MMDiT variant).
    """
    from diffusers.loaders.single_file_utils import swap_scale_shift

    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise SingleFileError(f"SD3 transformer has no {key!r}, which the single-file layout needs")
        return state.pop(key)

    def fused(base: str, names: tuple[str, str, str], leaf: str) -> torch.Tensor:
        return torch.cat([take(f"{base}{n}.{leaf}") for n in names], dim=0)

    for new, old in _MMDIT_FIXED:
        if new == "pos_embed.pos_embed":
            out[old] = take(new)
            continue
        for leaf in ("weight", "bias"):
            out[f"{old}.{leaf}"] = take(f"{new}.{leaf}")
    last = transformer.config.num_layers - 1
    for i in range(last + 1):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        dual = f"{d}attn2.to_q.weight" in state
        for leaf in ("weight", "bias"):
            out[f"{x}attn.qkv.{leaf}"] = fused(f"{d}attn.", ("to_q", "to_k", "to_v"), leaf)
            out[f"{c}attn.qkv.{leaf}"] = fused(f"{d}attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), leaf)
            out[f"{x}attn.proj.{leaf}"] = take(f"{d}attn.to_out.0.{leaf}")
            out[f"{x}adaLN_modulation.1.{leaf}"] = take(f"{d}norm1.linear.{leaf}")
            context_mod = take(f"{d}norm1_context.linear.{leaf}")
            # the last block's context stream only feeds the image attention: AdaLayerNormContinuous, halves swapped
            out[f"{c}adaLN_modulation.1.{leaf}"] = swap_scale_shift(context_mod, 0) if i == last else context_mod
            out[f"{x}mlp.fc1.{leaf}"] = take(f"{d}ff.net.0.proj.{leaf}")
            out[f"{x}mlp.fc2.{leaf}"] = take(f"{d}ff.net.2.{leaf}")
            if i != last:
                out[f"{c}attn.proj.{leaf}"] = take(f"{d}attn.to_add_out.{leaf}")
                out[f"{c}mlp.fc1.{leaf}"] = take(f"{d}ff_context.net.0.proj.{leaf}")
                out[f"{c}mlp.fc2.{leaf}"] = take(f"{d}ff_context.net.2.{leaf}")
            if dual:
                out[f"{x}attn2.qkv.{leaf}"] = fused(f"{d}attn2.", ("to_q", "to_k", "to_v"), leaf)
                out[f"{x}attn2.proj.{leaf}"] = take(f"{d}attn2.to_out.0.{leaf}")
        if f"{d}attn.norm_q.weight" in state:  # qk RMS-norm (SD3.5): weights only
            for new, old in (("attn.norm_q", f"{x}attn.ln_q"), ("attn.norm_k", f"{x}attn.ln_k"),
                             ("attn.norm_added_q", f"{c}attn.ln_q"), ("attn.norm_added_k", f"{c}attn.ln_k")):
                out[f"{old}.weight"] = take(f"{d}{new}.weight")
            if dual:
                out[f"{x}attn2.ln_q.weight"] = take(f"{d}attn2.norm_q.weight")
                out[f"{x}attn2.ln_k.weight"] = take(f"{d}attn2.norm_k.weight")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap_scale_shift(take(f"norm_out.linear.{leaf}"), 0)
    if state:
        raise SingleFileError(f"SD3 transformer parameter {sorted(state)[0]!r} has no single-file name")
    return out


def _t5_entries(module, prefix: str) -> dict[str, torch.Tensor]:
    """A T5 encoder under `prefix` in transformers' names, its tied input embedding stored under both names.

    diffusers' T5 loader fills only the keys the file has, and in transformers 5 `encoder.embed_tokens` is a
    module of its own (tied to `shared` only by `tie_weights`): without the second copy (one vocabulary x
    width matrix, ~2.5% of an SD3 file with T5-XXL) it is left on the meta device.
    """
    state = dict(module.state_dict())
    tied = state.get("encoder.embed_tokens.weight")
    if tied is not None and "shared.weight" in state and tied.data_ptr() == state["shared.weight"].data_ptr():
        state["encoder.embed_tokens.weight"] = tied.clone()  # safetensors refuses two names for one storage
    return {prefix + k: v for k, v in state.items()}


def _sd3_text_entries(pipe) -> dict[str, torch.Tensor]:
    """SD3's CLIP-L, CLIP-G and (when present) T5 under the `text_encoders.*` prefixes diffusers' SD3 loader reads."""
    proj = getattr(pipe.text_encoder, "text_projection", None)
    if proj is not None and not torch.equal(proj.weight, torch.eye(*proj.weight.shape, dtype=proj.weight.dtype,
                                                                    device=proj.weight.device)):
        # diffusers' loader (like Stability's code, which does not project CLIP-L's pooled output) sets it to the
        # identity; `load_single_file` restores the stored one
        logger.warning("CLIP-L's text_projection is not the identity: diffusers' from_single_file reads it as one")
    out = {**_clip_entries(pipe.text_encoder, SD3_TEXT_PREFIXES["text_encoder"]),
           **_clip_entries(pipe.text_encoder_2, SD3_TEXT_PREFIXES["text_encoder_2"])}
    if getattr(pipe, "text_encoder_3", None) is not None:
        out.update(_t5_entries(pipe.text_encoder_3, SD3_TEXT_PREFIXES["text_encoder_3"]))
    return out


def _configs(pipe) -> dict[str, dict]:
    """The diffusers configs needed to rebuild the pipeline from a single file offline."""
    configs = {"model_index": {**dict(pipe.config), "_class_name": type(pipe).__name__}}
    for name in ("unet", "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        cfg = comp.config.to_dict() if hasattr(comp.config, "to_dict") else dict(comp.config)
        configs[name] = cfg
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            configs[name] = {"model_max_length": int(tok.model_max_length), "pad_token": str(tok.pad_token)}
    if getattr(pipe, "tokenizer_3", None) is not None:
        configs["tokenizer_3"] = {"files": _tokenizer_files(pipe.tokenizer_3)}
    return configs


def _tokenizer_files(tokenizer) -> dict[str, str]:
    """A tokenizer's saved text files, so an SD3 file rebuilds offline: this project vendors only the CLIP
    tokenizer, so SD3's T5 tokenizer travels in the metadata (`tokenizer.json`, ~2.4 MB for T5-XXL's). Binary
    files (`spiece.model`) are left out: the fast tokenizer loads from `tokenizer.json` alone."""
    with tempfile.TemporaryDirectory(prefix="ablation-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for file in sorted(Path(tmp).iterdir()):
            if file.suffix in (".json", ".txt"):
                files[file.name] = file.read_text(encoding="utf-8")
    if "tokenizer.json" not in files:
        raise SingleFileError(f"{type(tokenizer).__name__} saved no tokenizer.json; a single file can embed only "
                              f"fast (tokenizers) tokenizers")
    return files


def _clip_entries(module, prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model under `prefix`, in transformers-4 names (what A1111 and diffusers expect)."""
    out = {}
    for key, value in module.state_dict().items():
        name = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
        out[prefix + name] = value
    return out


_OPENCLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def _openclip_entries(module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model in OpenCLIP's layout (SD 2.x, SDXL's second encoder): fused q/k/v `in_proj`.

    The inverse of diffusers' `convert_open_clip_checkpoint`.
    """
    state = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif key == "embeddings.position_ids":
            continue  # a buffer, not a weight
        elif key.startswith("encoder.layers."):
            _, _, i, rest = key.split(".", 3)
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                leaf = rest.rsplit(".", 1)[1]
                if rest.startswith("self_attn.q_proj."):
                    parts = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                    out[f"{base}attn.in_proj_{leaf}"] = torch.cat(parts, dim=0)
                continue
            for new, old in _OPENCLIP_LAYER:
                if rest.startswith(new):
                    out[base + old + rest[len(new):]] = value
                    break
            else:
                raise SingleFileError(f"text encoder parameter {key!r} has no OpenCLIP name")
        else:
            raise SingleFileError(f"text encoder parameter {key!r} has no OpenCLIP name")
    return out


def layout(pipe) -> str:
    """`sd1`, `sd2`, `sdxl` or `sd3`: which single-file layout a pipeline is written in.

    Raises:
        SingleFileError: a transformer that is not SD3's MMDiT (FLUX, ...).
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        if type(transformer).__name__ != "SD3Transformer2DModel":
            raise SingleFileError(f"{type(pipe).__name__} has no single-file layout here (SD 1.x/2.x/XL and SD3 "
                                  f"only); export it as --export pipeline or lora")
        return "sd3"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    cfg = pipe.unet.config
    # SD 2.x: 1024-wide cross-attention (OpenCLIP ViT-H) and linear attention projections
    return "sd2" if cfg.cross_attention_dim == 1024 or cfg.use_linear_projection else "sd1"


def save_single_file(pipe, path: str | Path, metadata: Mapping[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write a Stable Diffusion pipeline as one `.safetensors` in the original key layout.

    Layouts: SD 1.x (`cond_stage_model.transformer.*`, Hugging Face CLIP), SD 2.x (`cond_stage_model.model.*`,
    OpenCLIP with fused q/k/v) and SDXL (`conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*`)
    with the UNet under `model.diffusion_model.*` (LDM / A1111); SD3 / SD3.5 as Stability's files, the MMDiT under
    `model.diffusion_model.*` (`mmdit_entries`) and `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (T5 when
    the pipeline has one). The VAE under `first_stage_model.*` (attention as 1x1 convolutions) in both.
    LoRA adapters are merged first. The diffusers configs are embedded in the file's metadata, so
    `load_single_file` rebuilds it offline without a config folder; other tools ignore them.

    Args:
        pipe: a text-to-image (or inpainting) Stable Diffusion 1.x / 2.x / XL pipeline, or an SD3 / SD3.5 one.
        path: the `.safetensors` file to write (atomically).
        metadata: further str -> str metadata (e.g. the delta's).
        dtype: dtype of the stored weights (default: as they are; fp16 halves the size).

    Returns:
        The path written.

    Raises:
        SingleFileError: a component has no single-file name (another architecture).
    """
    pipe = dense_pipeline(pipe)
    kind = layout(pipe)
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        if name in tensors:
            raise SingleFileError(f"two weights map to single-file key {name!r}")
        t = tensor.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

    if kind == "sd3":
        for name, value in mmdit_entries(pipe.transformer).items():
            put(UNET_PREFIX + name, value)
    else:
        unet_state = pipe.unet.state_dict()
        for key, ldm in unet_key_map(pipe.unet).items():
            put(UNET_PREFIX + ldm, unet_state[key])
    vae_state = pipe.vae.state_dict()
    for key, ldm in vae_key_map(pipe.vae).items():
        value = vae_state[key]
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        put(VAE_PREFIX + ldm, value)
    if kind == "sd1":
        text = _clip_entries(pipe.text_encoder, CLIP_PREFIX)
    elif kind == "sd2":
        text = _openclip_entries(pipe.text_encoder, "cond_stage_model.model.")
    elif kind == "sd3":
        text = _sd3_text_entries(pipe)
    else:
        text = {**_clip_entries(pipe.text_encoder, "conditioner.embedders.0.transformer."),
                **_openclip_entries(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
    for name, value in text.items():
        put(name, value)
    meta = {"format": SINGLE_FILE_FORMAT, "ablation_layout": kind,
            CONFIG_KEY: json.dumps(_configs(pipe), default=str, sort_keys=True)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items() if k != "format"})
    from safetensors.torch import save_file

    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from ablation.delta import DeltaFileError, check_safetensors_file

    try:
        metadata = check_safetensors_file(path, what="single-file checkpoint")
    except DeltaFileError as e:
        raise SingleFileError(str(e).split("; pass")[0] + "; pass a diffusers folder, a single-file .safetensors "
                              "checkpoint or a hub id") from None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return shapes, metadata


def describe_file(path: str | Path) -> str | None:
    """What a `.safetensors` file is when it is not a single-file model (None when it looks like one)."""
    path = Path(path)
    shapes, metadata = _header(path)
    if metadata.get("format", "").startswith("ablation-delta"):
        return (f"{path} is an ablation delta, not a model: pass it as --delta (with --model set to its base, "
                f"{metadata.get('base_model', '?')!r})")
    if any(k.startswith("lora_") or ".lora_" in k or ".lora." in k for k in shapes):
        return f"{path} is a LoRA file, not a model: load its base model and pass the LoRA as --delta"
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        return (f"{path} is not a Stable Diffusion single-file checkpoint (no `{UNET_PREFIX}*` keys; it has "
                f"{sample}); pass a diffusers folder (with model_index.json), an SD 1.x/2.x/XL/3 single-file "
                f".safetensors or a hub id")
    return None


def model_type(path: str | Path) -> str:
    """diffusers' model type of a single-file checkpoint (`v1`, `v2`, `xl_base`, `sd3`, ...), from its header only."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    problem = describe_file(path)
    if problem:
        raise SingleFileError(problem)
    shapes, _ = _header(Path(path))
    # infer_diffusers_model_type reads only key names and shapes: meta tensors avoid loading gigabytes
    proxy = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    kind = infer_diffusers_model_type(proxy)
    if kind not in SD3_TYPES and SD3_KEY in shapes:
        # diffusers tells SD3 apart by the published widths (SD3 / 3.5 medium: 1536, 3.5 large: 38 blocks) and
        # falls back to `v1` for any other; an MMDiT of another size (a tiny test model) is still SD3
        kind = "sd3"
    return kind


def pipeline_class(kind: str):
    """The diffusers pipeline class for a single-file model type."""
    import diffusers

    name = _PIPELINES.get(kind)
    if name is None:
        raise SingleFileError(f"single-file checkpoint recognised as {kind!r}, which is not a Stable Diffusion "
                              f"1.x/2.x/SDXL text-to-image, inpainting or upscaling model, nor an SD3 one")
    return getattr(diffusers, name)


def _embedded_class(metadata: Mapping[str, str]):
    """The pipeline class recorded by `save_single_file` (type detection needs full-size models), or None."""
    import diffusers

    try:
        name = json.loads(metadata[CONFIG_KEY])["model_index"]["_class_name"]
    except (KeyError, ValueError, TypeError):
        return None
    return getattr(diffusers, name) if name in _PIPELINES.values() else None


def _embedded_config_dir(metadata: Mapping[str, str], root: Path) -> Path | None:
    """Write the configs embedded by `save_single_file` as a diffusers config folder under `root`."""
    text = metadata.get(CONFIG_KEY)
    if not text:
        return None
    from ablation.tokenizer_util import TOKENIZER_DIR

    configs = json.loads(text)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(configs["model_index"]))
    names = {"unet": "config.json", "transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "text_encoder_2": "config.json", "text_encoder_3": "config.json", "scheduler": "scheduler_config.json"}
    for comp, filename in names.items():
        if comp in configs:
            (root / comp).mkdir(exist_ok=True)
            (root / comp / filename).write_text(json.dumps(configs[comp]))
    for name in ("tokenizer", "tokenizer_2"):
        if name in configs:  # the vendored CLIP tokenizer is SD's (both of SDXL's); only its length varies
            shutil.copytree(TOKENIZER_DIR, root / name)
            tok_cfg = root / name / "tokenizer_config.json"
            data = json.loads(tok_cfg.read_text())
            data["model_max_length"] = configs[name]["model_max_length"]
            if configs[name].get("pad_token"):  # SDXL's second tokenizer pads with "!"
                data["pad_token"] = configs[name]["pad_token"]
            tok_cfg.write_text(json.dumps(data))
    if "tokenizer_3" in configs:  # SD3's T5 tokenizer, embedded whole (see `_tokenizer_files`)
        (root / "tokenizer_3").mkdir(exist_ok=True)
        for filename, text in configs["tokenizer_3"]["files"].items():
            (root / "tokenizer_3" / Path(filename).name).write_text(text, encoding="utf-8")
    return root


def _cached_config_dir(kind: str) -> Path | None:
    """The family's diffusers configs from the local Hugging Face cache (no network), or None."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from huggingface_hub import snapshot_download

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {}).get("pretrained_model_name_or_path")
    if not repo:
        return None
    try:
        folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*/*.json", "*/*.txt"]))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None
    return folder if (folder / "model_index.json").is_file() else None


def _sd3_clip_g(path: Path, config_dir: Path, class_name: str, dtype):
    """SD3's CLIP-G through diffusers' own converter, given only its tensors (None when the file has none).

    diffusers' SD3 loader picks a CLIP's converter by width and tries CLIP-L's first, so a CLIP-G as wide as
    CLIP-L (768 vs 1280 in SD3; equal in small models) would get CLIP-L's weights from the whole file.
    """
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open

    prefix = SD3_TEXT_PREFIXES["text_encoder_2"]
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    if not tensors:
        return None
    return create_diffusers_clip_model_from_ldm(getattr(transformers, class_name), tensors, subfolder="text_encoder_2",
                                                config=str(config_dir), torch_dtype=dtype, local_files_only=True)


def _restore_clip_l_projection(pipe, path: Path) -> None:
    """Put back the CLIP-L projection stored in the file, which diffusers' SD3 loader replaces by the identity."""
    from safetensors import safe_open

    key = SD3_TEXT_PREFIXES["text_encoder"] + "text_projection.weight"
    proj = getattr(pipe.text_encoder, "text_projection", None)
    with safe_open(str(path), framework="pt") as f:
        if proj is None or key not in f.keys():  # noqa: SIM118
            return
        weight = f.get_tensor(key)
    if weight.shape != proj.weight.shape:
        raise SingleFileError(f"{path}: {key} has shape {tuple(weight.shape)}, the model {tuple(proj.weight.shape)}")
    with torch.no_grad():
        proj.weight.copy_(weight.to(proj.weight.dtype))


def _load_sd3(path: Path, config_dir: Path, dtype: torch.dtype, ours: bool, **kwargs):
    """An SD3 / SD3.5 single file through `StableDiffusion3Pipeline.from_single_file`, offline.

    The transformer, VAE, CLIP-L and T5 are diffusers' reading of the whole file; CLIP-G is converted by
    diffusers from its own tensors (`_sd3_clip_g`). A pipeline saved without T5 gets none back (it then
    feeds zeros in its place). `ours`: a file `save_single_file` wrote, whose CLIP-L projection is the
    pipeline's own (a published file's is unused by SD3, which diffusers models as the identity).
    """
    from diffusers import StableDiffusion3Pipeline

    from ablation.models import dtype_kwarg

    index = json.loads((config_dir / "model_index.json").read_text())
    passed: dict = {}
    if (index.get("text_encoder_3") or [None])[0] is None:
        passed.update(text_encoder_3=None, tokenizer_3=None)
    clip_g_class = (index.get("text_encoder_2") or [None, None])[1]
    if clip_g_class and "text_encoder_2" not in kwargs:
        clip_g = _sd3_clip_g(path, config_dir, clip_g_class, dtype)
        if clip_g is not None:
            passed["text_encoder_2"] = clip_g
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                         **dtype_kwarg(dtype), **{**passed, **kwargs})
    except SingleFileComponentError as e:  # e.g. a published file without T5 and a config folder without its weights
        first = str(e).strip().splitlines()[0]
        raise SingleFileError(f"{path}: {first} Pass --model-config DIR (model_config=DIR): a diffusers SD3 folder "
                              f"that holds that component's weights") from None
    if ours and "text_encoder" not in kwargs:
        _restore_clip_l_projection(pipe, path)
    t5 = getattr(pipe, "text_encoder_3", None)
    if t5 is not None and any(p.is_meta for p in t5.parameters()):
        t5.tie_weights()  # a file with `shared` only (Stability's, ComfyUI's): see `_t5_entries`
    return pipe


def load_single_file(path: str | Path, *, config: str | Path | None = None, torch_dtype=None, **kwargs):
    """Load a single-file SD 1.x / 2.x / SDXL / SD3 checkpoint through diffusers' `from_single_file`, offline.

    Args:
        path: the `.safetensors` file.
        config: a diffusers folder of the same family (model_index.json + component configs), e.g. the
            base model saved with `save_pretrained`. Default: configs embedded by `save_single_file`, else the
            family's configs in the local Hugging Face cache.
        torch_dtype: dtype to load in (default float32).
        **kwargs: forwarded to `from_single_file`.

    Raises:
        SingleFileError: not a model file, an unknown type, or no configs available offline.
    """
    from ablation.models import dtype_kwarg

    path = Path(path).expanduser()
    kind = model_type(path)
    _, metadata = _header(path)
    cls = _embedded_class(metadata) or pipeline_class(kind)
    tmp = None
    try:
        if config is not None:
            config_dir = Path(config).expanduser()
            if not (config_dir / "model_index.json").is_file():
                raise SingleFileError(f"model config {config_dir} has no model_index.json; pass a diffusers folder "
                                      f"of the same family as {path.name}")
        else:
            tmp = Path(tempfile.mkdtemp(prefix="ablation-single-file-"))
            config_dir = _embedded_config_dir(metadata, tmp / "config") or _cached_config_dir(kind)
        if config_dir is None:
            raise SingleFileError(
                f"{path} looks like a {kind} single-file checkpoint, but its diffusers configs are not available "
                f"offline (not embedded, not in the Hugging Face cache). Pass --model-config DIR (model_config=DIR): "
                f"a diffusers folder of the same family, e.g. the base model saved with save_pretrained")
        if cls.__name__ == "StableDiffusion3Pipeline":
            pipe = _load_sd3(path, config_dir, torch_dtype or torch.float32,
                             metadata.get("format") == SINGLE_FILE_FORMAT, **kwargs)
        else:
            pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                        **dtype_kwarg(torch_dtype or torch.float32), **kwargs)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return pipe
