"""Run attacks on an ablated model and write the report folder (`attack.json`, `attack.md`, grids).

The logic behind `ablate attack` and `ablate eval --attacks` (the CLI only parses flags into `AttackSettings`).
Everything is checked before the model is loaded; the report folder is written atomically at the end
(`ablation.io.atomic_dir`), so a failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ablation.attacks.registry import ATTACKS
from ablation.config import GUIDANCE, ConfigError

logger = logging.getLogger("ablation.attacks")

@dataclass
class AttackSettings:
    """One `ablate attack` run (validated by `check`)."""

    base: str = "toy"
    ablated: str = ""
    attacks: tuple[str, ...] = ("prompts",)
    budget: int | None = None
    budgets: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    out: str = ""
    family: str | None = None
    target: str | None = None
    anchor: str | None = None
    prompts_file: str | None = None
    clip: str | None = None
    num_prompts: int = 4
    num_samples: int = 2
    num_references: int = 8
    steps: int = 25
    guidance: float = GUIDANCE
    batch_size: int = 8
    device: str | None = None

    def budget_of(self, attack: str) -> int:
        """`--budget KIND=N`, else `--budget N`, else the attack's default."""
        return self.budgets.get(attack) or self.budget or ATTACKS[attack].budget

    def check(self) -> None:
        """Raise `ConfigError` for bad input, before anything is loaded or written."""
        from ablation.checkpoint import resolve_delta
        from ablation.models import resolve_model

        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ConfigError(f"unknown attack {', '.join(unknown) or '(none)'}; choose from "
                              f"{', '.join(ATTACKS)} or all")
        for kind, value in self.budgets.items():
            if kind not in ATTACKS:
                raise ConfigError(f"--budget {kind}=...: unknown attack; choose from {', '.join(ATTACKS)}")
            if value < 1:
                raise ConfigError(f"--budget {kind}={value}: must be >= 1")
        for name, value in (("--budget", self.budget), ("--num-prompts", self.num_prompts),
                            ("--num-samples", self.num_samples), ("--num-references", self.num_references),
                            ("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not self.out:
            raise ConfigError("--out is required")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a directory")
        if not self.ablated:
            raise ConfigError("--ablated is required (run dir, delta file, LoRA dir or pipeline dir)")
        try:
            resolve_delta(self.ablated)
            resolve_model(self.base)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from err
        if self.anchor and not self.target:
            raise ConfigError("--anchor needs --target")
        if self.clip and not Path(self.clip).expanduser().exists() and self.clip.startswith((".", "/", "~")):
            raise ConfigError(f"--clip {self.clip}: no such directory")
        if self.prompts_file:
            from ablation.attacks.prompts import read_user_prompts

            read_user_prompts(self.prompts_file)


def resolve_task(settings: AttackSettings):
    """The concept task: `--family`, else `--target/--anchor`, else the run's recorded concept."""
    from ablation.evaluation.selection import select_tasks

    try:
        tasks = select_tasks(settings.base, [settings.ablated], families=[settings.family] if settings.family else [],
                             targets=[settings.target] if settings.target else [],
                             anchors=[settings.anchor] if settings.anchor else [])
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).strip("'\"")) from err
    return tasks[0]


def run_attacks(settings: AttackSettings, *, pipe=None, judge=None) -> dict:
    """Validate, load, attack and write the report folder; returns the report.

    Args:
        settings: the run.
        pipe: an already loaded base pipeline (tests); its scheduler is replaced by DDIM.
        judge: an already built `ClipJudge`.

    Raises:
        ConfigError: bad input (nothing has been written).
    """
    import time

    import torch

    from ablation.attacks import prompts, report
    from ablation.attacks.common import AttackContext
    from ablation.checkpoint import read_metadata, resolve_delta
    from ablation.evaluation.clip_judge import ClipJudge, auto_device, default_clip_for
    from ablation.evaluation.generate import SamplingSettings, set_scheduler
    from ablation.io import atomic_dir

    settings.check()
    task = resolve_task(settings)
    user_prompts = None
    if settings.prompts_file:
        user_prompts = prompts.read_user_prompts(settings.prompts_file)
    device = torch.device(settings.device) if settings.device else auto_device()
    if pipe is None:
        from ablation.models import load_pipeline

        try:
            pipe = load_pipeline(settings.base).to(device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the base model {settings.base!r}: {_first_line(err)}") from err
    if getattr(pipe, "text_encoder", None) is None:
        raise ConfigError("the base model has no text encoder; attacks need a text-to-image pipeline")
    embedding_attacks = {"text-search", "prefix", "inversion"} & set(settings.attacks)
    if embedding_attacks and getattr(pipe, "text_encoder_2", None) is not None:
        raise ConfigError(f"{', '.join(sorted(embedding_attacks))}: one text encoder (SD 1.x / 2.x) only, not SDXL")
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None:  # attacks differentiate only what they choose to train
            getattr(pipe, name).requires_grad_(False)
    if judge is None:
        clip = settings.clip or default_clip_for(settings.base)
        try:
            judge = ClipJudge(clip, device=device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the CLIP judge {clip!r} (pass --clip): {_first_line(err)}") from err
    sampling = SamplingSettings(steps=settings.steps, guidance=settings.guidance)
    metadata = read_metadata(resolve_delta(settings.ablated)[1])

    def work(tmp: Path) -> dict:
        ctx = AttackContext(pipe=pipe, delta=settings.ablated, task=task, judge=judge, sampling=sampling,
                            seed=settings.seed, num_prompts=settings.num_prompts, num_samples=settings.num_samples,
                            num_references=settings.num_references, batch_size=settings.batch_size, out_dir=tmp,
                            metadata=metadata, user_prompts=user_prompts)
        ctx.plain = ctx.asr_both(ctx.plain_items(), "plain")
        logger.info("plain target prompts: ASR base %.2f, ablated %.2f", ctx.plain["base"], ctx.plain["ablated"])
        results, tensors = [], {}
        for attack in settings.attacks:
            budget = settings.budget_of(attack)
            torch.manual_seed(settings.seed)  # nothing should draw from the global generator; belt and braces
            start = time.perf_counter()
            out = ATTACKS[attack].run(ctx, budget)
            tensors[attack] = out.pop("tensors", None)
            out = {"attack": attack, "budget": budget, "budget_unit": ATTACKS[attack].unit,
                   "wall_seconds": round(time.perf_counter() - start, 3), **out}
            results.append(out)
            logger.info("%s: ASR base %s, ablated %s (%.1f s)", attack, out["asr"]["base"], out["asr"]["ablated"],
                        out["wall_seconds"])
        rep = {
            "format": "ablation-attack/1",
            "base_model": settings.base, "ablated": settings.ablated, "judge": judge.model_id,
            "device": device.type,
            "task": {"name": task.name, "target": task.target, "anchor": task.anchor,
                     "concept_type": task.concept_type, "judge_texts": task.judge_texts},
            "settings": {"seed": settings.seed, "num_prompts": settings.num_prompts,
                         "num_samples": settings.num_samples, "num_references": settings.num_references,
                         "sampling": asdict(sampling), "seed_formula": "seed + 100000 * prompt_index + sample_index"},
            "plain": ctx.plain, "plain_prompts": ctx.target_prompts, "attacks": results,
        }
        report.write(rep, tmp, ctx.gallery, tensors)
        return rep

    holder: dict = {}
    atomic_dir(settings.out, lambda tmp: holder.update(report=work(Path(tmp))))
    return holder["report"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
