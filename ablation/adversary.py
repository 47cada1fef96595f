"""The robust-training adversary (`--robust`): adversarial target-prompt embeddings found by a few inner steps,
and the learned-token slots the prefix adversary and the attacks share.

It lives beside the trainer, not in `ablation.attacks`: training must not import the attack programs (which
import evaluation); the attacks import these building blocks from here.

AdvUnlearn (Zhang et al. 2024), Receler (Huang et al. 2023) and AdvAnchor harden an erasure by training
on prompts an attacker would use. Here the attacker is a projected-gradient ascent on the *target
prompt's conditioning* (the text-encoder hidden states the UNet attends to): starting from c*, find
c' = c* + delta, with every token's perturbation at most `radius` times that token's own norm, that
makes the model's prediction under c' as far as possible from the teacher's prediction for the anchor,

    max_delta || eps_theta(z_t, t, c* + delta) - sg[eps_theta(z_t, t, c)] ||^2,

i.e. the embedding that best brings the target back on this batch. Adding (c', teacher) pairs to the
ablation loss then teaches the model to map the target's *neighbourhood* to the anchor, not just its
exact prompt. Working on hidden states (rather than token embeddings) needs no text encoder in the
loop, so it fits the trainer's precomputed prompt embeddings; only positions marked in `positions`
(by default the tokens where target and anchor conditioning differ, see `target_positions`) move.

Wiring into the trainer (`ablation.objective.Objective.__call__`, model-based variant): after
`teacher = self.teacher(batch)`, every `robust_every` steps,

    adv = adversarial_target_embeddings(self.base_unet, batch.noisy, batch.timesteps, batch.target_cond.embeds,
                                        teacher, positions=target_positions(batch.target_cond.embeds,
                                                                            batch.anchor_cond.embeds),
                                        steps=cfg.robust_steps, radius=cfg.robust_radius, generator=g)
    student_adv = self.predict(self.unet, batch.noisy, batch.timesteps, PromptEmbeddings(adv.embeds))
    main = main + cfg.robust_weight * losses.model_based_loss(student_adv, teacher)

(SDXL: pass `added_cond_kwargs` as `predict` builds them.) Cost per use: `steps` UNet forward and
backward passes on the batch (`adv.unet_forward`, `adv.unet_backward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ablation.config import ConfigError

#: an existing, rare single token of the CLIP vocabulary used as the learned token's slot
PLACEHOLDER = "sks"
#: learned prefix tokens of the `prefix` adversary and attack (UnlearnDiffAtk uses 5)
DEFAULT_TOKENS = 5


def prefixed(prompt: str, k: int) -> str:
    """`sks sks ... prompt`: k placeholder slots in front of the prompt."""
    return " ".join([PLACEHOLDER] * k + [prompt])


def placeholder_id(tokenizer, word: str = PLACEHOLDER) -> int:
    """The token id of the placeholder word (must be a single token)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"placeholder {word!r} is {len(ids)} tokens in this tokenizer; need exactly one")
    return ids[0]


