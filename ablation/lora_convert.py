"""LoRA state in three layouts: peft adapters of a trained pipeline, SVD of a dense delta, and kohya files.

The common currency is a `lora_state`: `{component: {"state_dict": {"<module>.lora_A.weight": A,
"<module>.lora_B.weight": B, ...}, "config": LoraConfig.to_dict()}}` -- peft's saved key format plus the
config that carries the scale (`lora_alpha / r`). `save_lora` (ablation.export) writes it for diffusers'
`load_lora_weights`; `kohya_state_dict` converts it to the kohya-ss layout that AUTOMATIC1111 and ComfyUI
load (`lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`), `kohya_fused_state_dict`
an SD3 / FLUX text-stream LoRA to kohya's fused-qkv layout of those models.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from ablation.delta import INDEX_SUFFIX, ROWS_SUFFIX, TRAINABLE_COMPONENTS
from ablation.merge import alias, components, dense_state_dict, tuner_layers

logger = logging.getLogger("ablation.checkpoint")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name
KOHYA_SUFFIX = "_kohya.safetensors"


def lora_state_from_pipe(pipe, adapter_name: str = "default") -> dict[str, dict] | None:
    """LoRA adapters of a pipeline's components as `{component: {"state_dict": ..., "config": ...}}`.

    `state_dict` is in peft's saved format (`...to_k.lora_A.weight`, what `get_peft_model_state_dict`
    returns) and `config` the `LoraConfig` as a dict (carries `lora_alpha`, so the scale survives).
    Returns None when no component has adapters.

    Raises:
        ValueError: a component has LoRA layers but no peft config for `adapter_name` (adapters injected
            by hand rather than with `add_adapter` / `load_lora_weights`).
    """
    from peft.utils import get_peft_model_state_dict

    out = {}
    for comp, module in components(pipe).items():
        if not tuner_layers(module):
            continue
        config = getattr(module, "peft_config", {}).get(adapter_name)
        if config is None:
            raise ValueError(f"{comp} carries LoRA layers but no peft config named {adapter_name!r}; add adapters "
                             f"with `add_adapter` (or pass the adapter's name)")
        state = get_peft_model_state_dict(module, adapter_name=adapter_name)
        out[comp] = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
                     "config": config.to_dict()}
    return out or None


def svd_lora_state(
    base_pipe, new_tensors: Mapping[str, torch.Tensor], rank: int = 16
) -> tuple[dict[str, dict], float]:
    """Approximate a dense delta with LoRA factors by truncated SVD (lossy below full rank).

    Each 2-D `nn.Linear` weight in `new_tensors` whose value differs from the base becomes
    `B @ A ~= new - base` with `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T` (alpha = rank, so scale 1).
    Matrices whose rank is below `rank` are zero-padded, which is exact. Changed non-Linear tensors
    (biases, norms, convolutions, embedding rows) cannot be expressed and are dropped with a warning.

    Args:
        base_pipe: the base model the delta was trained from.
        new_tensors: `"<component>.<name>"` -> trained values (a delta file's tensors).
        rank: LoRA rank.

    Returns:
        (lora_state as in `lora_state_from_pipe`, overall relative Frobenius reconstruction error).

    Raises:
        ValueError: nothing in the delta is representable as LoRA.
    """
    from peft import LoraConfig

    comps = components(base_pipe)
    # alias -> (the model's own name, tensor): delta names may be spelled for another transformers version
    base_states = {comp: {alias(k): (k, v) for k, v in dense_state_dict(m).items()} for comp, m in comps.items()
                   if comp in TRAINABLE_COMPONENTS}
    per_comp: dict[str, dict[str, torch.Tensor]] = {}
    dropped, err2, norm2 = [], 0.0, 0.0
    for key, new in new_tensors.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        comp, _, name = key.partition(".")
        name, base = base_states.get(comp, {}).get(alias(name), (name, None))
        if key.endswith(ROWS_SUFFIX) or base is None:
            dropped.append(key)
            continue
        if tuple(base.shape) != tuple(new.shape):
            raise ValueError(f"{key}: delta shape {tuple(new.shape)} differs from the base's {tuple(base.shape)}; "
                             f"is --base the model this run was trained on?")
        delta = new.detach().to("cpu", torch.float64) - base.detach().to("cpu", torch.float64)
        norm = float(delta.norm())
        if norm == 0.0:
            continue  # untouched (the dense export path passes every weight)
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(comps[comp].get_submodule(module_name), nn.Linear):
            dropped.append(key)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        # Zero-pad to a uniform rank: exact, and one LoraConfig.r serves every matrix.
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        err2 += float((delta - b @ a).norm()) ** 2
        norm2 += norm**2
        state = per_comp.setdefault(comp, {})
        state[f"{module_name}.lora_A.weight"] = a.float().contiguous()
        state[f"{module_name}.lora_B.weight"] = b.float().contiguous()
    if dropped:
        logger.warning("LoRA export drops %d tensor(s) that are not Linear weights (lossy): %s", len(dropped),
                       dropped[:5])
    if not per_comp:
        raise ValueError("nothing in this delta can be expressed as LoRA (only Linear weights can); "
                         "export it as a pipeline instead")
    rel = (err2 / norm2) ** 0.5 if norm2 else 0.0
    logger.info("SVD LoRA export at rank %d: relative reconstruction error %.3g", rank, rel)
    out = {}
    for comp, state in per_comp.items():
        targets = sorted({k.split(".lora_")[0] for k in state})
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        out[comp] = {"state_dict": state, "config": config.to_dict()}
    return out, rel


# --------------------------------------------------------------------------------------------------
# kohya-ss layout (AUTOMATIC1111, ComfyUI)
# --------------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    # peft's own rule (`get_pattern_key`): a pattern matches a module name ending in it at a `.` boundary.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(default)


def lora_scale(config: Mapping | None, module: str) -> float:
    """The factor peft multiplies `B @ A` by for `module` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA)."""
    config = dict(config or {})
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def kohya_base_metadata(pipe) -> dict[str, str]:
    """kohya-ss's own base-model fields (`ss_v2`, `ss_base_model_version`) for a LoRA trained on `pipe`.

    AUTOMATIC1111 reads them to file a LoRA under SD1 / SD2 / SDXL and, by default, hides a LoRA of another
    version than the loaded checkpoint; without them every LoRA counts as SD1. The values are the ones kohya's
    trainers write (`model_util.get_model_version_str_for_sd1_sd2`: `sd_v1`, `sd_v2`, `sd_v2_v` for
    v-prediction; `sdxl_base_v1-0`; FLUX `flux1`, SD3 `sd3`). SD 2.x is told from SD 1.x by its UNet's linear
    transformer projections (`use_linear_projection`, true in every SD 2.x config and no SD 1.x one).
    """
    name = type(pipe).__name__
    denoiser = getattr(pipe, "unet", None)
    if "XL" in name:
        version, v2 = "sdxl_base_v1-0", False
    elif "Flux" in name:
        version, v2 = "flux1", False
    elif "3" in name and denoiser is None:  # StableDiffusion3Pipeline
        version, v2 = "sd3", False
    else:
        v2 = denoiser is not None and bool(denoiser.config.get("use_linear_projection"))
        v_pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction"
        version = "sd_v2" if v2 else "sd_v1"
        version += "_v" if v_pred else ""
    return {"ss_v2": str(v2), "ss_base_model_version": version}


def _kohya_prefix(comp: str, n_text_encoders: int) -> str:
    if comp == "unet":
        return "lora_unet"
    if comp == "text_encoder":
        # kohya/A1111 spell SD 1.x/2.x's encoder `lora_te`, SDXL's two `lora_te1` / `lora_te2`
        return "lora_te" if n_text_encoders < 2 else "lora_te1"
    if comp == "text_encoder_2":
        return "lora_te2"
    raise ValueError(f"no kohya LoRA prefix for component {comp!r}")


def kohya_state_dict(lora_state: Mapping[str, dict], text_encoders: int = 1) -> dict[str, torch.Tensor]:
    """Convert a `lora_state` to the kohya-ss key layout that AUTOMATIC1111 and ComfyUI load.

    Keys are `<prefix>_<module path with _>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`
    (a scalar; the tools multiply by `alpha / rank`, so alpha = scale * rank reproduces peft's scale).
    UNet module paths are diffusers' (what kohya's SD 1.x trainer uses and both tools map); text-encoder
    paths keep CLIP's `text_model.` level, which transformers 5 dropped from the module tree.

    diffusers' `convert_state_dict_to_kohya` does the renaming but sets every alpha to the rank (scale 1),
    which is wrong for `lora_alpha != r`, and writes SD 1.x's text encoder as `lora_te1`; hence this function.

    Args:
        lora_state: see the module docstring.
        text_encoders: how many text encoders the pipeline has (2 for SDXL: `lora_te1` / `lora_te2`).
    """
    n_te = 2 if "text_encoder_2" in lora_state else text_encoders
    out: dict[str, torch.Tensor] = {}
    for comp, entry in lora_state.items():
        prefix = _kohya_prefix(comp, n_te)
        for key, tensor in entry["state_dict"].items():
            module, _, leaf = key.partition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise ValueError(f"{comp}.{key}: only plain LoRA A/B weights convert to kohya (no DoRA, no bias)")
            path = module
            if comp.startswith("text_encoder") and not path.startswith("text_model."):
                path = f"text_model.{path}"
            name = f"{prefix}_{path.replace('.', '_')}"
            if leaf == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor.detach().cpu().float().contiguous()
                rank = tensor.shape[0]
                scale = lora_scale(entry.get("config"), module)
                out[f"{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
            else:
                out[f"{name}.lora_up.weight"] = tensor.detach().cpu().float().contiguous()
    return out


#: the text-stream projections of block i in diffusers' names (FLUX double-stream / SD3 joint blocks)
_TEXT_QKV = re.compile(r"^transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$")
#: the fused kohya module that holds them, as kohya-ss names it after the original checkpoints (BFL, Stability)
_FUSED_TEXT_QKV = {"flux": "lora_unet_double_blocks_{}_txt_attn_qkv",
                   "sd3": "lora_unet_joint_blocks_{}_context_block_attn_qkv"}


def kohya_fused_state_dict(lora_state: Mapping[str, dict], family: str) -> dict[str, torch.Tensor]:
    """An MMDiT's text-stream LoRA in kohya-ss's layout for FLUX (`family="flux"`) or SD3 / SD3.5 (`"sd3"`).

    The original checkpoints, and kohya after them, fuse each block's text q, k and v into one linear: FLUX's
    `double_blocks.<i>.txt_attn.qkv`, SD3's `joint_blocks.<i>.context_block.attn.qkv`; diffusers keeps
    `add_q_proj`, `add_k_proj`, `add_v_proj`. A LoRA on some of them becomes one LoRA of rank 3r on the fused
    module: `lora_down` stacks the parts' A (zeros for a part without LoRA), `lora_up` is block-diagonal in their
    B, so it changes exactly the parts that were trained. alpha is scale x 3r, as the tools scale by alpha / rank.
    ComfyUI maps `lora_unet_<original name with _>` onto the original weight for every model; diffusers'
    `_convert_kohya_flux_lora_to_diffusers` reads the FLUX form back (it has no SD3 kohya reader).

    Raises:
        ValueError: a LoRA module outside the blocks' text q/k/v (no exact fused form written here), or parts of
            one block with different ranks or scales.
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    entry = lora_state.get("transformer")
    others = sorted(set(lora_state) - {"transformer"})
    if others or entry is None:
        raise ValueError(f"kohya {family} export covers the transformer only, not {others}")
    modules = {key.partition(".lora_")[0] for key in entry["state_dict"]}
    for module in sorted(modules):
        match = _TEXT_QKV.match(module)
        if not match:
            raise ValueError(f"transformer.{module}: only the blocks' text q/k/v have a kohya {family} form here")
        a = entry["state_dict"][f"{module}.lora_A.weight"].detach().cpu().float()
        b = entry["state_dict"][f"{module}.lora_B.weight"].detach().cpu().float()
        blocks.setdefault(int(match[1]), {})[match[2]] = (a, b, lora_scale(entry.get("config"), module))
    for index, parts in sorted(blocks.items()):
        (a0, b0, scale), *_ = parts.values()
        rank, d_in, d_out = a0.shape[0], a0.shape[1], b0.shape[0]
        if any(a.shape[0] != rank or not math.isclose(sc, scale) for a, _, sc in parts.values()):
            raise ValueError(f"block {index}: its text q/k/v LoRAs differ in rank or scale")
        down = torch.zeros(3 * rank, d_in)
        up = torch.zeros(3 * d_out, 3 * rank)
        for slot, name in enumerate("qkv"):
            if name in parts:
                a, b, _ = parts[name]
                down[slot * rank:(slot + 1) * rank] = a
                up[slot * d_out:(slot + 1) * d_out, slot * rank:(slot + 1) * rank] = b
        key = _FUSED_TEXT_QKV[family].format(index)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * 3 * rank, dtype=torch.float32)
    return out
