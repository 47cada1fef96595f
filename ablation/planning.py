"""Planning a run: every check that needs no weights (bad input fails in seconds, before anything is written).

`plan_run` resolves the configuration against the model's config files, the prompt sources, the output
directory and a checkpoint to resume from, and returns a `RunPlan` the trainer executes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ablation.concepts import Concept, needs_prior_preservation, resolve_concepts
from ablation.config import ConfigError, TrainConfig, concept_settings, resolve_defaults, training_hash
from ablation.resume import list_checkpoints, read_checkpoint_state


@dataclass
class RunPlan:
    """A checked run: resolved config and concepts, model location, output and resume directories."""

    config: TrainConfig
    concepts: list[Concept]
    model_path: str
    toy: bool
    output_dir: Path
    resume_dir: Path | None
    config_hash: str
    #: per concept (`config.concept_settings`): the prior term on its anchor images, and its target images
    concept_priors: tuple[bool, ...]
    concept_target_images: tuple[int, ...]
    family: str = "unet"


def _read_model_configs(model_path: str) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        vae = AutoencoderKL.load_config(model_path, subfolder="vae")
    except (OSError, ValueError) as e:
        from ablation.architectures import read_transformer_configs

        transformer = read_transformer_configs(model_path)  # SD3 / FLUX: no unet, a transformer
        if transformer is not None:
            return transformer[0], transformer[1]
        raise ConfigError(f"cannot read the UNet/VAE config of model {model_path!r}: {e}") from None
    return unet, vae


def _family(model_path: str, pipe, denoiser_config: dict) -> str:
    """`unet`, or the SD3/FLUX family (`ablation.architectures.MMDIT_FAMILIES`) of the model to train."""
    from ablation.architectures import pipeline_family, read_transformer_configs

    if pipe is not None:
        return "unet" if getattr(pipe, "unet", None) is not None else pipeline_family(pipe)
    if "sample_size" in denoiser_config and "cross_attention_dim" in denoiser_config:  # a UNet config
        return "unet"
    found = read_transformer_configs(model_path)
    return "unet" if found is None else found[2]


def _clip_only(model_path: str, pipe) -> bool:
    """SD3 without T5: `text_encoder_3` is None in the pipeline, or null in the folder's model_index.json."""
    if pipe is not None:
        from ablation.params import clip_only_text

        return clip_only_text(pipe)
    index = Path(model_path) / "model_index.json"
    return index.is_file() and _index_without_t5(json.loads(index.read_text()))


def _index_without_t5(spec: dict) -> bool:
    """An SD3 model_index whose `text_encoder_3` is null (saved without T5)."""
    return spec.get("_class_name", "").startswith("StableDiffusion3") and spec.get("text_encoder_3") in (None,
                                                                                                      [None, None])


#: families `ablation.single_file.layout` can write (UNet covers SD 1.x/2.x/XL; inpainting / upscaling UNets are
#: refused by planning anyway)
SINGLE_FILE_FAMILIES = ("unet", "sd3")


def _single_file_family(path: str, model_config: str | None) -> tuple[str, bool]:
    """(family, clip_only) of a single-file checkpoint. A file has no model_index.json beside it: the configs
    `save_single_file` embedded tell, else its config folder (`--model-config`, or the Hugging Face cache)."""
    from ablation.architectures import SD3_PIPELINES
    from ablation.models import embedded_configs, single_file_config_dir

    configs = embedded_configs(path) if model_config is None else None
    if configs is None:
        folder = single_file_config_dir(path, model_config)
        return _family(folder, None, {}), _clip_only(folder, None)
    if "unet" in configs:
        return "unet", False
    index = configs.get("model_index", {})
    name = index.get("_class_name", "?")
    if name not in SD3_PIPELINES:  # save_single_file writes no other transformer model
        raise ConfigError(f"{path} embeds a {name}, which has no single-file layout here (SD 1.x/2.x/XL and SD3 "
                          f"only); pass a diffusers folder")
    return "sd3", _index_without_t5(index)


SLUG_MAX_BYTES = 64  # far below the 255-byte file-name limit of common filesystems, and readable in a listing


