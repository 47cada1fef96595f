"""The ablation objective: micro-batches drawn from the anchor data and the loss on them.

Randomness (batch indices, flips, timesteps, noise) comes from a generator seeded per micro-step from
(seed, micro-step, rank), so a resumed run replays exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ablation import losses
from ablation.config import TrainConfig
from ablation.data import PromptEmbeddings, encode_prompts, sdxl_time_ids
from ablation.training_data import TrainingData


@dataclass
class Batch:
    """One micro-batch on the device."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # regression target (eps or v) of the clean latents
    anchor_cond: PromptEmbeddings
    target_cond: PromptEmbeddings


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of a micro-step's generator: independent streams per (seed, step, rank), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Objective:
    """Draws micro-batches and computes the ablation loss (see `ablation.losses` for the equations)."""

    def __init__(self, cfg: TrainConfig, pipe, data: TrainingData, noise_scheduler, unet, device, rank: int,
                 teacher_params: dict[str, torch.Tensor] | None = None):
        self.cfg, self.pipe, self.data, self.scheduler = cfg, pipe, data, noise_scheduler
        self.unet, self.device, self.rank = unet, device, rank
        self.base_unet = _unwrap(unet)
        self.teacher_params = teacher_params
        self.lora = getattr(self.base_unet, "_hf_peft_config_loaded", False)
        self.train_text = cfg.params == "embedding"

    def batch(self, micro_step: int, batch_size: int | None = None, seed_rank: int | None = None) -> Batch:
        """The micro-batch of a micro-step (a pure function of seed, step and rank)."""
        bsz = batch_size or self.cfg.train_batch_size
        rank = self.rank if seed_rank is None else seed_rank
        g = torch.Generator().manual_seed(micro_step_seed(self.cfg.seed, micro_step, rank))
        idx = torch.randint(0, len(self.data.latents), (bsz,), generator=g)
        latents = self.data.latents[idx]
        flips = torch.rand(bsz, generator=g) < 0.5
        if self.cfg.hflip:  # flipping latents ~ flipping images: the SD autoencoder is convolutional
            latents = torch.where(flips[:, None, None, None], latents.flip(-1), latents)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), generator=g)
        latents, noise, t = latents.to(self.device), noise.to(self.device), t.to(self.device)
        target_rows = self.data.target_rows[idx]
        if self.train_text:  # the trained embedding rows must be in the graph: encode now
            target_cond = encode_prompts(self.pipe, [self.data.prompts[i] for i in target_rows], self.device)
        else:
            target_cond = self.data.embeddings.select(target_rows)
        return Batch(noisy=self.scheduler.add_noise(latents, noise, t), timesteps=t,
                     target=losses.regression_target(self.scheduler, latents, noise, t),
                     anchor_cond=self.data.embeddings.select(self.data.anchor_rows[idx]), target_cond=target_cond)

    def predict(self, unet, noisy, t, cond: PromptEmbeddings) -> torch.Tensor:
        """eps_theta(z_t, t, c) (or v) for a batch."""
        kwargs = {}
        if cond.pooled is not None:  # SDXL: pooled text embeddings and size/crop ids
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(self.cfg.resolution, noisy.shape[0], noisy.device, cond.pooled.dtype)}
        return unet(noisy, t, cond.embeds, return_dict=False, **kwargs)[0]

    @torch.no_grad()
    def teacher(self, batch: Batch) -> torch.Tensor:
        """sg[eps_theta(z_t, t, c)]: the model itself (`same`) or the pretrained weights (`frozen`)."""
        # The UNet is not trained in the embedding group, and anchor embeddings are computed once from
        # the original encoder, so there `same` and `frozen` are one and the same teacher.
        if self.cfg.teacher == "same" or self.train_text:
            return self.predict(self.base_unet, batch.noisy, batch.timesteps, batch.anchor_cond)
        if self.lora:  # adapters off = the pretrained model, at no memory cost
            self.base_unet.disable_adapters()
            try:
                return self.predict(self.base_unet, batch.noisy, batch.timesteps, batch.anchor_cond)
            finally:
                self.base_unet.enable_adapters()
        # Dense: the trained tensors' original values swapped in for this call only.
        return self.predict(lambda *a, **k: torch.func.functional_call(self.base_unet, self.teacher_params, a, k),
                            batch.noisy, batch.timesteps, batch.anchor_cond)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (`ablation`, `prior`) for a micro-batch."""
        cfg = self.cfg
        prior = bool(cfg.prior_preservation)
        share_teacher = cfg.variant == "model-based" and cfg.teacher == "same" and prior
        teacher = None
        if cfg.variant == "model-based" and not share_teacher:
            teacher = self.teacher(batch)
        if prior:  # one forward for target and anchor halves
            both = self.predict(self.unet, torch.cat([batch.noisy] * 2), torch.cat([batch.timesteps] * 2),
                                _cat(batch.target_cond, batch.anchor_cond))
            student, anchor_pred = both.chunk(2)
        else:
            student, anchor_pred = self.predict(self.unet, batch.noisy, batch.timesteps, batch.target_cond), None
        if cfg.variant == "model-based":
            # teacher `same` with prior preservation: the anchor half *is* the teacher's forward (detached).
            main = losses.model_based_loss(student, anchor_pred if share_teacher else teacher)
        else:
            main = losses.noise_based_loss(student, batch.target)
        parts = {"ablation": float(main.detach())}
        total = main
        if prior:
            prior_loss = losses.prior_preservation_loss(anchor_pred, batch.target, cfg.prior_weight)
            parts["prior"] = float(prior_loss.detach())
            total = total + prior_loss
        return total, parts


def _cat(a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings:
    return PromptEmbeddings(torch.cat([a.embeds, b.embeds]),
                            None if a.pooled is None else torch.cat([a.pooled, b.pooled]))


def _unwrap(module):
    return getattr(module, "module", module)  # DDP

