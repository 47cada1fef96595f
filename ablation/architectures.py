"""Architecture adapters: what differs between UNet (SD1/SD2/SDXL) and MMDiT (SD3/SD3.5, FLUX) models.

The training loop is one; an adapter answers the questions whose answer depends on the family:

* which module is the denoiser (`pipe.unet` or `pipe.transformer`) and what trains by default;
* how prompts are encoded (`Conditioning`: SD1/2 one sequence; SDXL + pooled; SD3 CLIP-L + CLIP-G + T5
  sequence and pooled CLIPs; FLUX T5 sequence, pooled CLIP-L and the text position ids);
* how a clean latent is noised and what the model regresses (`noisy_and_target`: DDPM eps / v; flow
  matching with logit-normal, shifted t and velocity target eps - z0);
* how one prediction is made (`predict`: SDXL size ids; FLUX packs 2x2 patches, passes image/text ids
  and, for FLUX-dev, the distilled guidance as an input);
* how anchor latents are sampled (`sample_latents`: the pipeline itself with `output_type="latent"`;
  SD3/FLUX keep their own FlowMatch Euler scheduler; FLUX latents are unpacked to [B, C, H, W] so the cache,
  flips and noise are the same code for every family).

`adapter_for(pipe)` picks the adapter by pipeline class. Every tensor the loop stores or draws (latents,
noise) has the shape [B, C, H, W] of the VAE latent space for all families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ablation import losses
from ablation.config import ConfigError

FLOW_SAMPLERS = ("euler", "flow-euler")  # the pipeline's own FlowMatchEulerDiscreteScheduler


@dataclass
class PromptEmbeddings:
    """Text conditioning of a list of prompts: `embeds` [N, L, D] and, for SDXL, `pooled` [N, P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> PromptEmbeddings:
        """Rows `index` (a batch)."""
        return PromptEmbeddings(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def to(self, device, dtype=None) -> PromptEmbeddings:
        """Moved (and optionally cast) copy."""
        return PromptEmbeddings(self.embeds.to(device, dtype),
                                None if self.pooled is None else self.pooled.to(device, dtype))


def is_sdxl(pipe) -> bool:
    """Two text encoders and pooled embeddings."""
    return getattr(pipe, "text_encoder_2", None) is not None


def encode_prompts(pipe, prompts: list[str], device, batch_size: int = 64) -> PromptEmbeddings:
    """Encode prompts with the pipeline's own `encode_prompt` (no classifier-free guidance).

    Gradients flow when the caller has not disabled them (the `embedding` group trains through it).
    """
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        if is_sdxl(pipe):
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            pooled.append(p)
        else:
            e, _ = pipe.encode_prompt(chunk, device, 1, False)
        embeds.append(e)
    return PromptEmbeddings(torch.cat(embeds), torch.cat(pooled) if pooled else None)


def sdxl_time_ids(resolution: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.expand(batch, 6)


@dataclass
class Conditioning(PromptEmbeddings):
    """Text conditioning of N prompts: `embeds` [N, L, D], `pooled` [N, P] or None, FLUX `text_ids` [L, 3].

    A `PromptEmbeddings` (what the UNet path uses) with the FLUX text position ids added; the ids are the
    same for every row, so `select` and `cat` keep them as they are.
    """

    text_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """Rows `index` (a batch)."""
        return Conditioning(self.embeds[index], None if self.pooled is None else self.pooled[index], self.text_ids)

    def to(self, device, dtype=None) -> Conditioning:
        """Moved (and optionally cast) copy; the ids are moved, not cast."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.embeds.to(device, dtype), pooled,
                            None if self.text_ids is None else self.text_ids.to(device))

    @staticmethod
    def cat(a: PromptEmbeddings, b: PromptEmbeddings) -> Conditioning:
        """Rows of `a` then rows of `b` (one forward pass for two halves of a batch)."""
        return Conditioning(torch.cat([a.embeds, b.embeds]),
                            None if a.pooled is None else torch.cat([a.pooled, b.pooled]),
                            getattr(a, "text_ids", None))


class Architecture:
    """Interface of an architecture adapter (see the module docstring); one subclass per family."""

    family: str = ""
    component: str = ""  # pipeline component of the denoiser
    default_group: str = "cross-attn"
    default_lora_rank: int = 0  # 0: dense updates by default
    negative_prompts: bool = True  # anchor sampling can take a negative prompt (classifier-free guidance)

    def denoiser(self, pipe) -> nn.Module:
        """The module the ablation trains (`pipe.unet` or `pipe.transformer`)."""
        return getattr(pipe, self.component)

    def text_encoder_names(self, pipe) -> list[str]:
        """Pipeline components that encode text (they can leave the device once the prompts are encoded)."""
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]

    def training_scheduler(self, pipe):
        """The scheduler `noisy_and_target` noises with (a copy; the pipeline's own is not touched)."""
        raise NotImplementedError

    def resolution_multiple(self, pipe) -> int:
        """Image sides must be multiples of this (VAE down-sampling x transformer patch or FLUX packing)."""
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if self.family == "sd3":
            return factor * int(pipe.transformer.config.patch_size)
        return factor * 2 if self.family == "flux" else factor

    def encode_prompts(self, pipe, prompts: list[str], device, batch_size: int = 64) -> PromptEmbeddings:
        """Encode prompts with the pipeline's own `encode_prompt`, no classifier-free guidance.

        Gradients flow when the caller has not disabled them.
        """
        raise NotImplementedError

    def noisy_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw timesteps from `generator` (CPU) and return (noisy latents, timesteps, regression target).

        `latents` and `noise` are [B, C, H, W] on the training device; the timesteps are what `predict`
        takes, on the same device.
        """
        raise NotImplementedError

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor:
        """The model's prediction (eps, v or flow velocity) for a batch, shaped like `noisy`.

        `model` is the denoiser or anything called like it (DDP wrapper, `functional_call` lambda).
        """
        raise NotImplementedError

    def anchor_sampler(self, pipe, name: str):
        """The scheduler anchor images are sampled with, for a user's sampler name."""
        raise NotImplementedError

    def sampling_conditioning(self, pipe, prompts: list[str], *, guidance: float, device,
                              negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        """What the pipeline call of `sample_latents` would encode from the prompts, encoded now with the pipeline's
        own `encode_prompt` and the same arguments: keyword arguments that replace `prompt` / `negative_prompt` in
        that call (`--offload-text-encoders` encodes every batch before the denoiser returns to the device)."""
        raise NotImplementedError

    def sample_latents(self, pipe, prompts: list[str], *, steps: int, guidance: float, resolution: int,
                       generators: list[torch.Generator], negative_prompt: str | None = None,
                       conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Sample anchor latents with the pipeline (`output_type="latent"`), as float32 [B, C, H, W] on the CPU.

        The caller sets `pipe.scheduler` (`anchor_sampler`) and autocast; one generator per image. `conditioning`
        (`sampling_conditioning` of these prompts) replaces the prompts: the text encoders are not called.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# UNet: SD 1.x, SD 2.x (epsilon or v), SDXL
# --------------------------------------------------------------------------------------------------


class UNetArchitecture(Architecture):
    """SD1/SD2/SDXL: DDPM noising, eps/v target, cross-attention K/V group (what the trainer does today)."""

    family = "unet"
    component = "unet"

    def __init__(self, vae_scale_factor: int = 8):
        self.vae_scale_factor = vae_scale_factor  # pixels per latent pixel (SDXL's size ids are in pixels)

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def encode_prompts(self, pipe, prompts, device, batch_size=64):
        return encode_prompts(pipe, prompts, device, batch_size)

    def noisy_and_target(self, scheduler, latents, noise, generator):
        # Drawn after the noise from the same generator: the order Objective.batch has always used.
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        t = t.to(latents.device)
        return scheduler.add_noise(latents, noise, t), t, losses.regression_target(scheduler, latents, noise, t)

    def predict(self, model, noisy, timesteps, cond):
        kwargs = {}
        if cond.pooled is not None:  # SDXL: pooled text embeddings and size/crop ids of a square image
            # The image side in pixels; the latents are 1/vae_scale_factor of it.
            resolution = noisy.shape[-1] * self.vae_scale_factor
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(resolution, noisy.shape[0], noisy.device, cond.pooled.dtype)}
        return model(noisy, timesteps, cond.embeds, return_dict=False, **kwargs)[0]

    def anchor_sampler(self, pipe, name):
        import diffusers

        from ablation.config import SAMPLERS

        if name not in SAMPLERS:
            raise ConfigError(f"unknown anchor sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        return getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)

    def sampling_conditioning(self, pipe, prompts, *, guidance, device, negative_prompt=None):
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        guided = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipelines' own test
        if is_sdxl(pipe):
            pe, npe, ppe, nppe = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=guided, negative_prompt=negative)
            out = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                   "negative_pooled_prompt_embeds": nppe}
        else:
            pe, npe = pipe.encode_prompt(prompts, device, 1, guided, negative)
            out = {"prompt_embeds": pe, "negative_prompt_embeds": npe}
        return {k: v for k, v in out.items() if v is not None}

    def sample_latents(self, pipe, prompts, *, steps, guidance, resolution, generators, negative_prompt=None,
                       conditioning=None):
        out = pipe(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                   generator=generators, output_type="latent",
                   **_text_kwargs(prompts, negative_prompt, conditioning))
        return out.images.float().cpu()


# --------------------------------------------------------------------------------------------------
# flow matching transformers: SD3 / SD3.5, FLUX
# --------------------------------------------------------------------------------------------------


class FlowArchitecture(Architecture):
    """What SD3 and FLUX share: flow matching, FlowMatch Euler sampling, LoRA on the text K/V by default."""

    component = "transformer"
    default_lora_rank = 16  # these models do not fit next to a dense teacher copy: LoRA by default

    def __init__(self, max_sequence_length: int, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        self.max_sequence_length = max_sequence_length
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens the transformer sees for latents of this size (what FLUX's shift depends on)."""
        return latents.shape[-2] * latents.shape[-1] // 4  # 2x2 patches (SD3 patch_size 2, FLUX packing)

    def noisy_and_target(self, scheduler, latents, noise, generator):
        sigmas = losses.sample_flow_sigmas(scheduler, latents.shape[0], generator, self.image_seq_len(latents),
                                           self.weighting_scheme, self.logit_mean, self.logit_std)
        sigmas = sigmas.to(latents.device)
        noisy = losses.flow_noisy_latents(latents, noise, sigmas)
        return noisy, sigmas * scheduler.config.num_train_timesteps, losses.flow_velocity(latents, noise)

    def anchor_sampler(self, pipe, name):
        if name not in FLOW_SAMPLERS:
            raise ConfigError(f"{type(pipe).__name__} samples with its own flow-matching Euler scheduler; "
                              f"--anchor-scheduler {name!r} does not apply (use one of {', '.join(FLOW_SAMPLERS)})")
        return self.training_scheduler(pipe)


class SD3Architecture(FlowArchitecture):
    """`StableDiffusion3Pipeline` (SD3-medium, SD3.5-medium/large): velocity of [B, 16, H, W] latents."""

    family = "sd3"

    def encode_prompts(self, pipe, prompts, device, batch_size=64):
        embeds, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            # prompt_2/prompt_3 None: the same prompt for CLIP-G and T5; without T5 the pipeline pads zeros.
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                            num_images_per_prompt=1, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
            embeds.append(e)
            pooled.append(p)
        return Conditioning(torch.cat(embeds), torch.cat(pooled))

    def predict(self, model, noisy, timesteps, cond):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.embeds,
                     pooled_projections=cond.pooled, return_dict=False)[0]

    def sampling_conditioning(self, pipe, prompts, *, guidance, device, negative_prompt=None):
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                num_images_per_prompt=1, do_classifier_free_guidance=guidance > 1,
                                                negative_prompt=negative,
                                                max_sequence_length=self.max_sequence_length)
        out = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
               "negative_pooled_prompt_embeds": nppe}
        return {k: v for k, v in out.items() if v is not None}

    def sample_latents(self, pipe, prompts, *, steps, guidance, resolution, generators, negative_prompt=None,
                       conditioning=None):
        out = pipe(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                   generator=generators, output_type="latent", max_sequence_length=self.max_sequence_length,
                   **_text_kwargs(prompts, negative_prompt, conditioning))
        return out.images.float().cpu()


def _text_kwargs(prompts, negative_prompt, conditioning) -> dict:
    """The text inputs of a sampling call: encoded ones (`sampling_conditioning`) or the prompts themselves."""
    if conditioning is not None:
        return dict(conditioning)
    negative = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(prompts)}
    return {"prompt": prompts, **negative}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's packed [B, H/2 * W/2, 4C] (diffusers' `FluxPipeline._pack_latents`)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX's packed [B, H/2 * W/2, 4C] -> [B, C, H, W], H and W in latent pixels (inverse of `pack_latents`)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, 1)


class FluxArchitecture(FlowArchitecture):
    """`FluxPipeline` (FLUX.1-dev, FLUX.1-schnell): packed latents, position ids, distilled guidance input.

    Args:
        max_sequence_length: T5 tokens (512 for dev, 256 for schnell, as the pipelines document).
        guidance_embeds: the transformer takes a guidance input (`config.guidance_embeds`: dev yes, schnell no).
        guidance: FLUX-dev's guidance-embedding input during training (not classifier-free guidance:
            one forward pass; diffusers' FLUX dreambooth default 3.5).
    """

    family = "flux"
    negative_prompts = False  # guidance-distilled (dev) or step-distilled (schnell): no classifier-free guidance

    def __init__(self, max_sequence_length: int, guidance_embeds: bool = True, guidance: float = 3.5, **kwargs):
        super().__init__(max_sequence_length, **kwargs)
        self.guidance_embeds, self.guidance = guidance_embeds, guidance

    def encode_prompts(self, pipe, prompts, device, batch_size=64):
        embeds, pooled, text_ids = [], [], None
        for i in range(0, len(prompts), batch_size):
            e, p, text_ids = pipe.encode_prompt(prompt=prompts[i:i + batch_size], prompt_2=None, device=device,
                                                num_images_per_prompt=1,
                                                max_sequence_length=self.max_sequence_length)
            embeds.append(e)
            pooled.append(p)
        return Conditioning(torch.cat(embeds), torch.cat(pooled), text_ids)

    def predict(self, model, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        b, _, h, w = noisy.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, cond.embeds.dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        text_ids = cond.text_ids if cond.text_ids is not None else torch.zeros(cond.embeds.shape[1], 3)
        out = model(hidden_states=pack_latents(noisy), timestep=timesteps / 1000, guidance=guidance,
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                    txt_ids=text_ids.to(noisy.device, cond.embeds.dtype), img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def sampling_conditioning(self, pipe, prompts, *, guidance, device, negative_prompt=None):
        if negative_prompt is not None:
            raise ConfigError("FLUX samples without classifier-free guidance: a negative prompt would be ignored")
        pe, ppe, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}

    def sample_latents(self, pipe, prompts, *, steps, guidance, resolution, generators, negative_prompt=None,
                       conditioning=None):
        if negative_prompt is not None:
            raise ConfigError("FLUX samples without classifier-free guidance: a negative prompt would be ignored")
        # For FLUX-dev `guidance_scale` is the distilled guidance input; schnell ignores it.
        out = pipe(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                   generator=generators, output_type="latent", max_sequence_length=self.max_sequence_length,
                   **_text_kwargs(prompts, None, conditioning))
        side = 2 * (resolution // (pipe.vae_scale_factor * 2))  # what the pipeline sampled
        return unpack_latents(out.images, side, side).float().cpu()


# --------------------------------------------------------------------------------------------------
# choosing an adapter
# --------------------------------------------------------------------------------------------------

UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline",)
FLUX_PIPELINES = ("FluxPipeline",)


def _t5_length(tokenizer, default: int) -> int:
    return default if tokenizer is None else min(default, int(tokenizer.model_max_length))


def adapter_for(pipe, **kwargs) -> Architecture:
    """The adapter of a loaded pipeline, by pipeline class.

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or
            `FluxPipeline` (or a subclass).
        kwargs: adapter options (`FluxArchitecture(guidance=...)`, `weighting_scheme`, ...).

    Raises:
        ConfigError: another pipeline class (inpainting, upscaling, other families).
    """
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if names & set(FLUX_PIPELINES):
        guided = bool(pipe.transformer.config.guidance_embeds)
        # dev was trained with 512 T5 tokens, schnell (no guidance embedding) with 256 (diffusers' docs).
        length = _t5_length(getattr(pipe, "tokenizer_2", None), 512 if guided else 256)
        return FluxArchitecture(length, guidance_embeds=guided, **kwargs)
    if names & set(SD3_PIPELINES):
        return SD3Architecture(_t5_length(getattr(pipe, "tokenizer_3", None), 256), **kwargs)
    if names & set(UNET_PIPELINES):
        return UNetArchitecture(getattr(pipe, "vae_scale_factor", 8), **kwargs)
    raise ConfigError(f"{type(pipe).__name__} is not a supported text-to-image pipeline; supported: "
                      f"{', '.join(UNET_PIPELINES + SD3_PIPELINES + FLUX_PIPELINES)}")


def training_adapter(pipe, **kwargs) -> Architecture:
    """The adapter the training loop uses: `adapter_for`, except that any pipeline with a UNet is trained as SD.

    Pipelines with a UNet of another class (a custom subclass, an inpainting pipeline handed to the Python API)
    keep the UNet path they always had; other unsupported pipelines raise ConfigError as in `adapter_for`.
    """
    if getattr(pipe, "unet", None) is not None:
        return UNetArchitecture(getattr(pipe, "vae_scale_factor", 8))
    return adapter_for(pipe, **kwargs)


# --------------------------------------------------------------------------------------------------
# families before loading (planning): configs, native size, options that do not apply
# --------------------------------------------------------------------------------------------------

MMDIT_FAMILIES = ("sd3", "flux", "flux-schnell")
FLUX_DEFAULT_SAMPLE_SIZE = 128  # `FluxPipeline.default_sample_size`, in latent pixels (1024 px with the 8x VAE)
_TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def pipeline_family(pipe) -> str:
    """`unet`, `sd3`, `flux` (FLUX.1-dev: guidance input) or `flux-schnell` of a loaded pipeline.

    Raises:
        ConfigError: a pipeline class `adapter_for` does not support.
    """
    adapter = adapter_for(pipe)
    if isinstance(adapter, FluxArchitecture) and not adapter.guidance_embeds:
        return "flux-schnell"
    return adapter.family


def read_transformer_configs(model_path: str) -> tuple[dict, dict, str] | None:
    """(transformer config, VAE config, family) of an SD3 / FLUX diffusers folder or hub id, read without weights.

    Returns:
        None when the model has no `transformer` component (a UNet model or no model at all).

    Raises:
        ConfigError: a transformer model of a pipeline class this project does not train (FLUX Fill/Kontext,
            PixArt, ...), or unreadable configs.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel

    try:
        index = DiffusionPipeline.load_config(model_path)
    except (OSError, ValueError):
        return None
    if "transformer" not in index:
        return None
    name = index.get("_class_name", "?")
    if name not in SD3_PIPELINES + FLUX_PIPELINES:
        raise ConfigError(f"model {model_path!r} is a {name}; transformer models are supported as "
                          f"{', '.join(SD3_PIPELINES + FLUX_PIPELINES)} (SD3, SD3.5, FLUX.1-dev/schnell)")
    try:
        cls = SD3Transformer2DModel if name in SD3_PIPELINES else FluxTransformer2DModel
        transformer = dict(cls.load_config(model_path, subfolder="transformer"))
        vae = dict(AutoencoderKL.load_config(model_path, subfolder="vae"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the transformer/VAE config of model {model_path!r}: {e}") from None
    family = "sd3" if name in SD3_PIPELINES else "flux" if transformer.get("guidance_embeds") else "flux-schnell"
    return transformer, vae, family


def native_geometry(family: str, denoiser_config: dict, vae_factor: int) -> tuple[int, int]:
    """(native image side in pixels, multiple every training resolution must be) of a model family.

    UNet: `sample_size` x VAE factor, any multiple of the VAE factor. SD3: the same with the transformer's
    `patch_size` (1024 px for SD3.5, multiples of 16). FLUX has no `sample_size`: the pipeline's default of 128
    latent pixels (1024 px), multiples of 2 x the VAE factor (2x2 packing).
    """
    if family == "sd3":
        return int(denoiser_config["sample_size"]) * vae_factor, vae_factor * int(denoiser_config.get("patch_size", 2))
    if family in ("flux", "flux-schnell"):
        return FLUX_DEFAULT_SAMPLE_SIZE * vae_factor, 2 * vae_factor
    return int(denoiser_config["sample_size"]) * vae_factor, vae_factor


def check_family_options(config, family: str, clip_only: bool = False) -> None:
    """Refuse options that do not apply to the model family, before any work (`ablation.planning`).

    Args:
        config: the resolved configuration.
        family: `unet` or an MMDiT family.
        clip_only: an SD3 folder without T5 (`text_encoder_3` null): the embedding group applies there.

    Raises:
        ConfigError: the `embedding` group (except SD3 without T5) or a DDPM-family anchor sampler on SD3/FLUX; an
            MMDiT-only group on a UNet model.
    """
    from ablation.params import MMDIT_GROUPS

    if family == "unet":
        if config.params == "text-kv+embedders":
            raise ConfigError("--params text-kv+embedders is a group of SD3/FLUX transformers; UNet models train "
                              "cross-attn, attn, full or embedding")
        return
    if getattr(config, "robust", False) and config.robust_adversary != "persistent":
        # the persistent adversary moves the conditioning itself, whatever encodes it; the others drive a UNet
        # (`ball`) or one CLIP text encoder (`prefix`, `shifted`)
        raise ConfigError(f"--robust-adversary {config.robust_adversary} is implemented for UNet models "
                          f"(SD1/SD2/SDXL), not {family}; use --robust-adversary persistent (the default)")
    if config.params == "embedding" and clip_only:
        pass  # SD3 without T5: the prompts reach the transformer through the CLIP towers only
    elif config.params not in MMDIT_GROUPS:
        raise ConfigError(f"--params {config.params} is implemented for UNet models (SD1/SD2/SDXL), not {family}; "
                          f"choose one of {', '.join(MMDIT_GROUPS)}")
    generates = not (config.variant == "image-based" and (config.anchor_images or config.retrieval))
    if generates and config.anchor_scheduler not in FLOW_SAMPLERS:
        raise ConfigError(f"{family} samples anchors with its own flow-matching Euler scheduler; --anchor-scheduler "
                          f"{config.anchor_scheduler} does not apply (use euler)")
