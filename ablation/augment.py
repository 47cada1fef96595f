"""The official resize augmentation and its loss mask, done on cached latents.

The reference implementation (concept-ablation `diffusers/utils.py`, `CustomDiffusionDataset.preprocess`)
rescales every anchor *image* to a random size, pastes it at a random place into a mid-grey canvas (or crops a
window from an enlarged image), prefixes the target prompt with "a far away" / "very small" or "zoomed in" /
"close up", and restricts the loss to the pasted region shrunk by one latent cell on each side. This project
caches anchors as latents (decoding and re-encoding would cost a VAE pass per sample), so the same operation is
done on the latent grid: the latent is resized with bilinear interpolation and pasted into the latent of a grey
image. The SD autoencoder is convolutional with an 8x factor, so a latent resized by s is close to the latent of
the image resized by s; docs/paper-parity.md records the measured effect of the choice.

One deliberate difference: the reference mask is empty when the pasted image covers fewer than three latent
cells (below 24 px at 8x, i.e. scales < 72 px at 512 px rarely, but on a 64 px model often), which turns the
masked mean into 0/0 = NaN. Here the mask falls back to the unshrunk pasted region, which is never empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: prompt prefixes of the reference: small pastes are "far away", enlarged crops are "zoomed in"
FAR_PREFIXES = ("a far away ", "very small ")
CLOSE_PREFIXES = ("zoomed in ", "close up ")
#: zoom codes of `Augmented.zoom`
NO_PREFIX, FAR, CLOSE = 0, 1, 2


@dataclass
class Augmented:
    """A batch after the resize augmentation."""

    latents: torch.Tensor  # [B, C, h, w]
    mask: torch.Tensor  # [B, 1, h, w] in {0, 1}: where the loss counts
    zoom: torch.Tensor  # [B] NO_PREFIX / FAR / CLOSE: which prompt prefix list applies
    prefix: torch.Tensor  # [B] 0 or 1: which prefix of that list


def sample_scales(batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Pixel sizes as the reference draws them: U[res/3, res] with p=0.66, else U[1.2 res, 1.4 res)."""
    small = torch.randint(resolution // 3, resolution + 1, (batch,), generator=generator)
    large = torch.randint(int(1.2 * resolution), int(1.4 * resolution), (batch,), generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < 0.66, small, large)


def augment_latents(latents: torch.Tensor, blank: torch.Tensor, resolution: int, vae_factor: int,
                    generator: torch.Generator) -> Augmented:
    """Rescale and place each latent as the reference does with images, with the loss mask.

    Args:
        latents: [B, C, h, w] clean anchor latents (h = w = resolution / vae_factor).
        blank: [C, h, w] latent of the reference's mid-grey canvas (`blank_latent`).
        resolution: training resolution in pixels.
        vae_factor: pixels per latent cell.
        generator: CPU generator (the caller's per-micro-step stream).

    Returns:
        The augmented latents, masks, and the prompt-prefix choice of every sample.
    """
    bsz, _, h, w = latents.shape
    scales = sample_scales(bsz, resolution, generator)
    # Positions and prefix choices are drawn for every sample whether used or not: a fixed number of draws
    # keeps the stream (and so resumed runs) independent of the scales.
    offsets = torch.rand(bsz, 2, generator=generator)
    prefix = torch.randint(0, 2, (bsz,), generator=generator)
    out = blank.to(latents.dtype).expand_as(latents).clone()
    mask = torch.zeros(bsz, 1, h, w, dtype=latents.dtype)
    zoom = torch.full((bsz,), NO_PREFIX, dtype=torch.long)
    for i in range(bsz):
        scale = int(scales[i])
        cells = max(1, round(scale / vae_factor))
        resized = F.interpolate(latents[i:i + 1], size=(cells, cells), mode="bilinear", align_corners=False,
                                antialias=cells < h)[0]
        if scale > resolution:  # enlarged: a random window, the whole window counts
            top = int(offsets[i, 0] * (cells - h + 1))
            left = int(offsets[i, 1] * (cells - w + 1))
            out[i] = resized[:, top:top + h, left:left + w]
            mask[i] = 1.0
            zoom[i] = CLOSE
            continue
        cells = min(cells, h)
        top = int(offsets[i, 0] * (h - cells + 1))
        left = int(offsets[i, 1] * (w - cells + 1))
        out[i, :, top:top + cells, left:left + cells] = resized[:, :cells, :cells]
        inner = 1 if cells > 2 else 0  # the reference shrinks by one cell; that would leave nothing here
        mask[i, :, top + inner:top + cells - inner, left + inner:left + cells - inner] = 1.0
        if scale < 0.6 * resolution:
            zoom[i] = FAR
    return Augmented(out, mask, zoom, prefix)


@torch.no_grad()
def blank_latent(vae, resolution: int) -> torch.Tensor:
    """Latent [C, h, w] of the reference's canvas: zeros in [-1, 1] pixel space, i.e. mid-grey."""
    pixels = torch.zeros(1, 3, resolution, resolution, device=vae.device, dtype=vae.dtype)
    return (vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor).float().cpu()


def prefixed(prompt: str) -> tuple[str, str, str, str]:
    """The four prefixed forms of a target prompt, in the order (FAR, 0), (FAR, 1), (CLOSE, 0), (CLOSE, 1)."""
    return tuple(p + prompt for p in FAR_PREFIXES + CLOSE_PREFIXES)  # type: ignore[return-value]


def prefix_column(zoom: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Column of `prefixed(...)` for each sample (-1 where no prefix applies)."""
    return torch.where(zoom == NO_PREFIX, torch.full_like(zoom, -1), (zoom - 1) * 2 + prefix)
