"""Inpainting with a base or ablated model: does it paint the target into a masked region?

Two kinds of UNet work here, both through diffusers' inpainting pipelines:

* a dedicated 9-channel inpainting UNet (latents + mask + masked-image latents), e.g.
  `stable-diffusion-v1-5/stable-diffusion-inpainting`;
* an ordinary 4-channel text-to-image UNet: `StableDiffusionInpaintPipeline` then blends latents, at
  every step replacing the unmasked region by the (noised) latents of the input image, so only the
  masked region is generated (`AutoPipelineForInpainting.from_pipe` builds it from the loaded
  text-to-image pipeline's components, no reload).

Deltas across the two: a delta trained on a text-to-image model applies to the inpainting model of
the same family. The attention weights (`attn1`/`attn2` q, k, v, out, the parameter groups of the
method) have the same names and shapes in both; only `conv_in` differs (4 vs 9 input channels), so
a `full-weight` delta's `conv_in` is skipped (`apply_delta(strict=False)`, which
`ablation.evaluation.swap.ablated` uses for UNets whose input is not 4 channels). Whether the
ablation *transfers* is an empirical question the inpainting evaluation answers: the inpainting
UNet was fine-tuned from the text-to-image one, so its weights are close but not equal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ablation.sampling.generate import Job, Sample, SamplingSettings, generate

MASK_BOXES = ("center", "random")


def inpaint_pipeline(pipe):
    """The inpainting pipeline sharing `pipe`'s components (itself if it already is one)."""
    from diffusers import AutoPipelineForInpainting

    if "Inpaint" in type(pipe).__name__:
        return pipe
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def box_mask(size: tuple[int, int], mode: str = "center", fraction: float = 0.5, seed: int = 0) -> Image.Image:
    """A rectangular mask (white = repaint) covering `fraction` of each side.

    Args:
        size: (width, height) of the image.
        mode: `center` or `random` (position drawn from `seed`).
        fraction: box side as a fraction of the image side.
        seed: seed of the random position.
    """
    if mode not in MASK_BOXES:
        raise ValueError(f"unknown mask box {mode!r}; choose one of {MASK_BOXES}")
    if not 0 < fraction <= 1:
        raise ValueError(f"mask fraction must be in (0, 1], got {fraction}")
    w, h = size
    bw, bh = max(1, round(w * fraction)), max(1, round(h * fraction))
    if mode == "center":
        x0, y0 = (w - bw) // 2, (h - bh) // 2
    else:
        rng = random.Random(seed)
        x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y0 + bh, x0:x0 + bw] = 255
    return Image.fromarray(mask, mode="L")


def inpaint(pipe, image: Image.Image, mask: Image.Image, jobs: Sequence[Job], settings: SamplingSettings, *,
            strength: float = 1.0, paste_back: bool = False, batch_size: int = 4, path_for=None) -> list[Sample]:
    """Inpaint the masked region of one image for each job (prompt + seed).

    Args:
        pipe: an inpainting pipeline (`inpaint_pipeline`), scheduler already set.
        image: the input image; its size (rounded down to a multiple of 8) is the output size.
        mask: white where the image is repainted.
        jobs: prompts and seeds (see `ablation.sampling.generate.jobs_for`).
        settings: sampling settings (height/width default to the image's).
        strength: 1.0 ignores the masked content; lower keeps some of it.
        paste_back: paste the original pixels outside the mask over the result (the decoder otherwise
            changes them slightly).
        batch_size: images per pipeline call.
        path_for: where to save each image (None: not saved).
    """
    from dataclasses import replace

    image = image.convert("RGB")
    mask = mask.convert("L").resize(image.size)
    w, h = (image.width // 8) * 8, (image.height // 8) * 8
    settings = replace(settings, height=settings.height or h, width=settings.width or w)
    samples = generate(pipe, jobs, settings, batch_size=batch_size, path_for=path_for, reuse=False,
                       pipe_kwargs={"image": image, "mask_image": mask, "strength": strength})
    if paste_back:
        for s in samples:
            s.image = pipe.image_processor.apply_overlay(mask, image, s.image.resize(image.size))
            if s.path is not None:
                s.image.save(s.path)
    return samples
