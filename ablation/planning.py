"""Planning a run: every check that needs no weights (bad input fails in seconds, before anything is written).

`plan_run` resolves the configuration against the model's config files, the prompt sources, the output
directory and a checkpoint to resume from, and returns a `RunPlan` the trainer executes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ablation.concepts import Concept, needs_prior_preservation, resolve_concepts
from ablation.config import ConfigError, TrainConfig, resolve_defaults, training_hash
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


def _read_model_configs(model_path: str) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        vae = AutoencoderKL.load_config(model_path, subfolder="vae")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the UNet/VAE config of model {model_path!r}: {e}") from None
    return unet, vae


def slug(text: str) -> str:
    """Folder-name form of a concept (`Grumpy Cat` -> `grumpy-cat`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plan_run(config: TrainConfig, pipe=None) -> RunPlan:
    """Check a configuration against the model's config files, the prompt sources and the output directory.

    Args:
        config: the validated user configuration.
        pipe: an already loaded pipeline to train in place (the Python API); its configs replace the files
            of `config.model`, which then only names the base in the delta's metadata.

    Raises:
        ConfigError: any bad input (see `ablation.config.ConfigError`), before weights are loaded.
    """
    from ablation.data import check_image_source
    from ablation.models import is_toy, resolve_model

    if pipe is not None:
        model_path = str(getattr(pipe, "name_or_path", None) or config.model)
        unet_config, vae_config = dict(pipe.unet.config), dict(pipe.vae.config)
    else:
        try:
            model_path = resolve_model(config.model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        unet_config, vae_config = _read_model_configs(model_path)
    toy = is_toy(config.model)
    if unet_config.get("in_channels", 4) != 4:
        raise ConfigError(f"model {config.model!r} has a {unet_config['in_channels']}-channel UNet (inpainting or "
                          f"upscaling); ablate a text-to-image model and apply the delta to it")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    concepts = resolve_concepts(config.concept_specs(), toy)
    resolved = resolve_defaults(
        config, toy=toy, concept_types=[c.concept_type for c in concepts],
        prior_preservation=any(needs_prior_preservation(c) for c in concepts),
        native_resolution=unet_config["sample_size"] * vae_factor, vae_scale_factor=vae_factor)
    check_image_source(resolved.anchor_images, resolved.retrieval)
    if resolved.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes")
    out = Path(resolved.output_dir or Path("outputs") / "-".join(slug(c.target) for c in concepts)).expanduser()
    resolved.output_dir = str(out)
    config_hash = training_hash(resolved)
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
    if out.exists() and any(out.iterdir()) and not resolved.overwrite and resume_dir is None:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace its results "
                          f"or --resume-from-checkpoint latest to continue")
    return RunPlan(resolved, concepts, model_path, toy, out, resume_dir, config_hash)