def slug(text: str, max_bytes: int = SLUG_MAX_BYTES) -> str:
    """Folder-name form of a concept: `Grumpy Cat` -> `grumpy-cat`, `Café 猫` -> `café-猫`.

    Letters, marks and digits of every script are kept (NFC, lower case); every other run of characters
    becomes one `-`. The result is never empty (`concept-<hash>` when nothing is left) and at most
    `max_bytes` UTF-8 bytes: a longer one is cut at a character boundary and ends in `-<hash>` of the full
    text, so two long targets that share a prefix still get different folders.
    """
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(ch if unicodedata.category(ch)[0] in "LMN" else "-" for ch in text)
    name = re.sub(r"-+", "-", kept).strip("-")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    if not name:
        return f"concept-{digest}"
    if len(name.encode()) <= max_bytes:
        return name
    budget = max_bytes - len(digest) - 1
    head = name.encode()[:budget].decode(errors="ignore")
    if "-" in head[len(head) // 2:]:  # end on a whole word when one ends in the second half
        head = head.rsplit("-", 1)[0]
    return f"{head.rstrip('-')}-{digest}"


def _num_processes() -> int:
    """Processes of this launch (accelerate's state: reads the launcher's environment, loads nothing)."""
    from accelerate import PartialState

    return PartialState().num_processes


def _check_output_dir(out: Path) -> None:
    """The run directory must be a directory or creatable, and not held by a live run (writes nothing)."""
    from ablation.runlock import check_unlocked

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {str(out)!r} is a file, not a directory; choose another --output-dir")
    parent = out
    while not parent.exists():  # the nearest existing ancestor decides whether `out` can be created
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"cannot create --output-dir {str(out)!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --output-dir {str(out)!r}: {str(parent)!r} is not writable")
    if out.is_dir():
        check_unlocked(out)


def _has_results(out: Path) -> bool:
    from ablation.runlock import LOCK_NAME

    return out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())


def plan_run(config: TrainConfig, pipe=None, num_processes: int | None = None) -> RunPlan:
    """Check a configuration against the model's config files, the prompt sources and the output directory.

    Args:
        config: the validated user configuration.
        pipe: an already loaded pipeline to train in place (the Python API); its configs replace the files
            of `config.model`, which then only names the base in the delta's metadata.
        num_processes: processes of the run (default: accelerate's launch state); a checkpoint saved by another
            number cannot be resumed exactly.

    Raises:
        ConfigError: any bad input (see `ablation.config.ConfigError`), before weights are loaded.
    """
    from ablation.data import check_image_source
    from ablation.models import is_single_file, is_toy, read_model_configs, resolve_model

    if pipe is not None:
        model_path = str(getattr(pipe, "name_or_path", None) or config.model)
        denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer  # SD3 / FLUX
        unet_config, vae_config = dict(denoiser.config), dict(pipe.vae.config)
    else:
        try:
            model_path = resolve_model(config.model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if is_single_file(model_path):  # an SD1/SD2/SDXL/SD3 checkpoint file: configs from --model-config or the file
            unet_config, vae_config = read_model_configs(model_path, config.model_config)
        else:
            unet_config, vae_config = _read_model_configs(model_path)
    toy = is_toy(config.model)
    if pipe is None and is_single_file(model_path):
        family, clip_only = _single_file_family(model_path, config.model_config)
    else:
        family, clip_only = _family(model_path, pipe, unet_config), _clip_only(model_path, pipe)
    if "single-file" in config.export and family not in SINGLE_FILE_FAMILIES:
        # the export runs after training: refused here, the run would be lost at its very end
        name = "FLUX" if family.startswith("flux") else family
        raise ConfigError(f"--export single-file has no {name} layout (SD 1.x/2.x/XL and SD3 only); "
                          f"use --export lora or pipeline")
    if config.fp8_base and family == "unet":
        raise ConfigError("--fp8-base is for SD3 / FLUX transformers: a UNet needs no float8 storage for 24 GB (SDXL "
                          "plans 6.8 GB), and its cast convolutions fail to recompute under gradient checkpointing")
    if family == "unet" and unet_config.get("in_channels", 4) != 4:
        raise ConfigError(f"model {config.model!r} has a {unet_config['in_channels']}-channel UNet (inpainting or "
                          f"upscaling); ablate a text-to-image model and apply the delta to it")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    concepts = resolve_concepts(config.concept_specs(), toy)
    from ablation.architectures import check_family_options, native_geometry

    native, multiple = native_geometry(family, unet_config, vae_factor)  # UNet: (sample_size x factor, factor)
    types, needs_prior = [c.concept_type for c in concepts], [needs_prior_preservation(c) for c in concepts]
    resolved = resolve_defaults(
        config, toy=toy, concept_types=types, prior_preservation=any(needs_prior),
        native_resolution=native, vae_scale_factor=multiple, family=family, concept_priors=needs_prior)
    priors, target_images = concept_settings(config, resolved, concept_types=types, concept_priors=needs_prior)
    check_family_options(resolved, family, clip_only=clip_only)
    encodes = resolved.robust and resolved.robust_adversary in ("prefix", "shifted")
    if encodes and unet_config.get("addition_embed_type"):
        raise ConfigError(f"--robust-adversary {resolved.robust_adversary} drives one CLIP text encoder "
                          "(SD 1.x / 2.x), not SDXL's two; use --robust-adversary persistent")
    check_image_source(resolved.anchor_images, resolved.retrieval, count=resolved.num_anchor_images)
    if resolved.memorized_image:  # bad files fail here, before any expensive work
        from ablation.data import load_reference_image

        load_reference_image(resolved.memorized_image)
    if resolved.copy_detector and not Path(resolved.copy_detector).expanduser().is_file():
        raise ConfigError(f"--copy-detector {resolved.copy_detector!r} does not exist (an SSCD TorchScript file)")
    if resolved.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install -e \".[8bit]\" "
                              "(or pip install bitsandbytes)")
    out = Path(resolved.output_dir or Path("outputs") / slug("-".join(c.target for c in concepts))).expanduser()
    resolved.output_dir = str(out)
    _check_output_dir(out)
    mixed = {name: list(v) for name, v in (("prior_preservation", priors), ("target_images", target_images))
             if len(set(v)) > 1}
    config_hash = training_hash(resolved, mixed)
    resume_dir = None
    if resolved.resume_from_checkpoint:
        if resolved.resume_from_checkpoint == "latest":
            found = list_checkpoints(out)
            resume_dir = found[-1] if found else None
        else:
            resume_dir = Path(resolved.resume_from_checkpoint).expanduser()
            if not resume_dir.is_dir():
                raise ConfigError(f"--resume-from-checkpoint {str(resume_dir)!r} does not exist")
        if resume_dir is not None:
            state = read_checkpoint_state(resume_dir)
            if state["config_hash"] != config_hash:
                raise ConfigError(f"checkpoint {resume_dir} was made with another training configuration "
                                  f"(hash {state['config_hash']} != {config_hash}); resume with the same options "
                                  f"or start a new --output-dir")
            saved = state.get("num_processes")
            world = _num_processes() if num_processes is None else num_processes
            if saved is not None and saved != world:
                raise ConfigError(f"checkpoint {resume_dir} was saved by {saved} process(es) but this run has {world}; "
                                  f"the batch order and data shards depend on it, so resume with "
                                  f"`accelerate launch --num_processes {saved}` or start a new --output-dir")
    # (--plan only prints: a finished run in the folder is no reason to refuse it)
    if _has_results(out) and not resolved.overwrite and resume_dir is None and not resolved.plan:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace its results "
                          f"or --resume-from-checkpoint latest to continue")
    return RunPlan(resolved, concepts, model_path, toy, out, resume_dir, config_hash, priors, target_images, family)



