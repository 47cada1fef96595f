"""The ablation objectives as pure tensor functions (no models, no state).

Notation (docs/method.md): z0 an anchor latent, eps ~ N(0, I), t a timestep, z_t = alpha_t z0 + sigma_t eps,
c an anchor prompt, c* its target prompt, eps_theta the UNet's prediction, sg the stop-gradient.
All squared norms are means over every element (`F.mse_loss(..., reduction="mean")`), as in diffusers.

Teacher of the model-based loss: `sg[eps_theta(z_t, t, c)]` can be evaluated by
* `same`: the model being trained, under no_grad (the reference implementation; one set of weights);
* `frozen`: the pretrained weights (with LoRA the adapters are disabled for that pass, which is free;
  dense groups swap in a frozen copy of the trained tensors).
The trainer picks the teacher; these functions only see its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_based_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """Model-based ablation loss.

        L = || eps_theta(z_t, t, c*) - sg[eps_theta(z_t, t, c)] ||^2

    Args:
        student_pred: the prediction under the target prompt, eps_theta(z_t, t, c*), with gradient.
        teacher_pred: the prediction under the anchor prompt (detached here whatever the caller did).

    Returns:
        The scalar mean squared error (in fp32).
    """
    return F.mse_loss(student_pred.float(), teacher_pred.detach().float())


def noise_based_loss(student_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Noise-based (image-based) ablation loss on anchor images with target prompts.

        L = || eps - eps_theta(z_t, t, c*) ||^2      (eps replaced by v for v-prediction models)

    Args:
        student_pred: eps_theta(z_t, t, c*).
        target: the regression target of the anchor latent (see `regression_target`).
    """
    return F.mse_loss(student_pred.float(), target.float())


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
