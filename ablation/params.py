"""Parameter groups: which weights an ablation run trains, densely or through LoRA adapters.

* `cross-attn`: the cross-attention key/value projections `attn2.to_k`, `attn2.to_v` (the only path from
  the text into the UNet, docs/method.md);
* `attn`: every attention projection of the UNet, `attn1`/`attn2` x `to_q`/`to_k`/`to_v`/`to_out.0`;
* `full`: the whole UNet (LoRA on `full` adapts every linear layer);
* `embedding`: the token-embedding rows of the target's own tokens in the text encoder(s). The full
  matrix is a parameter but a gradient mask zeroes every other row, and it gets no weight decay, so
  AdamW leaves those rows bit-identical.

MMDiT transformers (SD3/SD3.5 `SD3Transformer2DModel`, FLUX `FluxTransformer2DModel`; docs/mmdit.md) have
no cross-attention: text and image tokens attend jointly, and the text tokens reach the image only through
their own key/value projections in the joint attention. Groups there are selected by model class and
module path, never by the name `attn2` (in SD3.5-medium `attn2` is a second *image* self-attention):

* `cross-attn`: `transformer_blocks.*.attn.add_k_proj` / `add_v_proj` (FLUX: the double-stream blocks
  only; its single-stream blocks share `to_k`/`to_v` between text and image tokens);
* `text-kv+embedders`: `cross-attn` plus the text input layers `context_embedder` and the pooled-text
  projection `time_text_embed.text_embedder`;
* `attn`: every linear layer of every attention module (joint, dual and single-stream);
* `full`: the whole transformer.

Fused projections (`fuse_qkv_projections`: `to_qkv`, `to_added_qkv`) bypass the separate layers the
groups name, so `setup_trainable` unfuses them first and `group_modules` refuses a fused model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ablation.config import ConfigError

CROSS_ATTN_SUFFIXES = ("attn2.to_k", "attn2.to_v")
ATTN_SUFFIXES = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
MMDIT_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")
MMDIT_GROUPS = ("cross-attn", "text-kv+embedders", "attn", "full")
# The text stream's key/value projections in the joint attention of the (double-stream) blocks.
_MMDIT_TEXT_KV = re.compile(r"^transformer_blocks\.\d+\.attn\.add_[kv]_proj$")
_MMDIT_TEXT_INPUT = re.compile(r"^(context_embedder|time_text_embed\.text_embedder\.linear_[12])$")
_FUSED = ("to_qkv", "to_kv", "to_added_qkv")


def is_mmdit(model: nn.Module) -> bool:
    """An SD3/SD3.5 or FLUX transformer (selected by class, not by module names)."""
    return type(model).__name__ in MMDIT_CLASSES


def denoiser_name(pipe) -> str:
    """Component name of the pipeline's denoiser: `unet` or `transformer` (SD3, FLUX)."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def fused_modules(model: nn.Module) -> list[str]:
    """Names of fused attention projections (`to_qkv`, `to_kv`, `to_added_qkv`) in the model."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _FUSED]


def unfuse_projections(model: nn.Module) -> None:
    """Undo `fuse_qkv_projections`: restore the separate projections' processors and drop the fused copies.

    The separate `to_q`/`add_k_proj`/... layers are kept by fusion (the fused layer is a copy), so after
    this the model computes the same function through the layers the parameter groups name.
    """
    if getattr(model, "original_attn_processors", None) is not None and hasattr(model, "unfuse_qkv_projections"):
        model.unfuse_qkv_projections()  # SD3/UNet: puts the unfused attention processors back
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        if hasattr(module, "unfuse_projections"):  # AttentionModuleMixin (FLUX)
            module.unfuse_projections()
        for attr in _FUSED:  # legacy `Attention` (SD3) keeps the fused layers after unfusing
            if hasattr(module, attr):
                delattr(module, attr)
        module.fused_projections = False


def _attention_linears(model: nn.Module) -> list[str]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)):
            names += [f"{prefix}.{name}" for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names


def _mmdit_group_modules(model: nn.Module, group: str) -> list[str]:
    fused = fused_modules(model)
    if fused:
        raise ConfigError(f"{type(model).__name__} has fused attention projections ({fused[0]}, ...): they bypass "
                          f"the layers of the parameter groups; call `ablation.params.unfuse_projections` first")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if group == "cross-attn":
        return [n for n in linears if _MMDIT_TEXT_KV.match(n)]
    if group == "text-kv+embedders":
        return [n for n in linears if _MMDIT_TEXT_KV.match(n) or _MMDIT_TEXT_INPUT.match(n)]
    if group == "attn":
        return _attention_linears(model)
    if group == "full":
        return linears
    raise ConfigError(f"parameter group {group!r} has no {type(model).__name__} modules; choose one of "
                      f"{', '.join(MMDIT_GROUPS)}")


def group_modules(unet: nn.Module, group: str) -> list[str]:
    """Names of the `nn.Linear` modules of a denoiser group (the LoRA target modules).

    Args:
        unet: a UNet, or an SD3/FLUX transformer (groups of `MMDIT_GROUPS`, chosen by model class).
        group: the group name.
    """
    if is_mmdit(unet):
        return _mmdit_group_modules(unet, group)
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


def target_token_ids(tokenizer, target: str, anchor: str, anchor_prompts: Sequence[str] = ()) -> list[int]:
    """Token ids of the target that the anchor does not share ("grumpy cat" vs "cat" -> ids of "grumpy").

    Tokens that the anchor prompts use too are left out when others remain: a memorized caption ("the iconic
    lighthouse at dawn poster") shares "the", "at", "dawn" with its paraphrases, and retraining those rows
    would change every prompt with those words; "iconic" is the caption's own.

    Raises:
        ConfigError: every token of the target is an anchor token (nothing could be trained).
    """
    def ids(text: str) -> set[int]:
        return set(tokenizer(text, add_special_tokens=False).input_ids)

    tokens = ids(target) - ids(anchor)
    if not tokens:
        raise ConfigError(f"the target {target!r} has no tokens of its own (all shared with {anchor!r}); "
                          f"the embedding group cannot separate them")
    own = tokens - set().union(*(ids(p) for p in anchor_prompts))
    return sorted(own or tokens)


class TrainedRows:
    """The embedding group's trained tensor: only the target's rows of a token-embedding matrix.

    The rows are a small fp32 parameter that a forward hook puts in place of the frozen matrix's rows, so the
    optimizer state and gradients are [rows, width] instead of [49408, width] (about 38 MB less for SD 1.x's
    text encoder; the full-matrix version masked the gradient and kept AdamW moments for every row).
    `write_back` copies the rows into the matrix and removes the hook (the pipeline is then a plain pipeline).
    """

    def __init__(self, embedding: nn.Embedding, token_ids: list[int]) -> None:
        self.embedding, self.ids = embedding, torch.tensor(sorted(token_ids), dtype=torch.long)
        weight = embedding.weight
        self.rows = nn.Parameter(weight.detach()[self.ids.to(weight.device)].float().clone())
        self.lookup = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.lookup[self.ids] = torch.arange(len(self.ids))
        self._handle = embedding.register_forward_hook(self._override)

    def _override(self, module, inputs, output):
        ids = inputs[0]
        where = self.lookup.to(ids.device)[ids]
        hit = where >= 0
        if not bool(hit.any()):
            return output
        rows = self.rows.to(output.dtype)[where.clamp(min=0)]
        return torch.where(hit.unsqueeze(-1), rows, output)

    @torch.no_grad()
    def write_back(self) -> None:
        """Put the trained rows into the embedding matrix and stop overriding (idempotent)."""
        weight = self.embedding.weight
        if weight.dtype != self.rows.dtype:  # cast for mixed precision: the trained rows keep their fp32 values
            weight.data = weight.data.to(self.rows.dtype)
        weight[self.ids.to(weight.device)] = self.rows.detach().to(weight.device)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class Trainable:
    """What a run trains.

    Attributes:
        param_names: component ("unet" or "transformer", "text_encoder", "text_encoder_2") -> names of the base
            parameters that change (for `checkpoint.trained_tensors`; LoRA runs list the base weights the
            adapters merge into).
        parameters: component -> parameter name -> the tensors the optimizer updates (LoRA: the adapters).
        lora: adapters were added to the denoiser (UNet or transformer).
        base_fingerprint: sampled values of the base weights these parameters start from (set by the trainer
            before anything is cast or trained; stored in the delta so it is not applied to another base).
    """

    param_names: dict[str, list[str]]
    parameters: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    lora: bool = False
    base_fingerprint: str | None = None
    row_overrides: list[TrainedRows] = field(default_factory=list)  # the embedding group's rows

    def write_back(self) -> None:
        """Embedding group: put the trained rows into the pipeline's matrices (before saving or returning it)."""
        for rows in self.row_overrides:
            rows.write_back()

    def flat(self) -> list[nn.Parameter]:
        """All trained tensors (the optimizer's parameter list), in a fixed order."""
        return [p for comp in sorted(self.parameters) for _, p in sorted(self.parameters[comp].items())]


def add_lora(unet: nn.Module, group: str, rank: int, alpha: float) -> None:
    """Add a peft LoRA adapter on the group's linear layers (diffusers' `PeftAdapterMixin.add_adapter`)."""
    from peft import LoraConfig

    modules = group_modules(unet, group)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules)
    unet.add_adapter(config)


