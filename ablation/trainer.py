"""The one training loop (CPU, one GPU, multi-GPU DDP: accelerate decides).

`plan_run` checks everything a run needs without loading weights (bad input fails in seconds);
`train` then loads the pipeline, prepares anchor data and prompt embeddings once, and optimises the
chosen parameter group. Randomness inside the loop (batch indices, flips, timesteps, noise) comes from
a generator seeded per micro-step from (seed, micro-step, rank), so a resumed run replays exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablation import losses
from ablation.concepts import Concept, needs_prior_preservation, resolve_concepts
from ablation.config import ConfigError, TrainConfig, resolve_defaults, training_hash
from ablation.data import PromptEmbeddings, encode_prompts, sdxl_time_ids

STATE_FILE = "ablation_state.json"  # written last into a checkpoint: marks it complete
TRAINED_FILE = "trained.safetensors"
OUTPUT_ARTEFACTS = ("checkpoints", "delta.safetensors", "pipeline", "lora", "logs", "debug", "config.yaml")


class TrainingError(RuntimeError):
    """The run failed after it started (e.g. a non-finite loss); no delta was written."""


# --------------------------------------------------------------------------------------------------
# planning: every check that needs no weights
# --------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """A checked run: resolved config and concepts, model location, output and resume directories."""

    config: TrainConfig
    concepts: list[Concept]
    model_path: str
    toy: bool
    output_dir: Path
    resume_dir: Path | None
    config_hash: str


def _read_model_configs(model_path: str) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        vae = AutoencoderKL.load_config(model_path, subfolder="vae")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the UNet/VAE config of model {model_path!r}: {e}") from None
    return unet, vae


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a state file) under `output_dir/checkpoints`, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def read_checkpoint_state(path: Path) -> dict:
    """The ablation state of a checkpoint: step, config hash, number of processes."""
    state_file = Path(path) / STATE_FILE
    if not state_file.exists():
        raise ConfigError(f"{path} is not a complete ablation checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def plan_run(config: TrainConfig) -> RunPlan:
    """Check a configuration against the model's config files, the prompt sources and the output directory.

    Raises:
        ConfigError: any bad input (see `ablation.config.ConfigError`), before weights are loaded.
    """
    from ablation.data import check_image_source
    from ablation.models import is_toy, resolve_model

    try:
        model_path = resolve_model(config.model)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    toy = is_toy(config.model)
    unet_config, vae_config = _read_model_configs(model_path)
    if unet_config.get("in_channels", 4) != 4:
        raise ConfigError(f"model {config.model!r} has a {unet_config['in_channels']}-channel UNet (inpainting or "
                          f"upscaling); ablate a text-to-image model and apply the delta to it")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    concepts = resolve_concepts(config.concept_specs(), toy)
    resolved = resolve_defaults(
        config, toy=toy, concept_types=[c.concept_type for c in concepts],
        prior_preservation=any(needs_prior_preservation(c) for c in concepts),
        native_resolution=unet_config["sample_size"] * vae_factor, vae_scale_factor=vae_factor)
    check_image_source(resolved.anchor_images, resolved.retrieval)
    if resolved.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes")
    out = Path(resolved.output_dir or Path("outputs") / "-".join(_slug(c.target) for c in concepts)).expanduser()
    resolved.output_dir = str(out)
    config_hash = training_hash(resolved)
    resume_dir = None
    if resolved.resume_from_checkpoint:
        if resolved.resume_from_checkpoint == "latest":
            found = list_checkpoints(out)
            resume_dir = found[-1] if found else None
        else:
            resume_dir = Path(resolved.resume_from_checkpoint).expanduser()
            if not resume_dir.is_dir():
                raise ConfigError(f"--resume-from-checkpoint {str(resume_dir)!r} does not exist")
        if resume_dir is not None:
            state = read_checkpoint_state(resume_dir)
            if state["config_hash"] != config_hash:
                raise ConfigError(f"checkpoint {resume_dir} was made with another training configuration "
                                  f"(hash {state['config_hash']} != {config_hash}); resume with the same options "
                                  f"or start a new --output-dir")
    if out.exists() and any(out.iterdir()) and not resolved.overwrite and resume_dir is None:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace its results "
                          f"or --resume-from-checkpoint latest to continue")
    return RunPlan(resolved, concepts, model_path, toy, out, resume_dir, config_hash)


# --------------------------------------------------------------------------------------------------
# data of a run
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Anchor latents of all concepts, with the rows of their anchor and target prompts in `prompts`."""

    latents: torch.Tensor
    anchor_rows: torch.Tensor
    target_rows: torch.Tensor
    prompts: list[str]
    embeddings: PromptEmbeddings | None = None


