"""x4 super-resolution with a prompt (`StableDiffusionUpscalePipeline`) and its PSNR against bicubic.

Model ids: a diffusers directory, a hub id (`stabilityai/stable-diffusion-x4-upscaler`) or `toy`,
which here means the toy world's x4 upscaler (`ablation.toyworld.upscaler_dir()`, 16 -> 64 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ablation.evaluation.metrics import psnr

SCALE = 4
#: (steps, guidance) by default. The toy upscaler: one DDIM step at guidance 1 returns its posterior mean, its best
#: PSNR (22.89 dB on the held-out test renders, bicubic 21.40; 50 steps at guidance 6 gave 20.18, docs/toyworld.md).
#: Any other x4 upscaler: the settings of `StableDiffusionUpscalePipeline.__call__` (Stability's model card).
TOY_UPSCALE = (1, 1.0)
UPSCALE = (75, 9.0)


def is_toy_upscaler(pipe) -> bool:
    """True when `pipe` was loaded from the toy world's upscaler folder."""
    from pathlib import Path

    from ablation.toyworld import upscaler_dir

    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    try:
        return bool(name) and Path(name).resolve() == upscaler_dir().resolve()
    except OSError:
        return False


def upscale_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance) that `upscale` uses when they are not given (see `TOY_UPSCALE`)."""
    return TOY_UPSCALE if is_toy_upscaler(pipe) else UPSCALE


def resolve_upscaler(model: str) -> str:
    """`toy` -> the toy upscaler's directory; anything else as `ablation.models.resolve_model`."""
    from ablation.models import TOY_MODEL_ID, resolve_model

    if model == TOY_MODEL_ID:
        from ablation.toyworld import upscaler_dir

        return str(upscaler_dir())
    return resolve_model(model)


def load_upscaler(model: str, device: str | torch.device | None = None, torch_dtype=torch.float32):
    """Load an x4 upscale pipeline (see `resolve_upscaler`) onto the device."""
    from diffusers import StableDiffusionUpscalePipeline

    from ablation.evaluation.clip_judge import auto_device
    from ablation.models import dtype_kwarg

    pipe = StableDiffusionUpscalePipeline.from_pretrained(resolve_upscaler(model), **dtype_kwarg(torch_dtype),
                                                          use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or auto_device())


def upscale(pipe, images: Sequence[Image.Image], prompts: Sequence[str] | str, *, seed: int = 0,
            steps: int | None = None, guidance: float | None = None, noise_level: int = 20,
            batch_size: int = 4) -> list[Image.Image]:
    """Upscale each image x4, conditioned on its prompt; image `i` uses seed `seed + i`.

    Args:
        pipe: a `StableDiffusionUpscalePipeline`.
        images: low-resolution inputs (all the same size within a batch).
        prompts: one prompt per image, or one for all.
        seed: base seed (per-image generators, so results do not depend on the batch size).
        steps: denoising steps (default: the model's, `upscale_defaults`).
        guidance: classifier-free guidance scale (default: the model's).
        noise_level: noise added to the low-resolution image (the upscaler's augmentation level).
        batch_size: images per pipeline call.
    """
    default_steps, default_guidance = upscale_defaults(pipe)
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    out: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        batch = [im.convert("RGB") for im in images[start:start + batch_size]]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        result = pipe(prompts[start:start + batch_size], image=batch, num_inference_steps=steps,
                      guidance_scale=guidance, noise_level=noise_level, generator=generators)
        out.extend(result.images)
    return out


def toy_heldout_pairs(num: int = 32) -> tuple[list[str], list[tuple[Image.Image, Image.Image]]]:
    """The toy upscaler's benchmark: the first `num` held-out renders of the toy world (64 px, captions from the
    held-out templates, seeds no training image uses), each paired with its 16 px box-filtered reduction.

    Returns:
        (captions, pairs): the captions the renders were drawn from, and (low-resolution, ground truth) pairs.
    """
    from ablation.toyworld.render import sample_training_example

    examples = [sample_training_example(i, "heldout") for i in range(num)]
    pairs = []
    for image, _, _ in examples:
        high = Image.fromarray(image)
        pairs.append((high.resize((high.width // SCALE, high.height // SCALE), Image.BOX), high))
    return [caption for _, caption, _ in examples], pairs


def bicubic(image: Image.Image, scale: int = SCALE) -> Image.Image:
    """The baseline: bicubic interpolation to `scale` times the size."""
    return image.convert("RGB").resize((image.width * scale, image.height * scale), Image.BICUBIC)


@dataclass
class UpscaleScore:
    """Mean PSNR (dB) over the pairs, of the upscaler and of bicubic, against the high-resolution images."""

    psnr_upscaler: float
    psnr_bicubic: float
    num_pairs: int
    per_image: list[tuple[float, float]]

    @property
    def gain(self) -> float:
        """How many dB the upscaler beats bicubic by (negative: worse)."""
        return self.psnr_upscaler - self.psnr_bicubic


def _check_pairs(pairs: Sequence[tuple[Image.Image, Image.Image]]) -> None:
    for low, high in pairs:
        if high.size != (low.width * SCALE, low.height * SCALE):
            raise ValueError(f"high-res {high.size} is not {SCALE}x the low-res {low.size}")


def score_upscaled(upscaled: Sequence[Image.Image],
                   pairs: Sequence[tuple[Image.Image, Image.Image]]) -> UpscaleScore:
    """PSNR of already upscaled images and of bicubic interpolation against the high-resolution images.

    Args:
        upscaled: the upscaler's output for each pair's low-resolution input.
        pairs: (low-resolution input, high-resolution ground truth at 4x its size).

    Raises:
        ValueError: a high-resolution image is not 4x its low-resolution input.
    """
    _check_pairs(pairs)
    per = [(psnr(up.resize(high.size), high.convert("RGB")), psnr(bicubic(low), high.convert("RGB")))
           for up, (low, high) in zip(upscaled, pairs, strict=True)]
    n = len(per)
    return UpscaleScore(psnr_upscaler=sum(p for p, _ in per) / n, psnr_bicubic=sum(b for _, b in per) / n,
                        num_pairs=n, per_image=per)


def upscaler_psnr(pipe, pairs: Sequence[tuple[Image.Image, Image.Image]], prompts: Sequence[str] | str = "",
                  **upscale_kwargs) -> UpscaleScore:
    """Upscale each pair's low-resolution input, then `score_upscaled`.

    Args:
        pipe: a `StableDiffusionUpscalePipeline`.
        pairs: (low-resolution input, high-resolution ground truth at 4x its size).
        prompts: one prompt per pair (e.g. the caption it was rendered from) or one for all.
        **upscale_kwargs: passed to `upscale` (seed, steps, guidance, noise_level, batch_size).
    """
    _check_pairs(pairs)  # fail before sampling
    return score_upscaled(upscale(pipe, [low for low, _ in pairs], prompts, **upscale_kwargs), pairs)
