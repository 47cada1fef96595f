"""The one training loop (CPU, one GPU, multi-GPU DDP: accelerate decides).

`ablation.planning.plan_run` checks everything a run needs without loading weights; `train` then loads the
pipeline, prepares anchor data (`ablation.training_data`) and prompt embeddings once, and optimises the
chosen parameter group on the objective of `ablation.objective`, saving resumable state (`ablation.resume`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablation import __version__, checkpoint, losses, placement
from ablation.architectures import training_adapter
from ablation.concepts import common_words
from ablation.config import EXPORT_KINDS, PRECISIONS, ConfigError, TrainConfig, learning_rate
from ablation.delta import base_weights_fingerprint
from ablation.io import atomic_write_text
from ablation.memory import FLOAT8
from ablation.merge import base_name
from ablation.model_card import write_model_card
from ablation.models import store_in_fp8, torch_dtype
from ablation.objective import Objective
from ablation.params import setup_trainable, target_token_ids
from ablation.planning import RunPlan, memory_plan, plan_run
from ablation.preserve import KVPreservation, Penalties, second_moment
from ablation.resume import (
    list_checkpoints,
    read_checkpoint_state,
    register_state_hooks,
    save_checkpoint,
    tensor_checksum,
    weights_checksum,
)
from ablation.runlock import acquire
from ablation.training_data import TrainingData, prepare_data

__all__ = ["TrainResult", "TrainingError", "list_checkpoints", "plan_run", "train"]

#: what a run, its exports (`export.EXPORT_KINDS` name their folders) and `ablate eval` write into the run folder;
#: `--overwrite` removes all of it, and every other sub-folder holding an evaluation or attack report
#: (`ablate eval/attack --out RUN/NAME`), so nothing of the previous run's results survives into the new model card
OUTPUT_ARTEFACTS = ("checkpoints", "delta.safetensors", *EXPORT_KINDS, "eval", "logs", "debug", "config.yaml",
                    "README.md", "timings.json", "report.json", "report.md")
RESULT_FILES = ("report.json", "attack.json")


class TrainingError(RuntimeError):
    """The run failed after it started (e.g. a non-finite loss); no delta was written."""


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
    phase_seconds: dict[str, float] = field(default_factory=dict)  # also written to timings.json


class _Phases:
    """Wall seconds per phase of a run. The first, `start-up`, counts from `started_at` (a `time.time()`; the CLI
    passes its process start, so interpreter and imports count and the phases add up to what a user waits for)."""

    def __init__(self, started_at: float | None) -> None:
        self.seconds = {"start-up": round(time.time() - started_at, 3) if started_at else 0.0}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now


def _lock_output(plan: RunPlan):
    """Main process: create the run directory and lock it for the whole run (`ablation.runlock`).

    Returns the lock; it is released when the caller drops it (end of `train`) or the process dies.
    """

    return acquire(plan.output_dir)


def _prepare_output(plan: RunPlan) -> None:
    """Main process, once every check has passed: clear previous results (--overwrite), write config.yaml."""
    import yaml

    out = plan.output_dir
    if plan.config.overwrite and plan.resume_dir is None:
        for target in previous_results(out):
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(plan.config.to_dict(), sort_keys=False))


def previous_results(out: Path) -> list[Path]:
    """What `--overwrite` removes from the run folder `out`: `OUTPUT_ARTEFACTS` and report folders (see there)."""
    if not out.is_dir():
        return []
    found = [out / name for name in OUTPUT_ARTEFACTS if (out / name).exists() or (out / name).is_symlink()]
    found += [p for p in sorted(out.iterdir()) if p.is_dir() and p not in found
              and any((p / name).is_file() for name in RESULT_FILES)]
    return found


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
    """Frozen weights in the mixed-precision dtype (a no-op for a pipeline loaded in it: only a pipeline passed in
    by the Python API is still fp32 here); trained tensors stay fp32 (`setup_trainable`), as diffusers' training
    examples keep them: autocast bridges the two, and AdamW's states follow the fp32 tensors."""
    for module in modules:
        for p in module.parameters():
            # float8: stored so on purpose by --fp8-base (layerwise casting upcasts them as their layer runs)
            if not p.requires_grad and p.dtype != dtype and p.dtype not in FLOAT8:
                p.data = p.data.to(dtype)