@dataclass
class Batch:
    """One micro-batch on the device."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # regression target (eps or v) of the clean latents
    anchor_cond: PromptEmbeddings
    target_cond: PromptEmbeddings


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of a micro-step's generator: independent streams per (seed, step, rank), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_fingerprint(model_id: str, model_path: str, pipe) -> str:
    """Identity of the base weights for the anchor cache: id, UNet config and the UNet files' size and mtime.

    The mtime makes a retrained model (same id and config) miss the cache.
    """
    from ablation.checkpoint import pipeline_config_hash

    parts = [model_id, pipeline_config_hash(pipe)[:16]]
    unet_dir = Path(model_path) / "unet"
    if unet_dir.is_dir():
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(unet_dir.iterdir())]
    return "|".join(parts)


def prepare_data(plan: RunPlan, pipe, accelerator) -> tuple[TrainingData, int]:
    """Anchor latents per concept (cached generation, image folder or retrieval) and the prompt table.

    Returns:
        The data and how many anchor images this call generated (0 on a cache hit).
    """
    from ablation import data

    cfg = plan.config
    fingerprint = model_fingerprint(cfg.model, plan.model_path, pipe)
    latents, anchor_rows, target_rows, prompts, generated = [], [], [], [], 0
    for i, concept in enumerate(plan.concepts):
        if cfg.variant == "image-based" and (cfg.anchor_images or cfg.retrieval):
            source = cfg.anchor_images
            if cfg.retrieval:
                source = plan.output_dir / "retrieved" / f"{i}-{_slug(concept.anchor)}"
                if accelerator.is_main_process and not source.exists():
                    data.retrieve_images(concept.anchor, cfg.num_anchor_images, source)
                accelerator.wait_for_everyone()
            anchors = data.image_anchor_latents(pipe.vae, source, len(concept.anchor_prompts), cfg.num_anchor_images,
                                                cfg.resolution, cfg.seed)
        else:
            settings = data.SamplerSettings(fingerprint, concept.anchor_prompts, cfg.anchor_scheduler,
                                            cfg.anchor_steps, cfg.anchor_guidance, cfg.resolution,
                                            cfg.num_anchor_images, cfg.seed)
            anchors = data.cached_anchor_latents(pipe, settings, cfg.cache_dir, cfg.anchor_batch_size,
                                                 autocast=accelerator.autocast)
            generated += cfg.num_anchor_images if anchors.generated else 0
        offset = len(prompts)
        prompts += list(concept.anchor_prompts) + list(concept.target_prompts)
        latents.append(anchors.latents)
        anchor_rows.append(offset + anchors.prompt_index)
        target_rows.append(offset + len(concept.anchor_prompts) + anchors.prompt_index)
    training = TrainingData(torch.cat(latents), torch.cat(anchor_rows), torch.cat(target_rows), prompts)
    return training, generated


# --------------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------------


class Objective:
    """Draws micro-batches and computes the ablation loss (see `ablation.losses` for the equations)."""

    def __init__(self, cfg: TrainConfig, pipe, data: TrainingData, noise_scheduler, unet, device, rank: int,
                 teacher_params: dict[str, torch.Tensor] | None = None):
        self.cfg, self.pipe, self.data, self.scheduler = cfg, pipe, data, noise_scheduler
        self.unet, self.device, self.rank = unet, device, rank
        self.base_unet = _unwrap(unet)
        self.teacher_params = teacher_params
        self.lora = getattr(self.base_unet, "_hf_peft_config_loaded", False)
        self.train_text = cfg.params == "embedding"

    def batch(self, micro_step: int, batch_size: int | None = None, seed_rank: int | None = None) -> Batch:
        """The micro-batch of a micro-step (a pure function of seed, step and rank)."""
        bsz = batch_size or self.cfg.train_batch_size
        rank = self.rank if seed_rank is None else seed_rank
        g = torch.Generator().manual_seed(micro_step_seed(self.cfg.seed, micro_step, rank))
        idx = torch.randint(0, len(self.data.latents), (bsz,), generator=g)
        latents = self.data.latents[idx]
        flips = torch.rand(bsz, generator=g) < 0.5
        if self.cfg.hflip:  # flipping latents ~ flipping images: the SD autoencoder is convolutional
            latents = torch.where(flips[:, None, None, None], latents.flip(-1), latents)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), generator=g)
        latents, noise, t = latents.to(self.device), noise.to(self.device), t.to(self.device)
        target_rows = self.data.target_rows[idx]
        if self.train_text:  # the trained embedding rows must be in the graph: encode now
            target_cond = encode_prompts(self.pipe, [self.data.prompts[i] for i in target_rows], self.device)
        else:
            target_cond = self.data.embeddings.select(target_rows)
        return Batch(noisy=self.scheduler.add_noise(latents, noise, t), timesteps=t,
                     target=losses.regression_target(self.scheduler, latents, noise, t),
                     anchor_cond=self.data.embeddings.select(self.data.anchor_rows[idx]), target_cond=target_cond)

    def predict(self, unet, noisy, t, cond: PromptEmbeddings) -> torch.Tensor:
        """eps_theta(z_t, t, c) (or v) for a batch."""
        kwargs = {}
        if cond.pooled is not None:  # SDXL: pooled text embeddings and size/crop ids
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(self.cfg.resolution, noisy.shape[0], noisy.device, cond.pooled.dtype)}
        return unet(noisy, t, cond.embeds, return_dict=False, **kwargs)[0]

    @torch.no_grad()
    def teacher(self, batch: Batch) -> torch.Tensor:
        """sg[eps_theta(z_t, t, c)]: the model itself (`same`) or the pretrained weights (`frozen`)."""
        # The UNet is not trained in the embedding group, and anchor embeddings are computed once from
        # the original encoder, so there `same` and `frozen` are one and the same teacher.
        if self.cfg.teacher == "same" or self.train_text:
            return self.predict(self.base_unet, batch.noisy, batch.timesteps, batch.anchor_cond)
        if self.lora:  # adapters off = the pretrained model, at no memory cost
            self.base_unet.disable_adapters()
            try:
                return self.predict(self.base_unet, batch.noisy, batch.timesteps, batch.anchor_cond)
            finally:
                self.base_unet.enable_adapters()
        # Dense: the trained tensors' original values swapped in for this call only.
        return self.predict(lambda *a, **k: torch.func.functional_call(self.base_unet, self.teacher_params, a, k),
                            batch.noisy, batch.timesteps, batch.anchor_cond)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (`ablation`, `prior`) for a micro-batch."""
        cfg = self.cfg
        prior = bool(cfg.prior_preservation)
        share_teacher = cfg.variant == "model-based" and cfg.teacher == "same" and prior
        teacher = None
        if cfg.variant == "model-based" and not share_teacher:
            teacher = self.teacher(batch)
        if prior:  # one forward for target and anchor halves
            both = self.predict(self.unet, torch.cat([batch.noisy] * 2), torch.cat([batch.timesteps] * 2),
                                _cat(batch.target_cond, batch.anchor_cond))
            student, anchor_pred = both.chunk(2)
        else:
            student, anchor_pred = self.predict(self.unet, batch.noisy, batch.timesteps, batch.target_cond), None
        if cfg.variant == "model-based":
            # teacher `same` with prior preservation: the anchor half *is* the teacher's forward (detached).
            main = losses.model_based_loss(student, anchor_pred if share_teacher else teacher)
        else:
            main = losses.noise_based_loss(student, batch.target)
        parts = {"ablation": float(main.detach())}
        total = main
        if prior:
            prior_loss = losses.prior_preservation_loss(anchor_pred, batch.target, cfg.prior_weight)
            parts["prior"] = float(prior_loss.detach())
            total = total + prior_loss
        return total, parts


