"""The ablation objective: micro-batches drawn from the anchor data and the loss on them.

Randomness (batch indices, flips, timesteps, noise) comes from a generator seeded per micro-step from
(seed, micro-step, rank), so a resumed run replays exactly the batches an uninterrupted run would have drawn.

What depends on the model family (DDPM noising and eps/v targets for UNets; flow matching with shifted
logit-normal t and velocity targets for SD3/FLUX; how the denoiser is called; how prompts are encoded) is
asked of the architecture adapter (`ablation.architectures`); the batches, flips, augmentation, teachers and
losses are the same code for every family.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from ablation import augment, losses
from ablation.adversary import (
    DEFAULT_TOKENS,
    adversarial_target_embeddings,
    encode,
    placeholder_id,
    prefixed,
    project_per_token,
    target_positions,
    token_overrides,
)
from ablation.architectures import Architecture, Conditioning, UNetArchitecture
from ablation.config import TrainConfig
from ablation.data import PromptEmbeddings, sdxl_time_ids
from ablation.training_data import TrainingData


@dataclass
class Batch:
    """One micro-batch on the device.

    The ablation half: anchor latents under target prompts (`target_cond`), with the anchor prompts
    (`anchor_cond`) for the teacher. With prior preservation, the prior half is drawn as the official code
    draws it: *other* anchor latents, with their own flips, noise and timesteps, under their anchor prompts.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # regression target (eps, v, or the flow velocity eps - z0) of the clean latents
    anchor_cond: PromptEmbeddings
    target_cond: PromptEmbeddings
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss mask of the resize augmentation
    prior: Batch | None = None  # the prior-preservation half (its anchor_cond is its own conditioning)
    adversary_seed: int | None = None  # set on the micro-steps where --robust adds adversarial target prompts
    target_rows: torch.Tensor | None = None  # rows of `TrainingData.prompts` of the target prompts


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of a micro-step's generator: independent streams per (seed, step, rank), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Objective:
    """Draws micro-batches and computes the ablation loss (see `ablation.losses` for the equations)."""

    def __init__(self, cfg: TrainConfig, pipe, data: TrainingData, noise_scheduler, unet, device, rank: int,
                 teacher_params: dict[str, torch.Tensor] | None = None, adapter: Architecture | None = None):
        """`unet` is the denoiser (UNet or SD3/FLUX transformer, maybe DDP-wrapped); `adapter` its family's
        `ablation.architectures` adapter (default: the UNet one) and `noise_scheduler` its training scheduler."""
        self.cfg, self.pipe, self.data, self.scheduler = cfg, pipe, data, noise_scheduler
        self.adapter = adapter or UNetArchitecture(getattr(pipe, "vae_scale_factor", 8))
        self.unet, self.device, self.rank = unet, device, rank
        self.base_unet = _unwrap(unet)
        self.teacher_params = teacher_params
        self.lora = getattr(self.base_unet, "_hf_peft_config_loaded", False)
        self.preservation = None  # set by the trainer: --preserve-weight / --preserve-uncond penalties
        self.train_text = cfg.params == "embedding"
        self.adversary: torch.Tensor | None = None  # --robust-adversary persistent / prefix: kept across steps
        self._prefix_step: float | None = None

    def batch(self, micro_step: int, batch_size: int | None = None, seed_rank: int | None = None) -> Batch:
        """The micro-batch of a micro-step (a pure function of seed, step and rank)."""
        cfg, data = self.cfg, self.data
        bsz = batch_size or cfg.train_batch_size
        rank = self.rank if seed_rank is None else seed_rank
        g = torch.Generator().manual_seed(micro_step_seed(cfg.seed, micro_step, rank))
        idx, latents, flips = self._draw_latents(bsz, g)
        rows = data.target_rows[idx, torch.randint(0, data.target_rows.shape[1], (bsz,), generator=g)]
        mask = None
        if cfg.augment:
            vae_factor = cfg.resolution // latents.shape[-1]
            aug = augment.augment_latents(latents, data.blank, cfg.resolution, vae_factor, g)
            latents, mask = aug.latents, aug.mask.to(self.device)
            column = augment.prefix_column(aug.zoom, aug.prefix)
            prefixed_rows = data.prefix_rows[rows, column.clamp_min(0)]
            rows = torch.where(column >= 0, prefixed_rows, rows)
        if data.trajectory is not None:  # --anchor-trajectory: a sampler state of each latent, at its own timestep
            noisy, t, target = self._trajectory_states(idx, flips, g)
        else:
            noisy, t, target = self._noise(latents, g)
        if self.train_text:  # the trained embedding rows must be in the graph: encode now
            target_cond = self.adapter.encode_prompts(self.pipe, [data.prompts[i] for i in rows], self.device)
        else:
            target_cond = data.embeddings.select(rows)
        prior = None
        if cfg.prior_preservation:
            p_idx, p_latents, _ = self._draw_latents(bsz, g, pool=data.prior_pool)
            p_noisy, p_t, p_target = self._noise(p_latents, g)
            prior_cond = data.embeddings.select(data.anchor_rows[p_idx])
            prior = Batch(p_noisy, p_t, p_target, anchor_cond=prior_cond, target_cond=prior_cond)
        adversary = None
        if cfg.robust and micro_step >= 0 and micro_step % cfg.robust_every == 0:
            adversary = int(torch.randint(0, 2**62, (1,), generator=g))
        return Batch(noisy=noisy, timesteps=t, target=target, anchor_cond=data.embeddings.select(data.anchor_rows[idx]),
                     target_cond=target_cond, mask=mask, prior=prior, adversary_seed=adversary, target_rows=rows)

    def _draw_latents(self, bsz: int, g: torch.Generator, pool: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices (from `pool`, default every latent), (flipped) latents and which rows were flipped."""
        spans = self.data.concept_spans
        if pool is None and spans is not None:  # several concepts: each as likely, whatever its latent count
            which = spans[torch.randint(0, len(spans), (bsz,), generator=g)]
            idx = which[:, 0] + (torch.rand(bsz, generator=g, dtype=torch.float64) * which[:, 1]).long()
        elif pool is None:
            idx = torch.randint(0, len(self.data.latents), (bsz,), generator=g)
        else:
            idx = pool[torch.randint(0, len(pool), (bsz,), generator=g)]
        latents = self.data.latents[idx]
        flips = (torch.rand(bsz, generator=g) < 0.5) & self.cfg.hflip
        # flipping latents ~ flipping images: the SD autoencoder is convolutional
        latents = torch.where(flips[:, None, None, None], latents.flip(-1), latents)
        return idx, latents, flips

    def _trajectory_states(self, idx: torch.Tensor, flips: torch.Tensor, g: torch.Generator):
        """(noisy, timesteps, target) from the sampler states of the drawn anchors (`--anchor-trajectory`).

        The state sampler step i starts from is a noisy latent at that step's timestep, so the model-based loss
        (which needs no noise) can use it as is; `target` is unused there (the config allows no other variant).
        """
        states, times = self.data.trajectory, self.data.trajectory_t
        step = torch.randint(0, states.shape[1], (len(idx),), generator=g)
        noisy = states[idx, step]
        noisy = torch.where(flips[:, None, None, None], noisy.flip(-1), noisy).to(self.device)
        return noisy, times[idx, step].to(self.device), torch.zeros_like(noisy)

    def _noise(self, latents: torch.Tensor, g: torch.Generator):
        # The noise first, then the timesteps (the adapter draws them from `g`): the order of every release.
        noise = torch.randn(latents.shape, generator=g)
        return self.adapter.noisy_and_target(self.scheduler, latents.to(self.device), noise.to(self.device), g)

    def predict(self, unet, noisy, t, cond: PromptEmbeddings) -> torch.Tensor:
        """eps_theta(z_t, t, c) (or v, or the flow velocity) for a batch."""
        return self.adapter.predict(unet, noisy, t, cond)

    @torch.no_grad()
    def teacher(self, batch: Batch) -> torch.Tensor:
        """sg[eps_theta(z_t, t, c)]: the model itself (`same`) or the pretrained weights (`frozen`)."""
        # The UNet is not trained in the embedding group, and anchor embeddings are computed once from
        # the original encoder, so there `same` and `frozen` are one and the same teacher.
        if self.cfg.teacher == "same" or self.train_text:
            return self.predict(self.base_unet, batch.noisy, batch.timesteps, batch.anchor_cond)
        return self.original(batch, batch.anchor_cond)

    @torch.no_grad()
    def original(self, batch: Batch, cond: PromptEmbeddings) -> torch.Tensor:
        """The pretrained model's prediction under `cond` (LoRA: adapters off; dense: the trained tensors' original
        values swapped in for this call only; the embedding group: the UNet is not trained)."""
        if self.lora:  # adapters off = the pretrained model, at no memory cost
            self.base_unet.disable_adapters()
            try:
                return self.predict(self.base_unet, batch.noisy, batch.timesteps, cond)
            finally:
                self.base_unet.enable_adapters()
        if self.teacher_params is None:  # nothing of the UNet is trained
            return self.predict(self.base_unet, batch.noisy, batch.timesteps, cond)
        return self.predict(lambda *a, **k: torch.func.functional_call(self.base_unet, self.teacher_params, a, k),
                            batch.noisy, batch.timesteps, cond)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (`ablation`, `prior`) for a micro-batch."""
        cfg = self.cfg
        teacher = self.teacher(batch) if cfg.variant == "model-based" else None
        prior = batch.prior
        if prior is not None:  # one forward for the ablation and the prior halves, as the official code
            both = self.predict(self.unet, torch.cat([batch.noisy, prior.noisy]), torch.cat([batch.timesteps,
                                prior.timesteps]), _cat(batch.target_cond, prior.anchor_cond))
            student, prior_pred = both.chunk(2)
        else:
            student = self.predict(self.unet, batch.noisy, batch.timesteps, batch.target_cond)
        if cfg.variant == "model-based":
            main = losses.model_based_loss(student, teacher, batch.mask)
        else:
            main = losses.noise_based_loss(student, batch.target, batch.mask)
        parts = {"ablation": float(main.detach())}
        total = main
        if batch.adversary_seed is not None:  # --robust: the target's neighbourhood must map to the anchor too
            robust = self._robust_loss(batch, teacher)
            parts["robust"] = float(robust.detach())
            total = total + cfg.robust_weight * robust
        if prior is not None:
            prior_loss = losses.prior_preservation_loss(prior_pred, prior.target, cfg.prior_weight)
            parts["prior"] = float(prior_loss.detach())
            total = total + prior_loss
        if self.preservation is not None:  # other prompts' text keys/values stay put (ablation/preserve.py)
            penalty = self.preservation()  # weighted already (--preserve-weight, --preserve-uncond)
            parts["preserve"] = float(penalty.detach())
            total = total + penalty
        return total, parts


    def _robust_loss(self, batch: Batch, teacher: torch.Tensor) -> torch.Tensor:
        """Ablation loss on adversarial target conditioning found by a few ascent steps (ablation/adversary.py).

        Works on the UNet's text conditioning: the attack that moves it (`prefix`, `inversion` or new wordings)
        is what the plain ablation leaves open.
        """

        cfg = self.cfg
        if cfg.robust_adversary in ("persistent", "shifted"):
            return self._persistent_robust_loss(batch, teacher)
        if cfg.robust_adversary == "prefix":
            return self._prefix_robust_loss(batch, teacher)
        target = batch.target_cond
        kwargs = None
        if target.pooled is not None:  # SDXL: the same pooled embeddings and size ids as `predict` passes

            size = batch.noisy.shape[-1] * self.adapter.vae_scale_factor
            kwargs = {"text_embeds": target.pooled,
                      "time_ids": sdxl_time_ids(size, len(batch.noisy), batch.noisy.device, target.pooled.dtype)}
        adv = adversarial_target_embeddings(
            self.base_unet, batch.noisy, batch.timesteps, target.embeds, teacher,
            positions=target_positions(target.embeds, batch.anchor_cond.embeds), steps=cfg.robust_steps,
            radius=cfg.robust_radius, generator=torch.Generator().manual_seed(batch.adversary_seed),
            added_cond_kwargs=kwargs)
        student = self.predict(self.unet, batch.noisy, batch.timesteps, PromptEmbeddings(adv.embeds, target.pooled))
        return losses.model_based_loss(student, teacher, batch.mask)

    def _persistent_robust_loss(self, batch: Batch, teacher: torch.Tensor) -> torch.Tensor:
        """Ablation loss on the target conditioning plus a perturbation kept across steps (`--robust-adversary
        persistent`).

        The perturbation delta ([L, D], shared by every target prompt, every token may move) is what an attacker
        would look for: a few normalised-gradient steps move it towards conditioning under which the model being
        trained predicts what the original model predicts for the plain target prompt,
        min_delta || eps_theta(z_t, t, c* + delta) - sg[eps_orig(z_t, t, c*)] ||^2, within ||delta_i|| <= radius x
        the mean token norm of c*. Because it persists, it keeps tracking the ablation as training goes on, as the
        attacker's prefix would (AdvUnlearn keeps its adversarial prompt the same way). The model then learns to
        map c* + delta to the anchor's prediction.
        """

        cfg = self.cfg
        target = batch.target_cond
        if cfg.robust_adversary == "shifted":
            target = self._shifted_target(batch)
        base = target.embeds.detach().float()
        bound = cfg.robust_radius * base.norm(dim=-1).mean()
        if self.adversary is None:
            self.adversary = torch.zeros(base.shape[1:], device=base.device)
        original = self.original(batch, target)  # what the unablated model draws for the target
        delta = self.adversary
        with torch.enable_grad():
            for _ in range(cfg.robust_steps):
                delta = delta.detach().requires_grad_(True)
                pred = self.predict(self.base_unet, batch.noisy, batch.timesteps,
                                    dataclasses.replace(target, embeds=(base + delta).to(target.embeds.dtype)))
                loss = losses.model_based_loss(pred, original, batch.mask)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    delta = project_per_token(delta - (2.5 / cfg.robust_steps) * 0.1 * bound * step, bound)
        self.adversary = _one_adversary(delta)
        # dataclasses.replace keeps the conditioning's type: SD3 / FLUX `Conditioning` (FLUX's text ids) too
        student = self.predict(self.unet, batch.noisy, batch.timesteps,
                               dataclasses.replace(target, embeds=(base + self.adversary).to(target.embeds.dtype)))
        return losses.model_based_loss(student, teacher, batch.mask)

    def _shifted_target(self, batch: Batch) -> PromptEmbeddings:
        """The batch's target prompts behind 0-5 random vocabulary tokens (`--robust-adversary shifted`).

        An attacker's prefix moves the target's words to later positions and gives them new context; a bounded
        perturbation of the unshifted conditioning cannot reach that, so the persistent perturbation is applied to
        these encodings instead. Fresh tokens each use, seeded by the micro-step (a resumed run draws the same).
        """

        pipe = self.pipe
        g = torch.Generator().manual_seed(batch.adversary_seed)
        weight = pipe.text_encoder.get_input_embeddings().weight
        k = int(torch.randint(0, DEFAULT_TOKENS + 1, (1,), generator=g))
        texts = [prefixed(self.data.prompts[int(r)], k) for r in batch.target_rows]
        vectors = weight[torch.randint(0, weight.shape[0] - 2, (max(k, 1),), generator=g)].detach()
        with torch.no_grad(), token_overrides(pipe.text_encoder, placeholder_id(pipe.tokenizer), vectors):
            return PromptEmbeddings(encode(pipe, texts, batch.noisy.device).float())

    def _prefix_robust_loss(self, batch: Batch, teacher: torch.Tensor) -> torch.Tensor:
        """Ablation loss on "<k free tokens> <target prompt>" (`--robust-adversary prefix`).

        The `prefix` attack's own parametrisation, kept across steps: k = 5 input-token embeddings (started at
        random vocabulary tokens, seeded) in front of each target prompt, through the text encoder, moved by
        --robust-steps signed-gradient steps per use towards what the original model predicts for the plain target
        prompt; the model then learns to map the prefixed prompts to the anchor.
        """

        cfg, pipe = self.cfg, self.pipe
        texts = [prefixed(self.data.prompts[int(r)], DEFAULT_TOKENS) for r in batch.target_rows]
        token = placeholder_id(pipe.tokenizer)
        weight = pipe.text_encoder.get_input_embeddings().weight
        if self.adversary is None:
            start = torch.randint(0, weight.shape[0] - 2, (DEFAULT_TOKENS,),
                                  generator=torch.Generator().manual_seed(cfg.seed))
            self.adversary = weight[start].detach().float().clone()
        if self._prefix_step is None:  # the embeddings are frozen: their spread is measured once
            # unbounded, as the attack's prefix; --robust-radius scales the step (a tenth of radius x the spread)
            self._prefix_step = cfg.robust_radius * 0.1 * float(weight.detach().float().std())
        step_size = self._prefix_step
        original = self.original(batch, batch.target_cond)
        vectors = self.adversary
        device = batch.noisy.device
        with torch.enable_grad():
            for _ in range(cfg.robust_steps):
                vectors = vectors.detach().requires_grad_(True)
                with token_overrides(pipe.text_encoder, token, vectors):
                    cond = encode(pipe, texts, device).float()
                pred = self.predict(self.base_unet, batch.noisy, batch.timesteps, PromptEmbeddings(cond))
                (grad,) = torch.autograd.grad(losses.model_based_loss(pred, original, batch.mask), vectors)
                vectors = vectors.detach() - step_size * grad.sign()
        self.adversary = _one_adversary(vectors)
        with torch.no_grad(), token_overrides(pipe.text_encoder, token, self.adversary):
            cond = encode(pipe, texts, device).float()
        student = self.predict(self.unet, batch.noisy, batch.timesteps, PromptEmbeddings(cond))
        return losses.model_based_loss(student, teacher, batch.mask)


def _one_adversary(moved: torch.Tensor) -> torch.Tensor:
    """The persistent adversary after a step, averaged over the processes of a DDP run: each rank moves it on its own
    batch, and one adversary (the one rank 0 checkpoints) keeps every rank, and a resumed run, in the same state.
    A copy of `moved` in a single process."""
    from accelerate.utils import reduce

    return reduce(moved.detach(), "mean")


def _cat(a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings:
    if isinstance(a, Conditioning):  # SD3 / FLUX: keeps FLUX's text position ids
        return Conditioning.cat(a, b)
    return PromptEmbeddings(torch.cat([a.embeds, b.embeds]),
                            None if a.pooled is None else torch.cat([a.pooled, b.pooled]))


def _unwrap(module):
    return getattr(module, "module", module)  # DDP

