"""The data of a run: anchor latents of every concept and the table of anchor and target prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ablation.augment import blank_latent, prefixed
from ablation.data import PromptEmbeddings
from ablation.planning import RunPlan, slug


@dataclass
class TrainingData:
    """Anchor latents of all concepts, with the rows of their anchor and target prompts in `prompts`.

    `target_rows[i]` holds one row per target-prompt template of latent i (one column for most concept types;
    the reference draws styles from three); `prefix_rows[r]` the rows of the four prefixed forms of target
    prompt r used by the resize augmentation (`ablation.augment.prefixed`), or None without augmentation.
    """

    latents: torch.Tensor
    anchor_rows: torch.Tensor
    target_rows: torch.Tensor  # [N, templates]
    prompts: list[str]
    embeddings: PromptEmbeddings | None = None
    prefix_rows: torch.Tensor | None = None  # [len(prompts), 4], -1 for rows that are not target prompts
    blank: torch.Tensor | None = None  # latent of the augmentation's grey canvas


def model_fingerprint(model_id: str, model_path: str, pipe) -> str:
    """Identity of the base weights for the anchor cache: id, UNet config and the UNet files' size and mtime.

    The mtime makes a retrained model (same id and config) miss the cache.
    """
    from ablation.checkpoint import pipeline_config_hash

    parts = [model_id, pipeline_config_hash(pipe)[:16]]
    unet_dir = Path(model_path) / "unet"
    if unet_dir.is_dir():
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(unet_dir.iterdir())]
    return "|".join(parts)


def prepare_data(plan: RunPlan, pipe, accelerator) -> tuple[TrainingData, int]:
    """Anchor latents per concept (cached generation, image folder or retrieval) and the prompt table.

    Returns:
        The data and how many anchor images this call generated (0 on a cache hit).
    """
    from ablation import data

    cfg = plan.config
    fingerprint = model_fingerprint(cfg.model, plan.model_path, pipe)
    latents, anchor_rows, target_rows, prompts, generated = [], [], [], [], 0
    for i, concept in enumerate(plan.concepts):
        if cfg.variant == "image-based" and (cfg.anchor_images or cfg.retrieval):
            source = cfg.anchor_images
            if cfg.retrieval:
                source = plan.output_dir / "retrieved" / f"{i}-{slug(concept.anchor)}"
                if accelerator.is_main_process and not source.exists():
                    data.retrieve_images(concept.anchor, cfg.num_anchor_images, source)
                accelerator.wait_for_everyone()
            anchors = data.image_anchor_latents(pipe.vae, source, len(concept.anchor_prompts), cfg.num_anchor_images,
                                                cfg.resolution, cfg.seed)
        else:
            settings = data.SamplerSettings(fingerprint, concept.anchor_prompts, cfg.anchor_scheduler,
                                            cfg.anchor_steps, cfg.anchor_guidance, cfg.resolution,
                                            cfg.num_anchor_images, cfg.seed)
            anchors = data.cached_anchor_latents(pipe, settings, cfg.cache_dir, cfg.anchor_batch_size,
                                                 autocast=accelerator.autocast)
            generated += cfg.num_anchor_images if anchors.generated else 0
        offset = len(prompts)
        variants = concept.variants()  # [anchor prompt][template]
        prompts += list(concept.anchor_prompts) + [v for row in variants for v in row]
        width = len(variants[0])
        latents.append(anchors.latents)
        anchor_rows.append(offset + anchors.prompt_index)
        first = offset + len(concept.anchor_prompts) + anchors.prompt_index * width
        target_rows.append(first[:, None] + torch.arange(width)[None, :])
    widths = {rows.shape[1] for rows in target_rows}
    if len(widths) > 1:  # concepts with different template counts: pad by repeating their first template
        most = max(widths)
        target_rows = [torch.cat([r, r[:, :1].expand(-1, most - r.shape[1])], 1) for r in target_rows]
    training = TrainingData(torch.cat(latents), torch.cat(anchor_rows), torch.cat(target_rows), prompts)
    if cfg.augment:
        add_prefixed_prompts(training)
        training.blank = blank_latent(pipe.vae, cfg.resolution)
    return training, generated


def add_prefixed_prompts(training: TrainingData) -> None:
    """Append the augmentation's prefixed forms of every target prompt to the prompt table (in place)."""
    targets = sorted({int(r) for r in training.target_rows.flatten()})
    prefix_rows = torch.full((len(training.prompts) + 4 * len(targets), 4), -1, dtype=torch.long)
    for row in targets:
        start = len(training.prompts)
        training.prompts.extend(prefixed(training.prompts[row]))
        prefix_rows[row] = torch.arange(start, start + 4)
    training.prefix_rows = prefix_rows