def _cat(a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings:
    return PromptEmbeddings(torch.cat([a.embeds, b.embeds]),
                            None if a.pooled is None else torch.cat([a.pooled, b.pooled]))


def _unwrap(module):
    return getattr(module, "module", module)  # DDP


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _trained_state(trainable) -> dict[str, torch.Tensor]:
    return {f"{comp}.{name}": p.detach().float().cpu().contiguous()
            for comp, params in trainable.parameters.items() for name, p in params.items()}


def weights_checksum(trainable) -> str:
    """sha256 of the trained tensors (identical on every rank after a DDP step)."""
    h = hashlib.sha256()
    for key, tensor in sorted(_trained_state(trainable).items()):
        h.update(key.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def _register_state_hooks(accelerator, trainable) -> None:
    """Checkpoints hold only the trained tensors (not whole models), plus accelerate's optimizer/RNG state."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        weights.clear()  # accelerate would otherwise save every prepared model in full
        if accelerator.is_main_process:
            save_file(_trained_state(trainable), os.path.join(output_dir, TRAINED_FILE))

    def load_hook(models, input_dir):
        models.clear()
        state = load_file(os.path.join(input_dir, TRAINED_FILE))
        with torch.no_grad():
            for comp, params in trainable.parameters.items():
                for name, p in params.items():
                    p.copy_(state[f"{comp}.{name}"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, plan: RunPlan, step: int) -> Path:
    """`accelerator.save_state` into `checkpoints/checkpoint-<step>`, rotating old ones (every process calls)."""
    cfg = plan.config
    path = plan.output_dir / "checkpoints" / f"checkpoint-{step}"
    if accelerator.is_main_process and cfg.checkpoints_total_limit:
        existing = list_checkpoints(plan.output_dir)
        for old in existing[:max(0, len(existing) - cfg.checkpoints_total_limit + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:  # written last: a checkpoint without it is incomplete
        state = {"step": step, "config_hash": plan.config_hash, "num_processes": accelerator.num_processes}
        _write_atomic(path / STATE_FILE, json.dumps(state))
    accelerator.wait_for_everyone()
    return path


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced (also what tests inspect)."""

    output_dir: Path
    delta_path: Path | None
    steps: int
    learning_rate: float
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")  # ablation loss on a fixed batch before training
    final_loss: float = float("nan")  # ... and after
    anchor_images_generated: int = 0
    stopped_early: bool = False
    exports: list[Path] = field(default_factory=list)
    pipeline: Any = None  # the trained pipeline (in memory; LoRA adapters unmerged)


def _prepare_output(plan: RunPlan) -> None:
    """Main process: clear previous results (--overwrite), write the resolved config.yaml."""
    import yaml

    out = plan.output_dir
    if plan.config.overwrite and plan.resume_dir is None:
        for name in OUTPUT_ARTEFACTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "config.yaml", yaml.safe_dump(plan.config.to_dict(), sort_keys=False))


def _make_optimizer(cfg: TrainConfig, params, lr: float):
    weight_decay = 0.0 if cfg.params == "embedding" else cfg.adam_weight_decay  # decay would move frozen rows
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError(f"--use-8bit-adam needs a working bitsandbytes (pip install bitsandbytes): {e}") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _cast_frozen(modules, dtype) -> None:
    """Frozen weights in the mixed-precision dtype; trained tensors stay fp32 (autocast bridges them)."""
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def _setup_training(cfg: TrainConfig, pipe, data: TrainingData, token_ids, accelerator):
    """Trainable group (dense or LoRA), dtypes, optimizer, `accelerator.prepare`, the objective."""
    from diffusers import DDPMScheduler

    from ablation.params import setup_trainable

    trainable = setup_trainable(pipe, cfg.params, cfg.lora_rank, cfg.lora_alpha, token_ids)
    unet = pipe.unet
    teacher_params = None
    dense_unet = not trainable.lora and "unet" in trainable.parameters
    if cfg.variant == "model-based" and cfg.teacher == "frozen" and dense_unet:
        teacher_params = {n: p.detach().clone() for n, p in trainable.parameters["unet"].items()}
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    _cast_frozen([m for m in pipe.components.values() if isinstance(m, torch.nn.Module)], weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes if cfg.scale_lr else 1
    lr = cfg.learning_rate * scale
    optimizer = _make_optimizer(cfg, trainable.flat(), lr)
    if cfg.params == "embedding":  # the UNet is frozen: nothing for DDP to wrap; grads are averaged by hand
        optimizer = accelerator.prepare(optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    _register_state_hooks(accelerator, trainable)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = Objective(cfg, pipe, data, noise_scheduler, unet, accelerator.device, accelerator.process_index,
                          teacher_params)
    return unet, optimizer, trainable, objective, lr


def train(config: TrainConfig, plan: RunPlan | None = None) -> TrainResult:
    """Run an ablation: the whole program behind `ablate train`.

    Args:
        config: the user configuration (validated by its constructor).
        plan: an already checked plan (else `plan_run(config)` is called).

    Returns:
        The run's outputs and loss history.

    Raises:
        ConfigError: bad input (before any expensive work).
        TrainingError: a non-finite loss (the last good checkpoint is kept, no delta is written).
    """
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from ablation import checkpoint
    from ablation.models import load_pipeline
    from ablation.params import target_token_ids

    plan = plan or plan_run(config)
    cfg = plan.config
    # Created after planning (which writes nothing) and before any write; it reads ACCELERATE_USE_CPU etc.
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(plan.output_dir), logging_dir=str(plan.output_dir / "logs"),
                                            automatic_checkpoint_naming=False))
    if cfg.mixed_precision != "no" and not accelerator.native_amp:  # accelerate silently skips autocast then
        raise ConfigError(f"--mixed-precision {cfg.mixed_precision} is not available on {accelerator.device.type}; "
                          f"use bf16 or no on CPU")
    accelerator.wait_for_everyone()  # every rank has checked the output directory before anybody writes to it
    if accelerator.is_main_process:
        _prepare_output(plan)
    logger = get_logger(__name__)
    set_seed(cfg.seed)
    device = accelerator.device

    pipe = load_pipeline(plan.model_path).to(device)
    pipe.set_progress_bar_config(disable=True)
    data, generated = prepare_data(plan, pipe, accelerator)
    with torch.no_grad(), accelerator.autocast():
        data.embeddings = encode_prompts(pipe, data.prompts, device).to(device, torch.float32)
    token_ids = None
    if cfg.params == "embedding":
        token_ids = sorted({i for c in plan.concepts for i in target_token_ids(pipe.tokenizer, c.target, c.anchor)})
    else:  # the prompt embeddings are fixed: the text encoders leave the device
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to("cpu")
    pipe.vae.to("cpu")  # every anchor is a latent by now

    unet, optimizer, trainable, objective, lr = _setup_training(cfg, pipe, data, token_ids, accelerator)

    step = 0
    if plan.resume_dir is not None:
        accelerator.load_state(str(plan.resume_dir))
        step = read_checkpoint_state(plan.resume_dir)["step"]
        logger.info("resumed from %s at step %d", plan.resume_dir, step)
    elif cfg.resume_from_checkpoint:
        logger.info("no checkpoint in %s; starting from step 0", plan.output_dir / "checkpoints")
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("ablation", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in cfg.to_dict().items()})
    logger.info("training %s (%s%s) for %d steps: %d anchor latents, %d prompts, lr %.3g, %d process(es)",
                cfg.params, cfg.variant, f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "", cfg.max_steps,
                len(data.latents), len(data.prompts), lr, accelerator.num_processes)

    initial_loss = _fixed_batch_loss(objective, accelerator)
    result = TrainResult(plan.output_dir, None, step, lr, initial_loss=initial_loss,
                         anchor_images_generated=generated, pipeline=pipe)
    micro = step * cfg.gradient_accumulation_steps
    stop_at = min(cfg.max_steps, cfg.stop_after_steps or cfg.max_steps)
    progress = tqdm(total=cfg.max_steps, initial=step, desc="ablating", disable=not accelerator.is_local_main_process)
    while step < stop_at:
        with accelerator.accumulate(unet):
            with accelerator.autocast():
                loss, parts = objective(objective.batch(micro))
            gathered = accelerator.gather(loss.detach().reshape(1))
            if not torch.isfinite(gathered).all():
                kept = list_checkpoints(plan.output_dir)
                raise TrainingError(f"the loss became {gathered.tolist()} at step {step + 1}; stopping without a "
                                    f"delta. Last good checkpoint: {kept[-1] if kept else 'none'}. Lower "
                                    f"--learning-rate or use --mixed-precision no")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.params == "embedding" and accelerator.num_processes > 1:
                    for p in trainable.flat():
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable.flat(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        if accelerator.sync_gradients:
            step += 1
            mean_loss = float(gathered.mean())
            result.losses.append(mean_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4g}", **{k: f"{v:.3g}" for k, v in parts.items()})
            accelerator.log({"loss": mean_loss, **{f"loss/{k}": v for k, v in parts.items()}}, step=step)
            if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == cfg.max_steps):
                save_checkpoint(accelerator, plan, step)
    progress.close()
    result.steps = step
    result.final_loss = _fixed_batch_loss(objective, accelerator)
    if cfg.debug_checksums:
        _write_atomic(plan.output_dir / "debug" / f"rank-{accelerator.process_index}.json",
                      json.dumps({"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
                                  "step": step, "checksum": weights_checksum(trainable)}))
    accelerator.wait_for_everyone()
    if step < cfg.max_steps:
        result.stopped_early = True
        logger.info("stopped after %d of %d steps (--stop-after-steps); no delta written", step, cfg.max_steps)
        accelerator.end_training()
        return result
    if accelerator.is_main_process:
        result.delta_path, result.exports = _write_outputs(plan, pipe, trainable, token_ids, step, lr, checkpoint)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def _fixed_batch_loss(objective: Objective, accelerator) -> float:
    """The ablation term on one fixed batch, the same on every rank (for the summary and the tests)."""
    with accelerator.autocast():
        batch = objective.batch(-1, batch_size=min(8, len(objective.data.latents)), seed_rank=0)
        student = objective.predict(objective.base_unet, batch.noisy, batch.timesteps, batch.target_cond)
        if objective.cfg.variant == "model-based":
            return float(losses.model_based_loss(student, objective.teacher(batch)))
        return float(losses.noise_based_loss(student, batch.target))


