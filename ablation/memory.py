"""The memory plan of a run, before any weight is loaded: peak accelerator memory by part.

`ablate train --plan` prints it; every run logs its total; `--max-memory GB` refuses a run whose plan exceeds
it, in one line naming the options that would fit. The plan builds the model's components from their config
files on the `meta` device (no memory, no weights) and:

* counts parameters exactly: frozen weights in the training dtype, trained tensors, their gradients and AdamW
  states in fp32 (8-bit Adam: 2 bytes per parameter), the dense `frozen` teacher's fp32 copy of the trained group;
* runs one training step *symbolically* on the meta device (the family's adapter `predict`, the teacher's
  no-grad pass, then the student's pass over the ablation + prior halves and its backward), with or without
  gradient checkpointing, while `LiveBytes` follows every tensor the step creates and frees: the peak of those
  bytes is the step's activation memory, as the accelerator's allocator would hold it;
* the same for the anchor sampler's no-grad passes (classifier-free guidance doubles the batch);
* takes the larger of the two phases. Text encoders leave the accelerator once prompts are encoded (the trainer
  does this unless the embedding group or the prefix adversary needs them), the VAE once anchors are latents.

Not counted: the CUDA context and kernels' workspaces (about 0.3-0.6 GB), allocator fragmentation. PyTorch
offers no planner for this (`torch.cuda.memory` measures a run, it does not predict one), hence this module.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from ablation.config import PRECISIONS

GB = 1024**3
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # no activation of a run is float8


class LiveBytes(TorchDispatchMode):
    """Follows the storages of tensors created inside the mode: `live` bytes now, `peak` the maximum.

    Storages of the given modules' parameters and buffers exist before and are not counted (a view of a weight,
    e.g. its transpose in a linear layer, allocates nothing). Works on real devices and on `meta`.
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._kept = [t.untyped_storage() for m in modules for t in [*m.parameters(), *m.buffers()]]
        self._preexisting = {id(s) for s in self._kept}

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.dtype in FLOAT8:  # --fp8-base re-stores each frozen weight after its layer ran: counted as weights
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen or key in self._preexisting:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


@dataclass
class MemoryPlan:
    """Estimated peak accelerator memory (bytes) of one training process, by part."""

    train: dict[str, int]  # part -> bytes during the training steps
    anchors: dict[str, int]  # part -> bytes while anchors are sampled
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    encoding: dict[str, int] = field(default_factory=dict)  # part -> bytes while offloaded text encoders encode

    @property
    def train_total(self) -> int:
        return sum(self.train.values())

    @property
    def anchors_total(self) -> int:
        return sum(self.anchors.values())

    @property
    def peak(self) -> int:
        return max(self.train_total, self.anchors_total, sum(self.encoding.values()))

    def to_dict(self) -> dict:
        out = {"peak_gb": round(self.peak / GB, 3), "train_gb": {k: round(v / GB, 3) for k, v in self.train.items()},
               "anchors_gb": {k: round(v / GB, 3) for k, v in self.anchors.items()}, "notes": self.notes,
               "settings": self.settings}
        if self.encoding:
            out["encoding_gb"] = {k: round(v / GB, 3) for k, v in self.encoding.items()}
        return out

    def table(self) -> str:
        """The plan as printed by `ablate train --plan`."""
        rows = [f"memory plan ({', '.join(f'{k} {v}' for k, v in self.settings.items())}):",
                f"  training steps: {self.train_total / GB:.2f} GB"]
        rows += [f"    {k:<34} {v / GB:8.2f} GB" for k, v in self.train.items()]
        rows += [f"  anchor sampling: {self.anchors_total / GB:.2f} GB"]
        rows += [f"    {k:<34} {v / GB:8.2f} GB" for k, v in self.anchors.items()]
        if self.encoding:
            rows += [f"  prompt encoding (denoiser in CPU memory): {sum(self.encoding.values()) / GB:.2f} GB"]
            rows += [f"    {k:<34} {v / GB:8.2f} GB" for k, v in self.encoding.items()]
        rows += [f"  peak: {self.peak / GB:.2f} GB (CUDA context and workspaces not included)"]
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# the model on the meta device
# --------------------------------------------------------------------------------------------------


