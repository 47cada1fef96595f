"""Sampling anchor latents with the model itself: the settings that determine them, the sampler loop, decoding.

Model-based anchors are sampled with `output_type="latent"` (through the architecture adapter, so UNet, SD3 and
FLUX pipelines share the loop) and kept as latents. `SamplerSettings` is everything that determines a set of them;
its hash names their cache entry (the cache, the copy filter and real-image anchors are `ablation.data`). Every
image has its own seed and CPU generator, so a set does not depend on the batch size, the device or the number of
processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ablation import placement
from ablation.architectures import training_adapter
from ablation.config import PRECISIONS


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that determines a set of generated anchor latents (its hash names the cache entry).

    Attributes:
        model_key: identity of the weights, configs, tokenizer and scheduler (`anchor_model_key`).
        prompts: anchor prompts; image k uses prompt k mod P.
        scheduler: sampler name (a key of `ablation.config.SAMPLERS`).
        steps: sampling steps.
        guidance: classifier-free guidance scale.
        resolution: image side in pixels.
        count: number of anchor images.
        seed: image k is sampled with seed `seed + k`.
        precision: sampling precision (`fp32`, `fp16`, `bf16`; accelerate's `no` means fp32): autocast
            changes the latents, so it is part of the key.
        negative_prompt: negative prompt of every image (the official recipe uses the target for nudity
            anchors), or None.
        copy_filter: key of the copy filter applied to the anchors (`CopyFilter.key()`), or None; set by
            `cached_anchor_latents`.
        trajectory: also keep the sampler's intermediate states of each image (`--anchor-trajectory`).
    """

    model_key: str
    prompts: tuple[str, ...]
    scheduler: str
    steps: int
    guidance: float
    resolution: int
    count: int
    seed: int
    precision: str = "fp32"
    negative_prompt: str | None = None
    copy_filter: str | None = None
    trajectory: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        object.__setattr__(self, "precision", PRECISIONS[self.precision])
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def cache_key(self) -> str:
        """Hash of the settings (directory name in the cache)."""
        fields = {k: v for k, v in self.__dict__.items() if not (k == "trajectory" and not v)}  # keys of older runs
        blob = json.dumps(fields, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


@contextlib.contextmanager
def recording_states(scheduler, trajectory: list | None) -> Iterator[None]:
    """Append `(latents, t)` to `trajectory` at every sampler step: the state the step starts from and its timestep.

    Wraps `scheduler.step` (every pipeline calls it with the current latents), so the first state is the
    initial noise at the first timestep and the last is the state before the final step; the final latents are
    the pipeline's output. Timesteps are the scheduler's own values (DDPM steps for UNets, sigma x 1000 for flow
    models), what the denoiser is called with. Does nothing without a list.
    """
    if trajectory is None:
        yield
        return
    step = scheduler.step

    def recorded(model_output, timestep, sample, *args, **kwargs):
        trajectory.append((sample.detach().float().cpu().clone(), float(timestep)))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = recorded
    try:
        yield
    finally:
        del scheduler.step  # the instance attribute hid the class's method


@torch.no_grad()
def generate_latents(pipe, settings: SamplerSettings, indices: list[int], batch_size: int,
                     disable_progress: bool = False, seeds: list[int] | None = None,
                     offload_text_encoders: bool = False) -> dict[str, list]:
    """Sample anchor latents for the given image indices (image k: prompt k mod P, seed `seed + k`).

    Args:
        pipe: the pipeline.
        settings: sampler, steps, guidance, resolution, prompts, negative prompt.
        indices: image indices to sample.
        batch_size: images per pipeline call.
        disable_progress: hide the progress bar.
        seeds: seed of each index instead of `seed + k` (replacements of filtered anchors).
        offload_text_encoders: the text encoders are in CPU memory (`ablation.placement`): every batch's prompts
            are encoded first, in one visit of theirs, then the denoiser samples (the same latents, bit for bit).

    Returns:
        Columns `index`, `prompt`, `prompt_index`, `seed`, `latents` (float32 arrays, the UNet's latent space);
        with `settings.trajectory` also `trajectory` (the state each of the S sampler steps starts from) and
        `trajectory_t` (their timesteps).
    """
    seeds = [settings.seed + k for k in indices] if seeds is None else list(seeds)
    if len(seeds) != len(indices):
        raise ValueError(f"{len(seeds)} seeds for {len(indices)} indices")
    adapter = training_adapter(pipe)  # UNet, SD3 or FLUX
    original = pipe.scheduler
    pipe.scheduler = adapter.anchor_sampler(pipe, settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    num_prompts = len(settings.prompts)
    columns: dict[str, list] = {"index": [], "prompt": [], "prompt_index": [], "seed": [], "latents": []}
    if settings.trajectory:
        columns.update(trajectory=[], trajectory_t=[])
    starts = range(0, len(indices), batch_size)
    batch_prompts = [[settings.prompts[k % num_prompts] for k in indices[i:i + batch_size]] for i in starts]
    conditionings: list = [None] * len(batch_prompts)
    if offload_text_encoders:  # batch by batch as the pipeline would encode them: the same tensors
        device = pipe.device  # before the denoiser leaves it
        with placement.encoding(pipe, device, True):
            conditionings = [{k: v.cpu() for k, v in adapter.sampling_conditioning(
                pipe, prompts, guidance=settings.guidance, device=device,
                negative_prompt=settings.negative_prompt).items()} for prompts in batch_prompts]
    try:
        for i, prompts, conditioning in tqdm(zip(starts, batch_prompts, conditionings, strict=True),
                                             total=len(starts), desc="anchor images", disable=disable_progress):
            batch, batch_seeds = indices[i:i + batch_size], seeds[i:i + batch_size]
            if conditioning is not None:
                conditioning = {k: v.to(pipe.device) for k, v in conditioning.items()}
            # CPU generators: the same anchors on every device.
            generators = [torch.Generator().manual_seed(s) for s in batch_seeds]
            # The pipeline samples (`output_type="latent"`); FLUX's packed latents come back as [B, C, H, W].
            states: list | None = [] if settings.trajectory else None
            with recording_states(pipe.scheduler, states):
                latents = adapter.sample_latents(pipe, prompts, steps=settings.steps, guidance=settings.guidance,
                                                 resolution=settings.resolution, generators=generators,
                                                 negative_prompt=settings.negative_prompt,
                                                 conditioning=conditioning).numpy()
            if states is not None:  # [(latents [B, C, H, W], t)] per step -> per image [S, C, H, W]
                columns["trajectory"] += list(torch.stack([z for z, _ in states], 1).numpy())
                columns["trajectory_t"] += [[t for _, t in states]] * len(batch)
            columns["index"] += list(batch)
            columns["prompt"] += prompts
            columns["prompt_index"] += [k % num_prompts for k in batch]
            columns["seed"] += batch_seeds
            columns["latents"] += list(latents)
    finally:
        pipe.scheduler = original
    return columns


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 8) -> list:
    """PIL images (RGB) of latents in the UNet's latent space (the inverse of `encode_images`)."""
    from PIL import Image

    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # The SDXL VAE overflows in fp16 (the pipelines upcast it too); autocast would undo the upcast.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    images = []
    try:
        with torch.autocast(vae.device.type, enabled=False):
            for i in range(0, len(latents), batch_size):
                z = latents[i:i + batch_size].to(vae.device, vae.dtype) / scale + shift
                pixels = vae.decode(z).sample.float()
                arrays = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                images += [Image.fromarray(a) for a in arrays.cpu().numpy()]
    finally:
        if upcast:
            vae.to(torch.float16)
    return images