def _write_outputs(plan: RunPlan, pipe, trainable, token_ids, step: int, lr: float, checkpoint):
    """Main process: `delta.safetensors` with metadata, then the requested exports."""
    from ablation import __version__

    cfg = plan.config
    metadata = checkpoint.make_metadata(
        base_model=cfg.model, base_config_hash=checkpoint.pipeline_config_hash(pipe),
        concepts=[c.to_dict() for c in plan.concepts], params=cfg.params, lora_rank=cfg.lora_rank, steps=step,
        learning_rate=lr, variant=cfg.variant,
        extra={"package_version": __version__, "config_hash": plan.config_hash, "teacher": cfg.teacher,
               "resolution": str(cfg.resolution), "prior_preservation": str(cfg.prior_preservation)})
    tensors = checkpoint.trained_tensors(pipe, trainable.param_names, embedding_rows=token_ids)
    delta = plan.output_dir / checkpoint.DELTA_FILENAME
    checkpoint.save_delta(delta, tensors, metadata)
    exports = []
    if cfg.export:
        lora_state = checkpoint.lora_state_from_pipe(pipe) if trainable.lora else None
        if cfg.mixed_precision == "no":
            export_pipe = pipe.to("cpu")
        else:  # the frozen weights were rounded to fp16/bf16 for training: export from the fp32 base + delta
            from ablation.models import load_pipeline

            export_pipe = load_pipeline(plan.model_path)
            checkpoint.apply_delta(export_pipe, tensors)
        checkpoint.export_outputs(export_pipe, plan.output_dir, cfg.export, lora_state, metadata)
        exports = [plan.output_dir / kind for kind in cfg.export]
    return delta, exports