def meta_components(model_path: str | Path, device: str = "meta") -> tuple[str, dict[str, torch.nn.Module], dict]:
    """(pipeline class name, component -> module on `device` (random weights unless `meta`), tokenizer lengths) of
    a diffusers folder."""
    import diffusers
    import transformers

    root = Path(model_path)
    index = json.loads((root / "model_index.json").read_text())
    modules: dict[str, torch.nn.Module] = {}
    lengths: dict[str, int] = {}
    for name, spec in index.items():
        if not isinstance(spec, list) or spec[0] is None or not (root / name).is_dir():
            continue
        library, cls_name = spec
        if name.startswith("tokenizer"):
            config = root / name / "tokenizer_config.json"
            if config.is_file():
                lengths[name] = int(json.loads(config.read_text()).get("model_max_length", 77))
            continue
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name, None)
        if cls is None:
            continue
        with torch.device(device):
            if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
                modules[name] = cls.from_config(cls.load_config(root / name))
            elif isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                modules[name] = cls._from_config(cls.config_class.from_pretrained(root / name))
    return index["_class_name"], modules, lengths


def _bytes(params, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in params) * dtype.itemsize


def _inputs(family: str, denoiser, batch: int, resolution: int, text_len: int, dtype, vae_factor: int):
    """(noisy latents, timesteps, Conditioning) of a batch, on the denoiser's device, as `predict` takes them."""
    from ablation.architectures import Conditioning

    cfg = denoiser.config
    side = resolution // vae_factor
    device = next(denoiser.parameters()).device
    meta = {"device": device, "dtype": dtype}
    noisy = torch.empty(batch, cfg.in_channels if family == "unet" else cfg.in_channels // (4 if family.startswith(
        "flux") else 1), side, side, **meta)
    timesteps = torch.zeros(batch, device=device, dtype=torch.float32 if family != "unet" else torch.long)
    if family == "unet":
        embeds = torch.empty(batch, text_len, cfg.cross_attention_dim, **meta)
        pooled = None
        if cfg.addition_embed_type == "text_time":  # SDXL
            pooled = torch.empty(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                 **meta)
        return noisy, timesteps, Conditioning(embeds, pooled)
    embeds = torch.empty(batch, text_len, cfg.joint_attention_dim, **meta)
    pooled = torch.empty(batch, cfg.pooled_projection_dim, **meta)
    text_ids = torch.zeros(text_len, 3, device=device, dtype=dtype) if family.startswith("flux") else None
    return noisy, timesteps, Conditioning(embeds, pooled, text_ids)