def memory_plan(plan: RunPlan, device_type: str):
    """The run's `ablation.memory.MemoryPlan` on `device_type` (`cuda`: text encoders and VAE offloaded as the
    trainer does; `cpu`: one memory), or None when the model is not a diffusers folder (a single-file checkpoint)."""
    from ablation.memory import PlanSettings, plan_memory

    folder = _config_folder(plan.model_path)
    if folder is None:
        return None
    return plan_memory(folder, PlanSettings.from_config(plan.config, device_type), plan.family)


def _config_folder(model_path: str) -> str | None:
    """A local diffusers folder with the model's config files: the model itself, or for a hub id its `*.json`
    files only (what `from_pretrained` reads first anyway); None for a single file or when the hub is unreachable."""
    if (Path(model_path) / "model_index.json").is_file():
        return model_path
    if Path(model_path).exists():  # a single file, or a folder that is not a diffusers pipeline
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, allow_patterns=["*.json"])
    except Exception:  # offline, unknown id, no access: no plan, the run itself reports the real problem
        return None


def check_memory(plan: RunPlan, device_type: str) -> None:
    """`--max-memory GB`: raise ConfigError, naming the options that would fit, when the plan's peak is above it."""
    from ablation.memory import GB, PlanSettings, fitting_flags

    limit = plan.config.max_memory
    if limit is None:
        return
    mem = memory_plan(plan, device_type)
    if mem is None:
        raise ConfigError(f"--max-memory needs the model's config files to plan from, and {plan.model_path!r} gives "
                          f"none (a single file, or a hub id the hub cannot serve now); pass a diffusers folder or "
                          f"drop --max-memory")
    if mem.peak <= limit * GB:
        return
    fit = fitting_flags(plan.model_path, PlanSettings.from_config(plan.config, device_type), plan.family, limit)
    advice = (f"add {' '.join(fit[0])} (planned {fit[1].peak / GB:.3g} GB)" if fit else
              "no combination of --gradient-checkpointing, --lora-rank 16, --use-8bit-adam and batch size 1 fits")
    raise ConfigError(f"the memory plan's peak is {mem.peak / GB:.3g} GB, above --max-memory {limit:g} GB; {advice} "
                      f"(ablate train --plan shows the parts)")
