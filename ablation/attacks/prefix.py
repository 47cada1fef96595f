"""`prefix`: UnlearnDiffAtk-style adversarial prefix tokens, optimised through the ablated UNet.

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate
Unsafe Images ... For Now" (ECCV 2024) optimise k = 5 prefix token embeddings for each target prompt,
with the diffusion model itself as the classifier: the denoising loss of the *ablated* model on
images of the target, conditioned on "<prefix> <target prompt>", is minimised over the prefix. Here
the reference images are the base model's images of the same prompt (`AttackContext.references`), so
no external classifier is needed. The prefix lives in continuous embedding space (the stronger,
white-box form of the attack); the nearest vocabulary tokens are reported too, as a transferable
text approximation.
"""

from __future__ import annotations

import torch

from ablation.adversary import DEFAULT_TOKENS, prefixed  # noqa: F401 (re-exported: the attack's names)
from ablation.attacks.common import (
    AttackContext,
    Cost,
    Item,
    check_single_encoder,
    counting,
    diffusion_loss,
    encode,
    noise_scheduler,
    placeholder_id,
    token_overrides,
)


def nearest_tokens(pipe, vectors: torch.Tensor) -> list[str]:
    """The vocabulary token whose embedding is closest (cosine) to each vector."""
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    sims = torch.nn.functional.normalize(vectors.float(), dim=-1) @ torch.nn.functional.normalize(weight, dim=-1).T
    ids = sims.argmax(-1).tolist()
    return [pipe.tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]


def optimise_prefix(ctx: AttackContext, prompt: str, latents: torch.Tensor, iterations: int, k: int, *,
                    lr: float = 5e-3, batch_size: int = 4, generator: torch.Generator,
                    cost: Cost | None = None) -> tuple[torch.Tensor, list[float]]:
    """k prefix embeddings for one prompt, minimising the ablated model's denoising loss on `latents`."""
    pipe = ctx.pipe
    pid = placeholder_id(pipe.tokenizer)
    weight = pipe.text_encoder.get_input_embeddings().weight
    start = torch.randint(0, weight.shape[0] - 2, (k,), generator=generator)  # random real tokens, as the paper
    vectors = weight[start].detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    scheduler = noise_scheduler(pipe)
    text = prefixed(prompt, k)
    losses = []
    for _ in range(iterations):
        idx = torch.randint(0, len(latents), (min(batch_size, len(latents)),), generator=generator)
        with token_overrides(pipe.text_encoder, pid, vectors):
            cond = encode(pipe, [text]).expand(len(idx), -1, -1)
        loss = diffusion_loss(pipe.unet, scheduler, latents[idx], cond, generator, cost)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return vectors.detach(), losses


def run(ctx: AttackContext, budget: int, k: int = DEFAULT_TOKENS) -> dict:
    """Optimise a k-token prefix per target prompt (`budget` iterations each); ASR on both models."""
    check_single_encoder(ctx.pipe, "prefix")
    _, latents, ref_prompts = ctx.references()
    cost = Cost()
    g = torch.Generator().manual_seed(ctx.seed)
    items, rows = [], []
    with ctx.ablated(), counting(ctx.pipe, cost):
        for prompt in ctx.target_prompts:
            own = [i for i, p in enumerate(ref_prompts) if p == prompt] or list(range(len(ref_prompts)))
            vectors, losses = optimise_prefix(ctx, prompt, latents[own], budget, k, generator=g, cost=cost)
            words = nearest_tokens(ctx.pipe, vectors)
            items.append(Item(prefixed(prompt, k), vectors, f"<prefix x{k}> {prompt}"))
            rows.append({"prompt": prompt, "nearest_tokens": " ".join(words), "loss_first": losses[0],
                         "loss_last": losses[-1]})
    return {"asr": ctx.asr_both(items, "prefix"), "cost": cost.as_dict(), "prompts": rows,
            "details": {"prefix_tokens": k, "iterations_per_prompt": budget}}