class _FlashAttention(torch.autograd.Function):
    """What fused attention (flash / memory-efficient SDPA, the default on CUDA and CPU for these shapes) holds: the
    output and a float32 log-sum-exp per query, never the L x L score matrix that the meta device's math
    fallback would materialise (gigabytes at 1024 px)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashAttention.apply(query, key, value)


def _step_peak(run: Callable[[], None], *modules: torch.nn.Module) -> int:
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    if next(modules[0].parameters()).device.type == "meta":  # a real device runs its own fused kernels
        F.scaled_dot_product_attention = _fused_sdpa  # diffusers' attention processors call it through F
    try:
        with LiveBytes(*modules) as tracker:
            run()
    finally:
        F.scaled_dot_product_attention = sdpa
    return tracker.peak


@dataclass
class PlanSettings:
    """What the plan depends on (the resolved `TrainConfig` fields, and where the run's tensors live)."""

    params: str
    lora_rank: int
    batch_size: int
    prior_preservation: bool
    resolution: int
    mixed_precision: str
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    teacher: str = "frozen"
    variant: str = "model-based"
    anchor_batch_size: int = 16
    generates_anchors: bool = True
    keeps_text_encoders: bool = False  # embedding group or the prefix adversary
    offload: bool = True  # False on the CPU: "offloading" moves nothing out of the one memory there
    offload_text_encoders: bool = False  # in CPU memory from the start (ablation.placement)
    fp8_base: bool = False

    @classmethod
    def from_config(cls, config, device_type: str = "cuda") -> PlanSettings:
        keeps = config.params == "embedding" or (config.robust and config.robust_adversary in ("prefix", "shifted"))
        return cls(params=config.params, lora_rank=config.lora_rank, batch_size=config.train_batch_size,
                   prior_preservation=config.prior_preservation, resolution=config.resolution,
                   mixed_precision=config.mixed_precision, gradient_checkpointing=config.gradient_checkpointing,
                   use_8bit_adam=config.use_8bit_adam, teacher=config.teacher, variant=config.variant,
                   anchor_batch_size=config.anchor_batch_size,
                   generates_anchors=not (config.anchor_images or config.retrieval), keeps_text_encoders=keeps,
                   offload=device_type != "cpu", offload_text_encoders=config.offload_text_encoders,
                   fp8_base=config.fp8_base)


def plan_memory(model_path: str | Path, settings: PlanSettings, family: str, vae_factor: int = 8,
                device: str = "meta") -> MemoryPlan:
    """The memory plan of a run on the diffusers folder `model_path` (see the module docstring).

    `device="cpu"` runs the same steps for real on random weights: how the tests check the symbolic run."""
    from ablation.architectures import FluxArchitecture, SD3Architecture, UNetArchitecture
    from ablation.models import store_in_fp8, torch_dtype
    from ablation.params import add_lora, group_parameter_names

    dtype = torch_dtype(settings.mixed_precision)
    _, modules, lengths = meta_components(model_path, device)
    name = "unet" if "unet" in modules else "transformer"
    denoiser = modules[name]
    for p in denoiser.parameters():  # not ModelMixin.to, which warns about fp32-kept modules on every cast
        p.data = p.data.to(dtype)
    if settings.fp8_base:  # as the trainer does it: before LoRA, the trained group's modules left as they are
        store_in_fp8(denoiser, settings.params, dtype)
    if family == "unet":
        adapter, text_len = UNetArchitecture(vae_factor), lengths.get("tokenizer", 77)
    elif family == "sd3":
        t5 = lengths.get("tokenizer_3") if "text_encoder_3" in modules else None
        adapter = SD3Architecture(256)
        text_len = lengths.get("tokenizer", 77) + (256 if t5 else 0)
    else:
        guided = bool(denoiser.config.get("guidance_embeds"))
        text_len = 512 if guided else 256
        adapter = FluxArchitecture(text_len, guidance_embeds=guided)
    notes: list[str] = []
    trained: list[torch.nn.Parameter] = []
    if settings.params == "embedding":
        encoders = [m for n, m in modules.items() if n in TEXT_ENCODERS and hasattr(m, "get_input_embeddings")]
        trained_count = 8 * sum(m.get_input_embeddings().embedding_dim for m in encoders)  # a few token rows
        denoiser.requires_grad_(False)
    else:
        denoiser.requires_grad_(False)
        if settings.lora_rank:
            add_lora(denoiser, settings.params, settings.lora_rank, float(settings.lora_rank))
            trained = [p for n, p in denoiser.named_parameters() if "lora_" in n]
        else:
            names = set(group_parameter_names(denoiser, settings.params))
            trained = [p for n, p in denoiser.named_parameters() if n in names]
        for p in trained:
            p.data = p.data.float()
            p.requires_grad_(True)
        trained_count = sum(p.numel() for p in trained)
    frozen_denoiser = sum(p.numel() * p.element_size() for p in denoiser.parameters() if not p.requires_grad)
    text_bytes = _bytes([p for n, m in modules.items() if n in TEXT_ENCODERS for p in m.parameters()], dtype)
    vae_bytes = _bytes(modules["vae"].parameters(), dtype) if "vae" in modules else 0
    dense_teacher = (settings.variant == "model-based" and settings.teacher == "frozen" and not settings.lora_rank
                     and settings.params != "embedding")
    adam = 2 if settings.use_8bit_adam else 8

    if settings.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    rows = settings.batch_size * (2 if settings.prior_preservation else 1)

    def training_step() -> None:
        with torch.no_grad():  # the teacher's prediction first (model-based)
            noisy, t, cond = _inputs(family, denoiser, settings.batch_size, settings.resolution, text_len, dtype,
                                     vae_factor)
            teacher = adapter.predict(denoiser, noisy, t, cond) if settings.variant == "model-based" else None
        noisy, t, cond = _inputs(family, denoiser, rows, settings.resolution, text_len, dtype, vae_factor)
        if settings.params == "embedding":  # the gradient reaches the token rows through the denoiser
            cond.embeds.requires_grad_(True)
        out = adapter.predict(denoiser, noisy, t, cond)
        loss = out.float().pow(2).mean() if teacher is None else (out[: len(teacher)].float() - teacher.float()
                                                                  ).pow(2).mean()
        loss.backward()

    step = _step_peak(training_step, denoiser)
    grads = 4 * trained_count
    # the step's peak holds the denoiser's gradients (created inside it); the embedding group's are the states'
    activations = max(step - (grads if settings.params != "embedding" else 0), 0)
    train = {"frozen denoiser weights": frozen_denoiser, "trained tensors (fp32)": 4 * trained_count,
             "gradients (fp32)": grads, f"optimizer states ({'8-bit Adam' if adam == 2 else 'AdamW, fp32'})":
             adam * trained_count, "teacher copy (fp32)": 4 * trained_count if dense_teacher else 0,
             "activations" + (" (gradient checkpointing)" if settings.gradient_checkpointing else ""): activations}
    if settings.keeps_text_encoders or not settings.offload:
        train["text encoders"] = text_bytes
    elif settings.offload_text_encoders:
        notes.append(f"text encoders ({text_bytes / GB:.2f} GB) visit the accelerator only to encode, the denoiser "
                     f"then in CPU memory (encoders' activations not counted)")
    else:
        notes.append(f"text encoders ({text_bytes / GB:.2f} GB) leave the accelerator after prompt encoding")
    if settings.fp8_base:
        notes.append("frozen denoiser weights in float8, upcast layer by layer"
                     + ("" if settings.gradient_checkpointing else "; without gradient checkpointing autograd keeps "
                        "every upcast layer for the backward pass (counted in the activations)"))
    if not settings.offload:
        train["VAE"] = vae_bytes

    anchors: dict[str, int] = {}
    offloaded = settings.offload_text_encoders and settings.offload
    if settings.generates_anchors:
        denoiser.eval()

        guided = 1 if family.startswith("flux") else 2  # FLUX is guidance-distilled: one pass per step

        def sampler_step() -> None:
            with torch.no_grad():
                noisy, t, cond = _inputs(family, denoiser, guided * settings.anchor_batch_size, settings.resolution,
                                         text_len, dtype, vae_factor)
                adapter.predict(denoiser, noisy, t, cond)

        base = sum(p.numel() * p.element_size() for n, p in denoiser.named_parameters() if "lora_" not in n)
        anchors = {"denoiser weights": base, "text encoders": 0 if offloaded else text_bytes,
                   "VAE": vae_bytes,
                   f"sampler activations (batch {settings.anchor_batch_size}"
                   + (" x 2 for guidance)" if guided == 2 else ")"):
                       _step_peak(sampler_step, denoiser)}
    encoding = {"text encoders": text_bytes, "VAE": vae_bytes} if offloaded else {}
    return MemoryPlan(train=train, anchors=anchors, notes=notes, encoding=encoding, settings={
        "dtype": PRECISIONS[settings.mixed_precision], "group": settings.params,
        "LoRA rank": settings.lora_rank, "batch": rows, "resolution": settings.resolution,
        "checkpointing": settings.gradient_checkpointing, "8-bit Adam": settings.use_8bit_adam,
        **({"text encoders offloaded": True} if offloaded else {}),
        **({"fp8 base": True} if settings.fp8_base else {})})


#: options tried, in this order, when a plan exceeds `--max-memory` (the first set that fits is named)
FITTING_OPTIONS: list[dict[str, Any]] = [
    {"gradient_checkpointing": True},
    {"lora_rank": 16},
    {"lora_rank": 16, "gradient_checkpointing": True},
    {"lora_rank": 16, "gradient_checkpointing": True, "use_8bit_adam": True},
    {"lora_rank": 16, "gradient_checkpointing": True, "use_8bit_adam": True, "anchor_batch_size": 1},
    {"lora_rank": 16, "gradient_checkpointing": True, "use_8bit_adam": True, "anchor_batch_size": 1,
     "batch_size": 1},
    {"lora_rank": 16, "gradient_checkpointing": True, "use_8bit_adam": True, "anchor_batch_size": 1,
     "batch_size": 1, "offload_text_encoders": True},
    {"lora_rank": 16, "gradient_checkpointing": True, "use_8bit_adam": True, "anchor_batch_size": 1,
     "batch_size": 1, "offload_text_encoders": True, "fp8_base": True},
]
FLAG_NAMES = {"gradient_checkpointing": "--gradient-checkpointing", "lora_rank": "--lora-rank 16",
              "use_8bit_adam": "--use-8bit-adam", "anchor_batch_size": "--anchor-batch-size 1",
              "batch_size": "--train-batch-size 1", "offload_text_encoders": "--offload-text-encoders",
              "fp8_base": "--fp8-base"}


def fitting_flags(model_path, settings: PlanSettings, family: str, limit_gb: float, vae_factor: int = 8
                  ) -> tuple[list[str], MemoryPlan] | None:
    """The first option set of `FITTING_OPTIONS` (not already set) whose plan fits `limit_gb`, or None."""
    import dataclasses

    for option in FITTING_OPTIONS:
        changed = {k: v for k, v in option.items() if getattr(settings, k) != v}
        if not changed or (settings.params == "embedding" and "lora_rank" in changed) or (
                settings.keeps_text_encoders and "offload_text_encoders" in changed) or (
                family == "unet" and "fp8_base" in changed):
            continue
        plan = plan_memory(model_path, dataclasses.replace(settings, **changed), family, vae_factor)
        if plan.peak <= limit_gb * GB:
            return [FLAG_NAMES[k] for k in changed], plan
    return None