@contextlib.contextmanager
def token_overrides(text_encoder, token_id: int, vectors: torch.Tensor) -> Iterator[None]:
    """Replace the embedding of `token_id` by learned vectors while active (differentiable).

    The i-th occurrence of the token in a prompt gets `vectors[i]` (the last row for any further
    occurrence), so one vector implements textual inversion and k vectors a k-token prefix.

    Args:
        text_encoder: a CLIP text model (`get_input_embeddings()` is hooked).
        token_id: the placeholder's id.
        vectors: `[k, D]` embeddings, typically a leaf tensor with `requires_grad`.
    """
    layer = text_encoder.get_input_embeddings()

    def hook(_module, args, output):
        ids = args[0]
        mask = ids == token_id
        if not bool(mask.any()):
            return output
        occurrence = (mask.long().cumsum(-1) - 1).clamp(0, vectors.shape[0] - 1)
        learned = vectors.to(output.device, output.dtype)[occurrence]
        return torch.where(mask[..., None], learned, output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(pipe, prompts: Sequence[str], device=None) -> torch.Tensor:
    """`[N, L, D]` text-encoder hidden states as the UNet sees them (gradients flow if enabled)."""
    device = device or pipe.unet.device
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return embeds




@dataclass
class AdversarialEmbeddings:
    """Result of `adversarial_target_embeddings`.

    Attributes:
        embeds: `[B, L, D]` adversarial target-prompt conditioning, detached (same dtype as the input).
        loss_before: the objective at the unperturbed target embeddings.
        loss_after: the objective at `embeds` (>= loss_before unless the ascent failed).
        unet_forward: UNet forward passes spent.
        unet_backward: UNet backward passes spent.
    """

    embeds: torch.Tensor
    loss_before: float
    loss_after: float
    unet_forward: int
    unet_backward: int


def target_positions(target_embeds: torch.Tensor, anchor_embeds: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """`[B, L]` True where the target's conditioning differs from the anchor's (the target's tokens and,
    through causal attention, everything after them)."""
    return (target_embeds.float() - anchor_embeds.float()).abs().amax(-1) > atol


def project_per_token(delta: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`delta` [..., D] with each token's vector shortened to at most `bound` (L2)."""
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(bound / norm, max=1.0)


def adversarial_target_embeddings(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target_embeds: torch.Tensor,
    teacher_pred: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    steps: int = 3,
    radius: float = 0.1,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    added_cond_kwargs: dict | None = None,
) -> AdversarialEmbeddings:
    """Perturb the target prompt's conditioning to maximise the ablation loss (L2 PGD per token).

    Args:
        unet: the UNet being trained (unwrapped from DDP: this forward has no matching DDP backward).
            Its parameters receive no gradient (`torch.autograd.grad` w.r.t. the perturbation only).
        noisy: z_t `[B, C, h, w]` of the batch.
        timesteps: t `[B]`.
        target_embeds: c* `[B, L, D]`, the target prompts' encoder hidden states.
        teacher_pred: sg[eps_theta(z_t, t, c)] `[B, C, h, w]`, the anchor prediction the ablation matches.
        positions: `[B, L]` bool, the token positions that may move (default: all; see `target_positions`).
        steps: ascent steps (each one UNet forward and backward on the batch); 0 returns c* itself.
        radius: per-token bound ||delta_i|| <= radius * ||c*_i||.
        step_size: per-step L2 length as a fraction of the bound (default 2.5 / steps, Madry et al.).
        generator: CPU generator of the random start inside the ball (None: start at c*).
        added_cond_kwargs: SDXL's `text_embeds` / `time_ids`.

    Returns:
        The adversarial embeddings and what they cost.
    """
    if steps < 0 or radius < 0:
        raise ValueError(f"steps and radius must be >= 0, got {steps}, {radius}")
    base = target_embeds.detach().float()
    mask = (torch.ones(base.shape[:2], dtype=torch.bool, device=base.device) if positions is None
            else positions.to(base.device).bool())
    bound = radius * base.norm(dim=-1, keepdim=True) * mask[..., None]
    alpha = (step_size if step_size is not None else 2.5 / max(steps, 1)) * bound
    kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    teacher = teacher_pred.detach().float()

    def objective(delta: torch.Tensor) -> torch.Tensor:
        pred = unet(noisy, timesteps, (base + delta).to(target_embeds.dtype), return_dict=False, **kwargs)[0]
        return F.mse_loss(pred.float(), teacher)

    forward = backward = 0
    with torch.no_grad():
        loss_before = float(objective(torch.zeros_like(base)))
    forward += 1
    if steps == 0 or radius == 0:
        return AdversarialEmbeddings(target_embeds.detach().clone(), loss_before, loss_before, forward, backward)
    delta = torch.zeros_like(base)
    if generator is not None:  # uniform direction, radius fraction in [0, 1): a random start in the ball
        noise = torch.randn(base.shape, generator=generator).to(base.device)
        scale = torch.rand(base.shape[:2], generator=generator).to(base.device)[..., None]
        delta = project_per_token(noise, bound) * scale
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = objective(delta)
            (grad,) = torch.autograd.grad(loss, delta)
            forward += 1
            backward += 1
            with torch.no_grad():
                direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = project_per_token(delta + alpha * direction, bound) * mask[..., None]
    with torch.no_grad():
        loss_after = float(objective(delta))
    forward += 1
    return AdversarialEmbeddings((base + delta).to(target_embeds.dtype).detach(), loss_before, loss_after,
                                 forward, backward)
