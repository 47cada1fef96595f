"""Keep other prompts unchanged: a penalty on what a cross-attention update does to their text tokens.

The paper's objective only looks at anchor images under target and anchor prompts, so nothing stops the
shared key/value projections from drifting for every other prompt too (on the toy world the default grumpy-cat
ablation turned robots orange). In a UNet the text enters only through `attn2.to_k` / `attn2.to_v`, linear maps
of the text encoder's token embeddings e, so an update dW changes another prompt exactly by dW e. This module
penalises that change on the tokens of a set of control prompts (every concept but the target):

    P = mean over trained K/V layers of  E_e ||dW e||^2 / E_e ||W0 e||^2  =  tr(dW C dW^T) / tr(W0 C W0^T),

with C = E[e e^T] the second moment of the control tokens, computed once (so the cost does not grow with the
number of control prompts). With P = 0 the control prompts' images are exactly those of the base model. The
idea is the preservation term of closed-form editors (UCE, MACE) used as a regulariser of the paper's loss; it is
an addition to the paper, off in the paper recipes (docs/paper-parity.md).

The same penalty on the unconditional (empty) prompt alone (`--preserve-uncond`) guards what every image shares:
classifier-free guidance extrapolates away from the empty prompt's prediction, eps_u + g (eps_c - eps_u), so a
drift of its keys/values moves every concept, amplified by g - 1. Its tokens (BOS, EOS and near-identical padding
states) are also the states that carry a concept through the prompt, so holding them can stop an ablation: on the
toy model it kept the anchor of grumpy cat but left nemo, snoopy and van gogh in place (docs/paper-parity.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ablation.params import CROSS_ATTN_SUFFIXES


def second_moment(token_embeddings: torch.Tensor) -> torch.Tensor:
    """C = E[e e^T] over every token of the control prompts ([P, L, D] -> [D, D], float32)."""
    tokens = token_embeddings.reshape(-1, token_embeddings.shape[-1]).float()
    return tokens.T @ tokens / len(tokens)


class KVPreservation:
    """The penalty P for the text key/value projections a run trains (dense or LoRA).

    Args:
        unet: the UNet being trained (unwrapped).
        dense: module name -> the trained weight Parameter of each K/V projection (dense runs), or None for LoRA.
        moment: C from `second_moment`, on the training device.
        adapter_name: the LoRA adapter (LoRA runs).
    """

    def __init__(self, unet: nn.Module, dense: dict[str, nn.Parameter] | None, moment: torch.Tensor,
                 adapter_name: str = "default") -> None:
        self.moment = moment
        self.adapter = adapter_name
        self.layers: list[tuple[nn.Module | nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, module in unet.named_modules():
            if not name.endswith(CROSS_ATTN_SUFFIXES):
                continue
            if dense is not None:
                weight = dense.get(f"{name}.weight")
                if weight is None:
                    continue
                original = weight.detach().clone()
                self.layers.append((weight, original, self._energy(original)))
            elif hasattr(module, "lora_A") and adapter_name in module.lora_A:
                base = module.base_layer.weight.detach().float()
                self.layers.append((module, base, self._energy(base)))

    def _energy(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        return ((w @ self.moment) * w).sum().clamp_min(1e-12)

    def _delta(self, layer, original: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.Parameter):
            return layer.float() - original
        a = layer.lora_A[self.adapter].weight.float()
        b = layer.lora_B[self.adapter].weight.float()
        return layer.scaling[self.adapter] * (b @ a)

    def __call__(self) -> torch.Tensor:
        """P (a scalar with gradient), 0 when there is nothing to preserve."""
        if not self.layers:
            return self.moment.new_zeros(())
        total = 0.0
        for layer, original, energy in self.layers:
            d = self._delta(layer, original)
            total = total + ((d @ self.moment) * d).sum() / energy
        return total / len(self.layers)


class Penalties:
    """Weighted sum of `KVPreservation` terms (control prompts, the unconditional prompt)."""

    def __init__(self, terms: list[tuple[float, KVPreservation]]) -> None:
        self.terms = terms

    def __call__(self) -> torch.Tensor:
        """sum of weight * P (a scalar with gradient)."""
        return sum((weight * term() for weight, term in self.terms), self.terms[0][1].moment.new_zeros(()))


def control_prompts(concepts, toy: bool, limit: int = 256) -> list[str]:
    """Prompts of every concept but the ablated targets: the anchors themselves, their neighbours and everything
    else (the toy catalogue's classes, or the bundled anchor-prompt lists on real models). At most `limit`,
    spread evenly. The anchor belongs here too: the loss moves target prompts towards it, never the reverse."""
    targets = {c.target.lower() for c in concepts}
    prompts: list[str] = []
    if toy:
        from ablation.toyworld import catalog

        for family in catalog().families.values():
            for concept in family.classes:
                if concept.lower() not in targets:
                    prompts += family.prompts_for(concept, "train")
    else:
        from ablation.concepts import bundled_prompt_lists, read_prompts

        for path in bundled_prompt_lists().values():
            prompts += read_prompts(path)
    prompts = [p for p in dict.fromkeys(prompts) if not any(t in p.lower() for t in targets)]
    if len(prompts) > limit:
        step = len(prompts) / limit
        prompts = [prompts[int(i * step)] for i in range(limit)]
    return prompts
