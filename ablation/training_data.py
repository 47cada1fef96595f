"""The data of a run: anchor latents of every concept and the table of anchor and target prompts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ablation import data
from ablation.architectures import training_adapter
from ablation.augment import blank_latent, prefixed
from ablation.data import PromptEmbeddings
from ablation.planning import RunPlan, slug
from ablation.preserve import control_prompts
from ablation.sampling.anchors import SamplerSettings


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
    control_rows: torch.Tensor | None = None  # rows of the control prompts (`ablation.preserve`)
    uncond_rows: torch.Tensor | None = None  # the row of the unconditional (empty) prompt (`--preserve-uncond`)
    blank: torch.Tensor | None = None  # latent of the augmentation's grey canvas
    trajectory: torch.Tensor | None = None  # [N, S, C, H, W] sampler states of each latent (--anchor-trajectory)
    trajectory_t: torch.Tensor | None = None  # [N, S] their timesteps
    prior_pool: torch.Tensor | None = None  # indices of the prior term's anchor images (None: every latent)
    #: [concepts, 2] first latent and latent count of each concept, several concepts only: the ablation batch draws
    #: a concept uniformly, then one of its latents, so a concept with target images does not outweigh the others
    concept_spans: torch.Tensor | None = None


def copy_filter(plan: RunPlan, concept, device):
    """The memorization copy filter of a concept (None for other types, or without a reference image).

    The reference is `--memorized-image`, or on the toy world the renderer's memorized image; the embedder is a
    user's SSCD TorchScript file (threshold 0.5, as the official code) or the CLIP judge (image cosine 0.9).
    """

    if concept.concept_type != "memorization":
        return None
    cfg = plan.config
    if cfg.memorized_image:
        reference = data.load_reference_image(cfg.memorized_image)
    elif plan.toy:
        from PIL import Image

        from ablation.toyworld.render import render

        reference = Image.fromarray(render(concept.target, 0, size=cfg.resolution))
    else:
        return None
    if cfg.copy_detector:
        embedder = data.load_torchscript_embedder(cfg.copy_detector, device=device)
        return data.CopyFilter(reference, embedder, embedder.name, data.SSCD_COPY_THRESHOLD)
    from ablation.evaluation.clip_judge import ClipJudge, default_clip_for

    judge = ClipJudge(default_clip_for(cfg.model), device=device)
    name = "toy-clip" if plan.toy else judge.model_id  # a path would tie the cache to the install location
    return data.CopyFilter(reference, judge.image_features, name, data.CLIP_COPY_THRESHOLD)


def prepare_data(plan: RunPlan, pipe, accelerator) -> tuple[TrainingData, int]:
    """Anchor latents per concept (cached generation, image folder or retrieval) and the prompt table.

    Returns:
        The data and how many anchor images this call generated (0 on a cache hit).
    """

    cfg = plan.config
    # Taken before the frozen weights are cast for mixed precision (the dtype is part of the key).
    model_key = data.anchor_model_key(cfg.model, plan.model_path, pipe, None)
    latents, anchor_rows, target_rows, prompts, generated = [], [], [], [], 0
    states, state_t, pool = [], [], []  # pool: where the anchor images are (the prior term draws only those)
    for i, concept in enumerate(plan.concepts):
        if cfg.variant == "image-based" and (cfg.anchor_images or cfg.retrieval):
            source = cfg.anchor_images
            if cfg.retrieval:
                source = plan.output_dir / "retrieved" / f"{i}-{slug(concept.anchor)}"
                if accelerator.is_main_process:  # reuses a complete folder, resumes a partial one
                    data.retrieve_images(concept.anchor, cfg.num_anchor_images, source, url=cfg.retrieval_url,
                                         index=cfg.retrieval_index, overwrite=cfg.overwrite)
                accelerator.wait_for_everyone()
            anchors = data.image_anchor_latents(pipe.vae, source, len(concept.anchor_prompts), cfg.num_anchor_images,
                                                cfg.resolution, cfg.seed)
        else:
            # Nudity anchors are sampled with the target as the negative prompt, as the official code does.
            negative = concept.target if concept.concept_type == "nudity" else None
            if negative is not None and not _takes_negative_prompt(pipe):
                negative = None  # FLUX samples without classifier-free guidance: there is nothing to steer away
            settings = SamplerSettings(model_key, concept.anchor_prompts, cfg.anchor_scheduler,
                                            cfg.anchor_steps, cfg.anchor_guidance, cfg.resolution,
                                            cfg.num_anchor_images, cfg.seed, precision=cfg.mixed_precision,
                                            negative_prompt=negative, trajectory=cfg.anchor_trajectory)
            anchors = data.cached_anchor_latents(pipe, settings, cfg.cache_dir, cfg.anchor_batch_size,
                                                 autocast=accelerator.autocast,
                                                 copy_filter=copy_filter(plan, concept, pipe.device),
                                                 offload_text_encoders=cfg.offload_text_encoders)
            generated += cfg.num_anchor_images if anchors.generated else 0
        start = sum(len(x) for x in latents)
        if plan.concept_priors[i]:
            pool.append(torch.arange(start, start + len(anchors.latents)))
        count = plan.concept_target_images[i]
        if count:  # model-based only (TrainConfig.check): the anchors were generated with `settings`
            target = target_image_latents(pipe, settings, concept, count, cfg.cache_dir,
                                          cfg.anchor_batch_size, accelerator.autocast, cfg.offload_text_encoders)
            generated += count if target.generated else 0
            anchors = _joined(anchors, target)
        offset = len(prompts)
        variants = concept.variants()  # [anchor prompt][template]
        prompts += list(concept.anchor_prompts) + [v for row in variants for v in row]
        width = len(variants[0])
        latents.append(anchors.latents)
        if cfg.anchor_trajectory:
            states.append(anchors.trajectory)
            state_t.append(anchors.trajectory_t)
        anchor_rows.append(offset + anchors.prompt_index)
        first = offset + len(concept.anchor_prompts) + anchors.prompt_index * width
        target_rows.append(first[:, None] + torch.arange(width)[None, :])
    widths = {rows.shape[1] for rows in target_rows}
    if len(widths) > 1:  # concepts with different template counts: pad by repeating their first template
        most = max(widths)
        target_rows = [torch.cat([r, r[:, :1].expand(-1, most - r.shape[1])], 1) for r in target_rows]
    training = TrainingData(torch.cat(latents), torch.cat(anchor_rows), torch.cat(target_rows), prompts)
    # the prior term holds the anchor on anchor images (not on the target's), of the concepts that have it
    if cfg.prior_preservation and sum(len(p) for p in pool) < len(training.latents):
        training.prior_pool = torch.cat(pool)
    if len(latents) > 1:
        sizes = torch.tensor([len(x) for x in latents])
        training.concept_spans = torch.stack([sizes.cumsum(0) - sizes, sizes], 1)
    if cfg.anchor_trajectory:
        training.trajectory, training.trajectory_t = torch.cat(states), torch.cat(state_t)
    if cfg.augment:
        add_prefixed_prompts(training)
        training.blank = _blank(pipe.vae, cfg.resolution)
    if cfg.preserve_weight:
        controls = control_prompts(plan.concepts, plan.toy)
        training.control_rows = torch.arange(len(training.prompts), len(training.prompts) + len(controls))
        training.prompts.extend(controls)
    if cfg.preserve_uncond:  # classifier-free guidance's empty prompt, encoded as the pipelines encode it
        training.uncond_rows = torch.tensor([len(training.prompts)])
        training.prompts.append("")
    return training, generated


def target_image_latents(pipe, anchor_settings: SamplerSettings, concept, count: int, cache_dir, batch_size: int,
                         autocast, offload_text_encoders: bool = False):
    """`--target-images`: `count` images of the target, sampled as the anchors are but with the target prompts.

    Image k uses target prompt k mod P, the variant of anchor prompt k mod P, so its `prompt_index` pairs it with
    that anchor prompt like an anchor image; the seeds follow the anchors' (`seed + num_anchor_images + k`). No
    copy filter: for a memorized image, its copies are exactly the states the ablation has to leave.
    """
    prompts = tuple(row[0] for row in concept.variants())
    settings = dataclasses.replace(anchor_settings, prompts=prompts, count=count, negative_prompt=None,
                                   seed=anchor_settings.seed + anchor_settings.count)
    return data.cached_anchor_latents(pipe, settings, cache_dir, batch_size, autocast=autocast,
                                      offload_text_encoders=offload_text_encoders)


def _joined(anchors, target):
    """One anchor set of the anchor images followed by the target images."""
    def cat(a, b):
        return None if a is None else torch.cat([a, b])

    return dataclasses.replace(anchors, latents=torch.cat([anchors.latents, target.latents]),
                               prompt_index=torch.cat([anchors.prompt_index, target.prompt_index]),
                               trajectory=cat(anchors.trajectory, target.trajectory),
                               trajectory_t=cat(anchors.trajectory_t, target.trajectory_t))


def _takes_negative_prompt(pipe) -> bool:
    return training_adapter(pipe).negative_prompts


def _blank(vae, resolution: int) -> torch.Tensor:
    """Latent of the augmentation's grey canvas in the denoiser's latent space.

    SD3 / FLUX VAEs shift before they scale, (z - shift) * scale; `blank_latent` gives z * scale.
    """
    blank = blank_latent(vae, resolution)
    shift = getattr(vae.config, "shift_factor", None)
    return blank - shift * vae.config.scaling_factor if shift else blank


def add_prefixed_prompts(training: TrainingData) -> None:
    """Append the augmentation's prefixed forms of every target prompt to the prompt table (in place)."""
    targets = sorted({int(r) for r in training.target_rows.flatten()})
    prefix_rows = torch.full((len(training.prompts) + 4 * len(targets), 4), -1, dtype=torch.long)
    for row in targets:
        start = len(training.prompts)
        training.prompts.extend(prefixed(training.prompts[row]))
        prefix_rows[row] = torch.arange(start, start + 4)
    training.prefix_rows = prefix_rows