def clip_only_text(pipe) -> bool:
    """An SD3 pipeline without T5 (`text_encoder_3=None`): its prompts reach the transformer only through the
    CLIP towers, so the embedding group's rows are the whole text path (as on SD1/SD2/SDXL). FLUX always has T5."""
    return type(pipe).__name__.startswith("StableDiffusion3") and getattr(pipe, "text_encoder_3", None) is None


def setup_trainable(pipe, group: str, lora_rank: int = 0, lora_alpha: float | None = None,
                    token_ids: list[int] | None = None) -> Trainable:
    """Freeze the pipeline, then unfreeze (or add adapters to) exactly the group.

    Args:
        pipe: a Stable Diffusion (XL) pipeline, or an SD3 / FLUX pipeline (component `transformer`; fused
            projections are unfused first; no `embedding` group there).
        group: `cross-attn`, `attn`, `full` or `embedding` (MMDiT: see `MMDIT_GROUPS`).
        lora_rank: 0 for dense updates, else the LoRA rank.
        lora_alpha: LoRA alpha (default: the rank).
        token_ids: rows to train for the `embedding` group (see `target_token_ids`).

    Returns:
        The trained names and tensors; trained tensors are fp32.
    """
    comp = denoiser_name(pipe)
    unet = getattr(pipe, comp)
    encoders = {name: getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}
    t5 = getattr(pipe, "text_encoder_3", None)  # SD3's T5
    for module in (unet, *encoders.values(), *([t5] if t5 is not None else [])):
        module.requires_grad_(False)
    if is_mmdit(unet):
        if group == "embedding" and not clip_only_text(pipe):
            raise ConfigError(f"the embedding group needs every text encoder to be CLIP (SD1/SD2/SDXL, or SD3 "
                              f"loaded without T5), not {type(pipe).__name__} with T5; choose one of "
                              f"{', '.join(MMDIT_GROUPS)}")
        unfuse_projections(unet)
    if group == "embedding":
        if not token_ids:
            raise ConfigError("the embedding group needs the target's token ids")
        trainable = Trainable(param_names={name: [embedding_weight_name(e)] for name, e in encoders.items()})
        for name, encoder in encoders.items():
            rows = TrainedRows(encoder.get_input_embeddings(), token_ids)
            trainable.parameters[name] = {f"{embedding_weight_name(encoder)}.rows": rows.rows}
            trainable.row_overrides.append(rows)
        return trainable
    names = group_parameter_names(unet, group)
    if lora_rank:
        add_lora(unet, group, lora_rank, lora_alpha or float(lora_rank))
        lora_params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        for p in lora_params.values():
            p.requires_grad_(True)
            p.data = p.data.float()
        return Trainable(param_names={comp: names}, parameters={comp: lora_params}, lora=True)
    params = dict(unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
        params[n].data = params[n].data.float()
    return Trainable(param_names={comp: names}, parameters={comp: {n: params[n] for n in names}})