def _restore_exact(trainable, model_path: str) -> int:
    """Dense groups of a pipeline loaded in fp16/bf16: the trained tensors start from their exact originals, read
    tensor by tensor from the model's safetensors files (`read_component_tensors`), so the delta equals an fp32
    run's. Returns how many tensors were restored (0 for a single-file checkpoint: they stay rounded)."""
    from ablation.models import read_component_tensors

    restored = 0
    rows_of = {id(r.rows): r for r in trainable.row_overrides}
    for comp, params in trainable.parameters.items():
        names = {k.removesuffix(".rows") for k in params}
        originals = read_component_tensors(model_path, comp, names)
        for key, p in params.items():
            value = originals.get(key.removesuffix(".rows"))
            if value is not None and id(p) in rows_of:  # embedding group: the target's rows of the matrix
                value = value[rows_of[id(p)].ids]
            if value is not None and value.shape == p.shape:
                with torch.no_grad():
                    p.copy_(value)
                restored += 1
    return restored


def _setup_training(cfg: TrainConfig, pipe, data: TrainingData, token_ids, accelerator, model_path: str | None):
    """Trainable group (dense or LoRA), dtypes, optimizer, `accelerator.prepare`, the objective.

    The denoiser is the UNet or the SD3/FLUX transformer; its family's adapter (`ablation.architectures`)
    supplies the training scheduler and how it is called.
    """

    adapter = training_adapter(pipe)
    trainable = setup_trainable(pipe, cfg.params, cfg.lora_rank, cfg.lora_alpha, token_ids)
    if cfg.mixed_precision != "no" and not trainable.lora and model_path:
        _restore_exact(trainable, model_path)
    # Before a resumed state is loaded: the base as loaded (in the training dtype: `fingerprints_match` compares
    # with that dtype's tolerance).
    trainable.base_fingerprint = base_weights_fingerprint(pipe, trainable.param_names)
    unet = adapter.denoiser(pipe)
    teacher_params = None
    dense_unet = not trainable.lora and adapter.component in trainable.parameters
    # the original values of the trained tensors: the `frozen` teacher, and what a persistent --robust adversary aims at
    wants_original = cfg.teacher == "frozen" or (cfg.robust and cfg.robust_adversary != "ball")
    if cfg.variant == "model-based" and wants_original and dense_unet:
        teacher_params = {n: p.detach().clone() for n, p in trainable.parameters[adapter.component].items()}
    preservation = None
    if adapter.component == "unet":  # text keys/values of other prompts stay put (ablation/preserve.py)

        dense = None if trainable.lora else trainable.parameters.get("unet", {})
        terms = [(weight, KVPreservation(unet, dense, second_moment(data.embeddings.embeds[rows]).to(
                     accelerator.device)))
                 for weight, rows in ((cfg.preserve_weight, data.control_rows), (cfg.preserve_uncond, data.uncond_rows))
                 if weight and rows is not None]
        preservation = Penalties(terms) if terms else None
    weight_dtype = torch_dtype(cfg.mixed_precision)
    _cast_frozen([m for m in pipe.components.values() if isinstance(m, torch.nn.Module)], weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    lr = learning_rate(cfg, accelerator.num_processes)
    optimizer = _make_optimizer(cfg, trainable.flat(), lr)
    if cfg.params == "embedding":  # the UNet is frozen: nothing for DDP to wrap; grads are averaged by hand
        optimizer = accelerator.prepare(optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = adapter.training_scheduler(pipe)  # UNet: DDPM; SD3/FLUX: flow matching
    objective = Objective(cfg, pipe, data, noise_scheduler, unet, accelerator.device, accelerator.process_index,
                          teacher_params, adapter)
    objective.preservation = preservation
    register_state_hooks(accelerator, trainable, objective)
    return unet, optimizer, trainable, objective, lr


def train(config: TrainConfig, plan: RunPlan | None = None, pipe=None, started_at: float | None = None) -> TrainResult:
    """Run an ablation: the whole program behind `ablate train`.

    Args:
        config: the user configuration (validated by its constructor).
        plan: an already checked plan (else `plan_run(config, pipe)` is called).
        pipe: an already loaded pipeline to train in place (no second load); else `plan.model_path` is loaded.
        started_at: `time.time()` at which the user started waiting (the CLI: its process start); the
            `start-up` phase of `timings.json` counts from there.

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

    from ablation.models import load_pipeline

    phases = _Phases(started_at)
    plan = plan or plan_run(config, pipe)
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
    if cfg.fp8_base and accelerator.num_processes > 1:  # DDP broadcasts every weight; no backend is tested with fp8
        raise ConfigError("--fp8-base runs in one process: launch without --num_processes, or drop --fp8-base")
    accelerator.wait_for_everyone()  # every rank has checked the output directory before anybody writes to it
    # Held (by this local) until train() returns; a second run into the same directory fails at once.
    _run_lock = _lock_output(plan) if accelerator.is_main_process else None
    logger = get_logger(__name__)
    set_seed(cfg.seed)
    device = accelerator.device

    if device.type == "cuda" and accelerator.is_main_process:  # seconds to plan; on the CPU only with --plan

        try:
            mem = memory_plan(plan, "cuda")
        except Exception as e:  # the plan informs; it must never stop a run that can go ahead
            mem = None
            logger.info("no memory plan for this model (%s: %s)", type(e).__name__, e)
        if mem is not None:
            logger.info("memory plan: peak %.1f GB per process (%s); ablate train --plan shows the parts",
                        mem.peak / 2**30, ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem.train.items() if v))
    phases.mark("start-up")  # planning and accelerate belong to start-up too
    loaded = pipe is None
    if loaded:  # frozen weights straight in the training dtype: no fp32 copy of any component (FLUX: ~67 GB)
        pipe = load_pipeline(plan.model_path, torch_dtype=torch_dtype(cfg.mixed_precision),
                             model_config=cfg.model_config)
    if cfg.fp8_base:  # before anything samples or trains: the anchors come from the model that trains
        store_in_fp8(training_adapter(pipe).denoiser(pipe), cfg.params, torch_dtype(cfg.mixed_precision))
    placement.place(pipe, device, cfg.offload_text_encoders)
    pipe.set_progress_bar_config(disable=True)
    phases.mark("load")
    data, generated = prepare_data(plan, pipe, accelerator)
    phases.mark("anchor data")
    with torch.no_grad(), accelerator.autocast(), placement.encoding(pipe, device, cfg.offload_text_encoders):
        data.embeddings = training_adapter(pipe).encode_prompts(pipe, data.prompts, device).to(device, torch.float32)
    token_ids = None
    if cfg.params == "embedding":
        token_ids = sorted({i for c in plan.concepts
                            for i in target_token_ids(pipe.tokenizer, c.target, c.anchor, c.anchor_prompts)})
        shared = common_words(pipe.tokenizer, token_ids)
        if shared:
            logger.warning("the embedding group retrains the token rows of %s: common words, so every prompt that uses "
                           "them changes too (e.g. 'a white van' for 'Van Gogh'); use --params cross-attn to keep "
                           "other prompts", ", ".join(repr(w) for w in shared))
    elif not (cfg.robust and cfg.robust_adversary in ("prefix", "shifted")):  # these encode prompts while training
        # the prompt embeddings are fixed: the text encoders leave the device
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # SD3's T5 is text_encoder_3
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to("cpu")
    pipe.vae.to("cpu")  # every anchor is a latent by now

    unet, optimizer, trainable, objective, lr = _setup_training(cfg, pipe, data, token_ids, accelerator,
                                                                plan.model_path if loaded else None)
    if accelerator.is_main_process:  # every check has passed: only now replace old results, write config.yaml
        _prepare_output(plan)

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

    phases.mark("setup")  # prompt encoding, trainable group, teacher, optimizer
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
    trainable.write_back()  # embedding group: the trained rows into the matrices (a plain pipeline again)
    phases.mark("train")
    if cfg.debug_checksums:
        atomic_write_text(plan.output_dir / "debug" / f"rank-{accelerator.process_index}.json",
                      json.dumps({"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
                                  "step": step, "checksum": weights_checksum(trainable),
                                  "adversary": tensor_checksum(objective.adversary)}))
    accelerator.wait_for_everyone()
    if step < cfg.max_steps:
        result.stopped_early = True
        logger.info("stopped after %d of %d steps (--stop-after-steps); no delta written", step, cfg.max_steps)
        accelerator.end_training()
        return result
    if accelerator.is_main_process:
        result.delta_path, result.exports = _write_outputs(plan, pipe, trainable, token_ids, step, lr, checkpoint)
        phases.mark("save")
        result.phase_seconds = phases.seconds
        atomic_write_text(plan.output_dir / "timings.json", json.dumps(
            {"phase_seconds": phases.seconds, "total_s": round(sum(phases.seconds.values()), 3),
             "anchor_images_generated": generated, "steps": step}, indent=2) + "\n")
        logger.info("phases (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.seconds.items()))
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
            return float(losses.model_based_loss(student, objective.teacher(batch), batch.mask))
        return float(losses.noise_based_loss(student, batch.target, batch.mask))


def _write_outputs(plan: RunPlan, pipe, trainable, token_ids, step: int, lr: float, checkpoint):
    """Main process: `delta.safetensors` with metadata, then the requested exports."""

    cfg = plan.config
    metadata = checkpoint.make_metadata(
        base_model=cfg.model, base_config_hash=checkpoint.pipeline_config_hash(pipe),
        concepts=[c.to_dict() for c in plan.concepts], params=cfg.params, lora_rank=cfg.lora_rank, steps=step,
        learning_rate=lr, variant=cfg.variant, base_fingerprint=trainable.base_fingerprint,
        extra={"package_version": __version__, "config_hash": plan.config_hash, "teacher": cfg.teacher,
               "resolution": str(cfg.resolution), "prior_preservation": str(cfg.prior_preservation),
               "frozen_dtype": PRECISIONS[cfg.mixed_precision]})
    # From the run's own weights, never a second (fp32) load of the base. Trained tensors are fp32 and, loaded from
    # a diffusers folder, started from their exact originals (`_restore_exact`); a LoRA delta merges W + s * B @ A
    # in fp32 onto W's originals read the same way. Only from a single-file checkpoint under fp16/bf16 do they
    # start from (dense) or merge onto (LoRA) the rounded weights (docs/paper-parity.md, "Precision").
    base_states = None
    if trainable.lora and cfg.mixed_precision != "no":  # the merge's W: the exact originals, read tensor by tensor
        from ablation.models import read_component_tensors

        base_states = {comp: read_component_tensors(plan.model_path, comp, {base_name(n) for n in names})
                       for comp, names in trainable.param_names.items()}
    tensors = checkpoint.trained_tensors(pipe, trainable.param_names, embedding_rows=token_ids,
                                         base_states=base_states)
    delta = plan.output_dir / checkpoint.DELTA_FILENAME
    checkpoint.save_delta(delta, tensors, metadata)
    exports = []
    if cfg.export:
        lora_state = checkpoint.lora_state_from_pipe(pipe) if trainable.lora else None
        checkpoint.export_outputs(pipe.to("cpu"), plan.output_dir, cfg.export, lora_state, metadata)
        exports = [plan.output_dir / kind for kind in cfg.export]

    write_model_card(plan.output_dir)  # README.md in the Hugging Face format
    return delta, exports

