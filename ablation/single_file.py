"""Single-file checkpoints: the one-`.safetensors` (LDM / AUTOMATIC1111) layout that model sites distribute.

Loading goes through diffusers' `from_single_file`, offline. diffusers needs the diffusers-format
configs of the model's family; it would download them from the hub, so here they come from (in order)
an explicit `config` folder, the configs this project embeds in the files it writes, or the local
Hugging Face cache; otherwise a ConfigError names the `model_config` remedy.

Writing (`save_single_file`) maps diffusers names back to the original ones. The installed diffusers
(0.42) converts LDM -> diffusers only (`diffusers.loaders.single_file_utils`); the reverse exists only as
the repository script `scripts/convert_diffusers_to_original_stable_diffusion.py`, which is not part of
the package and hard-codes SD 1.x's block counts. So the mapping below is written by hand, derived
from the UNet config (any `layers_per_block` / block count), and the tests check it by loading the file
back with `from_single_file`. Text encoders: Hugging Face CLIP for SD 1.x and SDXL's first, OpenCLIP
(fused q/k/v) for SD 2.x and SDXL's second, as in the original checkpoints.
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
              "xl_inpaint": "StableDiffusionXLInpaintPipeline", "upscale": "StableDiffusionUpscalePipeline"}


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


def _configs(pipe) -> dict[str, dict]:
    """The diffusers configs needed to rebuild the pipeline from a single file offline."""
    configs = {"model_index": {**dict(pipe.config), "_class_name": type(pipe).__name__}}
    for name in ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        cfg = comp.config.to_dict() if hasattr(comp.config, "to_dict") else dict(comp.config)
        configs[name] = cfg
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            configs[name] = {"model_max_length": int(tok.model_max_length), "pad_token": str(tok.pad_token)}
    return configs


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
    """`sd1`, `sd2` or `sdxl`: which single-file layout a pipeline is written in."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    cfg = pipe.unet.config
    # SD 2.x: 1024-wide cross-attention (OpenCLIP ViT-H) and linear attention projections
    return "sd2" if cfg.cross_attention_dim == 1024 or cfg.use_linear_projection else "sd1"


def save_single_file(pipe, path: str | Path, metadata: Mapping[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write a Stable Diffusion pipeline as one `.safetensors` in the original (LDM / A1111) key layout.

    Layouts: SD 1.x (`cond_stage_model.transformer.*`, Hugging Face CLIP), SD 2.x (`cond_stage_model.model.*`,
    OpenCLIP with fused q/k/v) and SDXL (`conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*`);
    the UNet under `model.diffusion_model.*`, the VAE under `first_stage_model.*` (attention as 1x1 convolutions).
    LoRA adapters are merged first. The diffusers configs are embedded in the file's metadata, so
    `load_single_file` rebuilds it offline without a config folder; other tools ignore them.

    Args:
        pipe: a text-to-image (or inpainting) Stable Diffusion 1.x / 2.x / XL pipeline.
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
                f"{sample}); pass a diffusers folder (with model_index.json), an SD 1.x/2.x/SDXL single-file "
                f".safetensors or a hub id")
    return None


def model_type(path: str | Path) -> str:
    """diffusers' model type of a single-file checkpoint (`v1`, `v2`, `xl_base`, ...), from its header only."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    problem = describe_file(path)
    if problem:
        raise SingleFileError(problem)
    shapes, _ = _header(Path(path))
    # infer_diffusers_model_type reads only key names and shapes: meta tensors avoid loading gigabytes
    proxy = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return infer_diffusers_model_type(proxy)


def pipeline_class(kind: str):
    """The diffusers pipeline class for a single-file model type."""
    import diffusers

    name = _PIPELINES.get(kind)
    if name is None:
        raise SingleFileError(f"single-file checkpoint recognised as {kind!r}, which is not a Stable Diffusion "
                              f"1.x/2.x/SDXL text-to-image, inpainting or upscaling model")
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
    names = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}
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


def load_single_file(path: str | Path, *, config: str | Path | None = None, torch_dtype=None, **kwargs):
    """Load a single-file SD 1.x / 2.x / SDXL checkpoint through diffusers' `from_single_file`, offline.

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
        pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                    **dtype_kwarg(torch_dtype or torch.float32), **kwargs)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return pipe
