"""Parameter groups: which weights an ablation run trains, densely or through LoRA adapters.

* `cross-attn`: the cross-attention key/value projections `attn2.to_k`, `attn2.to_v` (the only path from
  the text into the UNet, docs/method.md);
* `attn`: every attention projection of the UNet, `attn1`/`attn2` x `to_q`/`to_k`/`to_v`/`to_out.0`;
* `full`: the whole UNet (LoRA on `full` adapts every linear layer);
* `embedding`: the token-embedding rows of the target's own tokens in the text encoder(s). The full
  matrix is a parameter but a gradient mask zeroes every other row, and it gets no weight decay, so
  AdamW leaves those rows bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ablation.config import ConfigError

CROSS_ATTN_SUFFIXES = ("attn2.to_k", "attn2.to_v")
ATTN_SUFFIXES = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def group_modules(unet: nn.Module, group: str) -> list[str]:
    """Names of the `nn.Linear` modules of a UNet group (the LoRA target modules)."""
    if group == "cross-attn":
        suffixes = CROSS_ATTN_SUFFIXES
    elif group == "attn":
        suffixes = ATTN_SUFFIXES
    elif group == "full":
        return [name for name, m in unet.named_modules() if isinstance(m, nn.Linear)]
    else:
        raise ConfigError(f"parameter group {group!r} has no UNet modules; choose cross-attn, attn or full")
    return [name for name, m in unet.named_modules() if isinstance(m, nn.Linear) and name.endswith(suffixes)]


def group_parameter_names(unet: nn.Module, group: str) -> list[str]:
    """Names of the UNet parameters a dense run of the group trains (weights and biases)."""
    if group == "full":
        return [name for name, _ in unet.named_parameters()]
    modules = set(group_modules(unet, group))
    return [name for name, _ in unet.named_parameters() if name.rsplit(".", 1)[0] in modules]


def count_parameters(unet: nn.Module, group: str) -> int:
    """Number of parameters a dense run of the group trains (works on the meta device)."""
    params = dict(unet.named_parameters())
    return sum(params[name].numel() for name in group_parameter_names(unet, group))


def embedding_weight_name(encoder: nn.Module) -> str:
    """Parameter name of a text encoder's token-embedding matrix (it differs between CLIP classes)."""
    weight = encoder.get_input_embeddings().weight
    return next(name for name, p in encoder.named_parameters() if p is weight)


def target_token_ids(tokenizer, target: str, anchor: str) -> list[int]:
    """Token ids of the target that the anchor does not share ("grumpy cat" vs "cat" -> ids of "grumpy").

    Raises:
        ConfigError: every token of the target is an anchor token (nothing could be trained).
    """
    def ids(text: str) -> set[int]:
        return set(tokenizer(text, add_special_tokens=False).input_ids)

    tokens = sorted(ids(target) - ids(anchor))
    if not tokens:
        raise ConfigError(f"the target {target!r} has no tokens of its own (all shared with {anchor!r}); "
                          f"the embedding group cannot separate them")
    return tokens


@dataclass
class Trainable:
    """What a run trains.

    Attributes:
        param_names: component ("unet", "text_encoder", "text_encoder_2") -> names of the base parameters
            that change (for `checkpoint.trained_tensors`; LoRA runs list the base weights the adapters merge into).
        parameters: component -> parameter name -> the tensors the optimizer updates (LoRA: the adapters).
        lora: adapters were added to the UNet.
    """

    param_names: dict[str, list[str]]
    parameters: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    lora: bool = False

    def flat(self) -> list[nn.Parameter]:
        """All trained tensors (the optimizer's parameter list), in a fixed order."""
        return [p for comp in sorted(self.parameters) for _, p in sorted(self.parameters[comp].items())]


def add_lora(unet: nn.Module, group: str, rank: int, alpha: float) -> None:
    """Add a peft LoRA adapter on the group's linear layers (diffusers' `PeftAdapterMixin.add_adapter`)."""
    from peft import LoraConfig

    modules = group_modules(unet, group)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules)
    unet.add_adapter(config)


def setup_trainable(pipe, group: str, lora_rank: int = 0, lora_alpha: float | None = None,
                    token_ids: list[int] | None = None) -> Trainable:
    """Freeze the pipeline, then unfreeze (or add adapters to) exactly the group.

    Args:
        pipe: a Stable Diffusion (XL) pipeline.
        group: `cross-attn`, `attn`, `full` or `embedding`.
        lora_rank: 0 for dense updates, else the LoRA rank.
        lora_alpha: LoRA alpha (default: the rank).
        token_ids: rows to train for the `embedding` group (see `target_token_ids`).

    Returns:
        The trained names and tensors; trained tensors are fp32.
    """
    unet = pipe.unet
    encoders = {name: getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}
    for module in (unet, *encoders.values()):
        module.requires_grad_(False)
    if group == "embedding":
        if not token_ids:
            raise ConfigError("the embedding group needs the target's token ids")
        trainable = Trainable(param_names={name: [embedding_weight_name(e)] for name, e in encoders.items()})
        for name, encoder in encoders.items():
            weight = encoder.get_input_embeddings().weight
            weight.requires_grad_(True)
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            mask[token_ids] = 1
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
            weight.data = weight.data.float()
            trainable.parameters[name] = {embedding_weight_name(encoder): weight}
        return trainable
    names = group_parameter_names(unet, group)
    if lora_rank:
        add_lora(unet, group, lora_rank, lora_alpha or float(lora_rank))
        lora_params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        for p in lora_params.values():
            p.requires_grad_(True)
            p.data = p.data.float()
        return Trainable(param_names={"unet": names}, parameters={"unet": lora_params}, lora=True)
    params = dict(unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
        params[n].data = params[n].data.float()
    return Trainable(param_names={"unet": names}, parameters={"unet": {n: params[n] for n in names}})
