"""The ablation objectives as pure tensor functions (no models, no state).

Notation (docs/method.md): z0 an anchor latent, eps ~ N(0, I), t a timestep, z_t = alpha_t z0 + sigma_t eps,
c an anchor prompt, c* its target prompt, eps_theta the UNet's prediction, sg the stop-gradient.
All squared norms are means over every element (`F.mse_loss(..., reduction="mean")`), as in diffusers.

Teacher of the model-based loss: `sg[eps_theta(z_t, t, c)]` can be evaluated by
* `same`: the model being trained, under no_grad (the reference implementation; one set of weights);
* `frozen`: the pretrained weights (with LoRA the adapters are disabled for that pass, which is free;
  dense groups swap in a frozen copy of the trained tensors).
The trainer picks the teacher; these functions only see its output.

Flow matching (SD3, SD3.5, FLUX; docs/mmdit.md): z_t = (1 - t) z0 + t eps with t = sigma in [0, 1], and the
model predicts the velocity v = dz_t/dt = eps - z0. `model_based_loss` then matches the velocity under the
target prompt to the stop-gradient velocity under the anchor prompt, `noise_based_loss` regresses
`flow_velocity(z0, eps)`; t is drawn as the models were trained (`sample_flow_sigmas`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the elements where `mask` is 1, averaged per sample, then over the batch.

    With `mask=None` (or all ones) this is exactly `F.mse_loss(pred, target)`. The reference implementation
    divides each sample's masked sum by the number of masked *cells* (its mask has one channel), which makes
    its ablation term C times (C = 4 latent channels) a per-element mean; docs/paper-parity.md gives the
    equivalent prior weight.

    Args:
        pred: [B, C, h, w].
        target: same shape.
        mask: [B, 1, h, w] (broadcast over channels) or None.
    """
    if mask is None:
        return F.mse_loss(pred.float(), target.float())
    mask = mask.to(pred.device, torch.float32).expand_as(pred)
    se = (pred.float() - target.float()) ** 2 * mask
    per_sample = se.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
    return per_sample.mean()


def model_based_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Model-based ablation loss.

        L = || eps_theta(z_t, t, c*) - sg[eps_theta(z_t, t, c)] ||^2

    Args:
        student_pred: the prediction under the target prompt, eps_theta(z_t, t, c*), with gradient.
        teacher_pred: the prediction under the anchor prompt (detached here whatever the caller did).
        mask: optional loss mask [B, 1, h, w] (the resize augmentation's valid region).

    Returns:
        The scalar mean squared error (in fp32).
    """
    return masked_mse(student_pred, teacher_pred.detach(), mask)


def noise_based_loss(student_pred: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-based (image-based) ablation loss on anchor images with target prompts.

        L = || eps - eps_theta(z_t, t, c*) ||^2      (eps replaced by v for v-prediction models)

    Args:
        student_pred: eps_theta(z_t, t, c*).
        target: the regression target of the anchor latent (see `regression_target`).
        mask: optional loss mask [B, 1, h, w].
    """
    return masked_mse(student_pred, target, mask)


def prior_preservation_loss(anchor_pred: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """Prior preservation: the standard denoising loss on anchor pairs, weighted.

        L_prior = lambda * || eps - eps_theta(z_t, t, c) ||^2

    Args:
        anchor_pred: eps_theta(z_t, t, c) with gradient.
        target: the regression target of the anchor latent.
        weight: lambda.
    """
    return weight * F.mse_loss(anchor_pred.float(), target.float())


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for z_t, following `scheduler.config.prediction_type`.

    epsilon: eps; v_prediction: v = alpha_t * eps - sigma_t * z0 (`scheduler.get_velocity`);
    sample: z0.

    Args:
        scheduler: a diffusers noise scheduler (DDPM-like, with `get_velocity`).
        latents: z0.
        noise: eps.
        timesteps: t, one per sample.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


# --------------------------------------------------------------------------------------------------
# flow matching (SD3 / SD3.5 / FLUX)
# --------------------------------------------------------------------------------------------------


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z0 + t eps, with t = sigma one per sample (broadcast over the other dimensions)."""
    t = sigmas.reshape(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1.0 - t) * latents + t * noise


def flow_velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = eps - z0 (what SD3/FLUX transformers predict)."""
    return noise - latents


def image_shift_mu(scheduler, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift mu (`calculate_shift` of diffusers' FLUX pipeline).

    mu grows linearly in the number of packed image tokens from `base_shift` at `base_image_seq_len` (256:
    512 px) to `max_shift` at `max_image_seq_len` (4096: 1024 px), read from the scheduler's config.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def flow_sigmas(u: torch.Tensor, scheduler, image_seq_len: int | None = None) -> torch.Tensor:
    """Shift t in (0, 1) the way the model's FlowMatch scheduler shifts its sampling sigmas.

    * static shift s (SD3/SD3.5: `shift=3.0`): sigma = s t / (1 + (s - 1) t);
    * dynamic shift (FLUX: `use_dynamic_shifting`): sigma = e^mu / (e^mu + 1/t - 1) (`time_shift_type`
      exponential; linear: mu / (mu + 1/t - 1)) with mu = `image_shift_mu(scheduler, image_seq_len)`.

    For a logit-normal t both are logit-normal again, with the mean moved by ln s or by mu.

    Args:
        u: t values in (0, 1), one per sample.
        scheduler: a `FlowMatchEulerDiscreteScheduler` (its config decides).
        image_seq_len: number of (packed) image tokens; required with dynamic shifting.
    """
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("a dynamically shifted scheduler (FLUX) needs the image sequence length")
        mu = image_shift_mu(scheduler, image_seq_len)
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / u - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    shift = float(cfg.get("shift", 1.0))
    return shift * u / (1 + (shift - 1) * u)


def sample_flow_sigmas(scheduler, batch_size: int, generator: torch.Generator | None = None,
                       image_seq_len: int | None = None, weighting_scheme: str = "logit_normal",
                       logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """Training noise levels t as SD3/FLUX were trained: logit-normal(0, 1), then the scheduler's shift.

    Draws u with diffusers' `compute_density_for_timestep_sampling` (SD3 paper, Esser et al. 2024;
    `logit_normal`, `mode` or `uniform`) on the generator's device, then applies `flow_sigmas`.
    diffusers' dreambooth scripts index the scheduler's discretised sigma table with u instead; this is
    the continuous version of the same distribution. The model's timestep input is t times
    `num_train_timesteps`.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale,
                                              device=generator.device if generator is not None else "cpu",
                                              generator=generator)
    # t = 0 or 1 exactly would make 1/u - 1 infinite or the sample noise-free; float32 sigmoid can hit both.
    u = u.clamp(1e-6, 1 - 1e-6)
    return flow_sigmas(u, scheduler, image_seq_len)


def flow_loss_weights(sigmas: torch.Tensor, weighting_scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights of the SD3 paper (`compute_loss_weighting_for_sd3`: `sigma_sqrt`, `cosmap`, else 1)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error with one weight per sample (None: plain `F.mse_loss`, the same number)."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = (pred.float() - target.float()).square().reshape(pred.shape[0], -1).mean(1)
    return (weights.float().to(per_sample.device) * per_sample).mean()
