"""Merging peft LoRA adapters into dense weights (W + scale * B @ A), always computed in float32.

Training with `--mixed-precision fp16/bf16` keeps the frozen base weights in the low-precision dtype;
adding a small LoRA update to a bf16 weight in bf16 loses most of the update (the stored update was
off by 37% on the tiny model). So every merge here computes `scale * B @ A` in float32 and adds it to
a float32 weight: the module's own when it is float32, else the float32 original given as `base`.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping

import torch
from torch import nn

# One logger for the whole weights-I/O area (delta, merge, exports, loading): users filter on it.
logger = logging.getLogger("ablation.checkpoint")


def components(pipe) -> dict[str, nn.Module]:
    """The pipeline's `nn.Module` components, unwrapped (see `unwrap`)."""
    return {name: unwrap(m) for name, m in pipe.components.items() if isinstance(m, nn.Module)}


def unwrap(module: nn.Module) -> nn.Module:
    """Strip torch.compile, DDP and `PeftModel` wrappers (their parameter names carry prefixes)."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "get_base_model") and hasattr(module, "peft_config"):
            module = module.get_base_model()
        else:
            return module


def tuner_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> peft tuner layer (LoRA-wrapped Linear/Conv/Embedding) of a module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def base_name(name: str) -> str:
    """Map a peft parameter name to the base weight it modifies (`x.to_k.lora_A.default.weight` -> `x.to_k.weight`)."""
    if ".lora_" in name:
        return name.split(".lora_")[0] + ".weight"
    return name.replace(".base_layer", "")


def alias(name: str) -> str:
    """Canonical spelling of a parameter name across library versions.

    transformers 5 dropped CLIPTextModel's `text_model.` level and peft inserts `.base_layer`: both
    spellings must match.
    """
    return name.replace(".base_layer", "").removeprefix("text_model.")


def layer_delta(layer) -> torch.Tensor | None:
    """The float32 weight delta a LoRA layer adds in its current state (None when disabled or merged).

    Plain Linear LoRA (the only kind this project trains) is computed here as `scale * B @ A` in
    float32, whatever the adapters' dtype; other layer types use peft's `get_delta_weight`, upcast.
    """
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    total = None
    for adapter in layer.active_adapters:
        if adapter not in getattr(layer, "lora_A", {}) and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("DoRA adapters cannot be merged into a delta; train plain LoRA")
        lora_a = layer.lora_A[adapter] if adapter in getattr(layer, "lora_A", {}) else None
        lora_b = layer.lora_B[adapter] if adapter in getattr(layer, "lora_B", {}) else None
        if isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear) and isinstance(layer.get_base_layer(),
                                                                                          nn.Linear):
            delta = (lora_b.weight.float() @ lora_a.weight.float()) * float(layer.scaling[adapter])
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
        else:
            delta = layer.get_delta_weight(adapter).float()
        total = delta if total is None else total + delta
    return total


def _merged(weight: torch.Tensor, delta: torch.Tensor, base: torch.Tensor | None, name: str) -> torch.Tensor:
    """float32 W + delta, W taken from `base` (the float32 original) when the module's copy is low precision."""
    if weight.dtype != torch.float32 and base is not None:
        if tuple(base.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: float32 base weight has shape {tuple(base.shape)}, the model's "
                             f"{tuple(weight.shape)}; pass the base model this pipeline was loaded from")
        weight = base
    elif weight.dtype != torch.float32:
        logger.warning("merging LoRA into %s weights of %s without their float32 originals: the base weight's "
                       "rounding stays in the result (pass base= for an exact merge)", weight.dtype, name)
    return weight.detach().to(delta.device, torch.float32) + delta


def dense_state_dict(module: nn.Module, base: Mapping[str, torch.Tensor] | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """State dict under base names with LoRA adapters merged (W + scale * B @ A); the module is untouched.

    Args:
        module: a module, possibly carrying peft LoRA layers.
        base: float32 original weights by (any spelling of) their base name, used for the merge where the
            module's frozen weights are fp16/bf16 (mixed-precision training).
        dtype: dtype of the merged tensors; None keeps float32 (merged) / the module's dtype (untouched).

    Tensors not touched by adapters are the module's own (no copy), so this is cheap.
    """
    module = unwrap(module)
    state = {k: v for k, v in module.state_dict().items() if ".lora_" not in k}
    layers = tuner_layers(module)
    if not layers:
        return state
    out = {base_name(k): v for k, v in state.items()}
    base_by_alias = {alias(k): v for k, v in (base or {}).items()}
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer_delta(layer)
            if delta is not None:
                key = f"{name}.weight"
                merged = _merged(out[key], delta, base_by_alias.get(alias(key)), key)
                out[key] = merged if dtype is None else merged.to(dtype)
    return out


def dense_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with LoRA layers merged and removed; shares every untouched tensor with the original.

    Merged weights keep the base layer's dtype; the sum is formed in float32 and rounded once.
    """
    module = unwrap(module)
    layers = tuner_layers(module)
    if not layers:
        return module
    # Deep-copy the module tree but not the tensors: memo maps each tensor to itself.
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    clone = copy.deepcopy(module, memo)
    for name in sorted(layers, key=lambda n: n.count("."), reverse=True):  # innermost first
        layer = clone.get_submodule(name)
        base_layer = layer.get_base_layer()
        delta = layer_delta(layer)
        if delta is not None:
            with torch.no_grad():
                # the weight keeps its dtype: the sum is formed in float32 and rounded once
                merged = (base_layer.weight.float() + delta.to(base_layer.weight.device)).to(base_layer.weight.dtype)
                base_layer.weight = nn.Parameter(merged, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, base_layer)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in clone.__dict__:
            delattr(clone, attr)
    return clone


def dense_pipeline(pipe):
    """The pipeline itself, or a copy whose LoRA-wrapped components are replaced by merged dense copies."""
    comps = dict(pipe.components)
    changed = False
    for name, module in comps.items():
        if isinstance(module, nn.Module) and tuner_layers(unwrap(module)):
            comps[name] = dense_copy(module)
            changed = True
    if not changed:
        return pipe
    init_keys = set(inspect.signature(type(pipe).__init__).parameters) - {"self"}
    # Non-component init arguments (requires_safety_checker, ...) live in the pipeline config.
    extra = {k: v for k, v in pipe.config.items() if k in init_keys and k not in comps and not k.startswith("_")}
    return type(pipe)(**{k: v for k, v in comps.items() if k in init_keys}, **extra)
