"""The Python API: ablate a concept from a pipeline you already have in a notebook, and evaluate it.

    >>> import ablation
    >>> result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", max_steps=100)  # doctest: +SKIP
    >>> result.pipeline("a photo of a grumpy cat").images[0]                                # doctest: +SKIP
    >>> result.save("models/no-grumpy-cat")                                                 # doctest: +SKIP
    >>> report = ablation.evaluate(result)                                                  # doctest: +SKIP

`ablate` is `ablate train` in-process: the keyword options are the fields of `ablation.config.TrainConfig`
(the YAML keys of a recipe; `--max-steps` is `max_steps=`), validated by the same code, so an unknown or
misspelled option raises `ConfigError` before any work. A pipeline object is trained in place (no second
load): a dense run changes its weights, a LoRA run (`lora_rank=`) leaves LoRA adapters attached.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation.config import EXPORT_KINDS, GUIDANCE, ConfigError, TrainConfig, build_config

__all__ = ["AblationResult", "ablate", "evaluate"]

#: run-folder entries `AblationResult.save` copies (checkpoints and logs stay behind: they are for resuming)
SAVED_ENTRIES = ("delta.safetensors", "config.yaml", *EXPORT_KINDS, "eval", "README.md")


@dataclass
class AblationResult:
    """What `ablate` returns.

    Attributes:
        pipeline: the ablated pipeline (the object passed in, trained in place; dense weights updated, or
            LoRA adapters attached and active).
        delta: the trained tensors as saved in `delta.safetensors` (`"<component>.<name>"` -> CPU tensor;
            empty when the run stopped early).
        delta_path: the run's `delta.safetensors` (None when it stopped early).
        run_dir: the run folder (`output_dir`, or a temporary folder when none was given).
        config: the resolved configuration (every default filled in).
        metrics: steps, learning rate, initial and final ablation loss, loss history, anchor images generated.
    """

    pipeline: Any
    delta: dict[str, Any]
    delta_path: Path | None
    run_dir: Path
    config: TrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Copy the run (delta, config.yaml, exports, eval, model card) to `directory`, atomically.

        The copy gets a fresh `README.md` model card. Checkpoints and logs are not copied.

        Returns:
            The directory.

        Raises:
            ConfigError: the run stopped before writing a delta, or `directory` exists and is not empty.
        """
        from ablation.io import atomic_dir
        from ablation.model_card import write_model_card

        if self.delta_path is None:
            raise ConfigError("this run stopped early and wrote no delta; nothing to save")
        directory = Path(directory).expanduser()
        if directory.resolve() == self.run_dir.resolve():
            write_model_card(directory)
            return directory
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise ConfigError(f"{directory} exists and is not empty; choose a new folder")

        def write(tmp: Path) -> None:
            for name in SAVED_ENTRIES:
                src = self.run_dir / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.is_file():
                    shutil.copy2(src, tmp / name)
            write_model_card(tmp)

        atomic_dir(directory, write)
        return directory


def _model_name(pipe, given: str | None) -> str:
    """What the delta records as its base model: `model=` if given, else where the pipeline was loaded from."""
    if given:
        return given
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not name:  # an in-memory pipeline: the label keeps it out of the toy defaults (`model` defaults to toy)
        return "in-memory"
    from ablation.models import TOY_MODELS, is_toy

    if is_toy(str(name)):
        from ablation.toyworld import WEIGHTS_DIR

        return next(i for i, folder in TOY_MODELS.items()
                    if str(name) == i or Path(name).resolve() == (WEIGHTS_DIR / folder).resolve())
    return str(name)


def _reset_accelerate_if_single_process() -> None:
    """Allow several `ablate` calls with different `mixed_precision` in one notebook.

    accelerate keeps one process-wide state and refuses a second Accelerator with other settings; outside
    a distributed launch nothing else depends on it, so it is reset.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def ablate(pipe_or_model_id, target: str | Sequence[str] | None = None, anchor: str | Sequence[str] | None = None,
           **options: Any) -> AblationResult:
    """Ablate `target` (turning it into `anchor`) from a pipeline, in this process.

    Args:
        pipe_or_model_id: a loaded diffusers text-to-image pipeline (trained in place, not reloaded), or a model
            id as `--model` takes it (`toy`, a diffusers directory, a hub id).
        target: the concept to remove, e.g. "Grumpy Cat" (a list for several; or give `concepts=` instead).
        anchor: what it should become, e.g. "Cat" (paired in order with `target`).
        **options: any `TrainConfig` field by its YAML name (`max_steps=50`, `params="attn"`, `lora_rank=4`,
            `export=["lora"]`, ...). `model=` names the base in the delta's metadata (default: where the
            pipeline was loaded from). Without `output_dir=` the run goes to a new temporary folder (use
            `save`) and saves no resumable checkpoints unless `checkpointing_steps=` is given.

    Returns:
        The ablated pipeline, the delta, the run folder and the training metrics.

    Raises:
        ConfigError: an unknown option or a bad value, before any work.
        TrainingError: the loss became non-finite.
    """
    from ablation.trainer import train

    overrides = dict(options)
    if target is not None:
        overrides["target"] = target
    if anchor is not None:
        overrides["anchor"] = anchor
    pipe = None
    if isinstance(pipe_or_model_id, str | Path):
        overrides.setdefault("model", str(pipe_or_model_id))
    else:
        pipe = pipe_or_model_id
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)  # SD1/2/XL or SD3/FLUX
        if denoiser is None or not hasattr(pipe, "vae"):
            raise ConfigError(f"ablate() needs a diffusers text-to-image pipeline or a model id, got "
                              f"{type(pipe).__name__}")
        overrides["model"] = _model_name(pipe, overrides.get("model"))
    temporary = overrides.get("output_dir") is None
    config = build_config(None, overrides)  # validates every key and value before anything is created
    if temporary:
        config.output_dir = tempfile.mkdtemp(prefix="ablation-")
        if "checkpointing_steps" not in options:
            config.checkpointing_steps = 0  # nobody resumes a run from a temporary folder
    _reset_accelerate_if_single_process()
    result = train(config, pipe=pipe)
    trained = result.pipeline
    _ready_for_inference(trained, config)
    delta: dict[str, Any] = {}
    if result.delta_path is not None:
        from ablation.checkpoint import load_delta

        delta, _ = load_delta(result.delta_path)
    import yaml

    resolved = build_config(None, yaml.safe_load((result.output_dir / "config.yaml").read_text()))
    metrics = {"steps": result.steps, "learning_rate": result.learning_rate, "initial_loss": result.initial_loss,
               "final_loss": result.final_loss, "losses": list(result.losses),
               "anchor_images_generated": result.anchor_images_generated, "stopped_early": result.stopped_early}
    return AblationResult(trained, delta, result.delta_path, result.output_dir, resolved, metrics)


def _ready_for_inference(pipe, config: TrainConfig) -> None:
    """Undo what training set up for itself, so the pipeline generates right away.

    Training leaves the UNet in train mode (dropout), may enable gradient checkpointing, keeps frozen weights
    in the mixed-precision dtype, and moves the text encoders and the VAE to the CPU.
    """
    import torch

    unet = getattr(pipe, "unet", None) or pipe.transformer  # the denoiser: UNet, or SD3/FLUX transformer
    unet.eval()
    if config.gradient_checkpointing and hasattr(unet, "disable_gradient_checkpointing"):
        unet.disable_gradient_checkpointing()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    device = next(unet.parameters()).device
    if config.mixed_precision != "no":  # frozen weights were rounded to this dtype: run everything in it
        pipe.to(device, {"fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision])
    else:
        pipe.to(device)


def evaluate(ablated: AblationResult | str | Path | Sequence[AblationResult | str | Path], base: str | None = None,
             *, out: str | Path | None = None, families: Sequence[str] = (), targets: Sequence[str] = (),
             anchors: Sequence[str] = (), concept_type: str = "instance", num_samples: int = 4,
             steps: int | None = None, guidance: float = GUIDANCE, scheduler: str = "ddim", seed: int = 0,
             height: int | None = None, width: int | None = None, clip_model: str | None = None,
             device: str | None = None, base_pipe=None, model_card: bool = True, **settings: Any) -> dict:
    """Evaluate ablated runs against their base model (`ablate eval` in-process); returns the report.

    Args:
        ablated: an `AblationResult`, a run folder / delta / LoRA / pipeline path, or a list of them.
        base: base model id (default: the first run's recorded base model, else `toy`).
        out: report folder (default: `<first run>/eval`).
        families: tasks to evaluate by name (default: the runs' own concepts).
        targets: ad-hoc targets instead (with `anchors` when not in a prompt set).
        anchors: anchor per target.
        concept_type: concept type of ad-hoc pairs.
        num_samples: images per prompt and concept.
        steps: sampling steps (default: as `ablate eval`: 25 on the toy model, else 50).
        guidance: classifier-free guidance.
        scheduler: `ddim`, `dpm++`, `euler` or `pndm`.
        seed: base seed of the images.
        height: image height (default: the model's).
        width: image width (default: the model's).
        clip_model: CLIP judge id or folder (default: the toy CLIP for the toy model, else CLIP ViT-B/32, the paper's).
        device: `cuda`, `cpu`, ... (default: CUDA when available).
        base_pipe: an already loaded base pipeline (not an ablated one: it is the reference).
        model_card: refresh each run folder's `README.md` model card with the new eval.
        **settings: further `ablation.evaluation.evaluate.EvalSettings` fields (`batch_size`, `kid_subsets`, ...).

    Returns:
        The report, as written to `<out>/report.json`.

    Raises:
        ConfigError: nothing to evaluate, an unknown task, or an unknown setting.
    """
    from ablation.evaluation.evaluate import EvalSettings
    from ablation.evaluation.evaluate import evaluate as run_evaluation
    from ablation.evaluation.selection import plan_evaluation, refresh_model_cards
    from ablation.sampling.generate import SamplingSettings

    items = [ablated] if isinstance(ablated, AblationResult | str | Path) else list(ablated)
    runs = [str(i.run_dir if isinstance(i, AblationResult) else i) for i in items]
    try:
        plan = plan_evaluation(runs, base=base, families=families, targets=targets, anchors=anchors,
                               concept_type=concept_type, out=out, steps=steps, batch_size=settings.get("batch_size"))
        settings["batch_size"] = plan.batch_size
        eval_settings = EvalSettings(sampling=SamplingSettings(scheduler=scheduler, steps=plan.steps,
                                                               guidance=guidance, height=height, width=width),
                                     samples_per_prompt=num_samples, seed=seed, **settings)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    except TypeError as e:  # an unknown EvalSettings keyword
        raise ConfigError(str(e)) from None
    report = run_evaluation(plan.base, runs, plan.tasks, plan.out, eval_settings, clip_model=clip_model,
                            device=device, pipe=base_pipe)
    if model_card:
        refresh_model_cards(runs)
    return report
