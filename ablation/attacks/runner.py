"""Run attacks on an ablated model and write the report folder (`attack.json`, `attack.md`, grids).

The logic behind `ablate attack` and `ablate eval --attacks` (the CLI only parses flags into `AttackSettings`).
Everything is checked before the model is loaded; the report folder is written atomically at the end
(`ablation.io.atomic_dir`), so a failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ablation.attacks import prompts, replay, report
from ablation.attacks.common import AttackContext
from ablation.attacks.prompts import read_user_prompts
from ablation.attacks.registry import ATTACKS
from ablation.attacks.replay import read_source
from ablation.checkpoint import read_metadata, resolve_delta
from ablation.config import GUIDANCE, ConfigError
from ablation.evaluation.selection import select_tasks
from ablation.flags import option
from ablation.io import atomic_dir
from ablation.sampling.generate import SamplingSettings, set_scheduler

logger = logging.getLogger("ablation.attacks")

@dataclass
class AttackSettings:
    """One `ablate attack` run (validated by `check`)."""

    base: str = option("base model", default="toy")
    ablated: str = option("run dir, delta file, LoRA dir or pipeline dir (required)", default="")
    attacks: tuple[str, ...] = option(  # flag: --attack (repeatable), parsed by the CLI
        "attacks; () -> prompts, or with `replay` every attack of that report", default=())
    budget: int | None = option("budget of every attack", default=None)  # flag: --budget N or KIND=N
    budgets: dict[str, int] = option("budget per attack", default_factory=dict)
    seed: int = option("seed of every image and of the attacks' randomness", default=0)
    out: str = option("report folder (replaced atomically; required)", default="")
    family: str | None = option("task (toy family or paper prompt set; default: the run's concept)", default=None)
    target: str | None = option("target concept (default: the run's)", default=None)
    anchor: str | None = option("anchor of --target when it has no prompt set", default=None)
    prompts_file: str | None = option("your own attack prompts for `prompts` (.txt one a line, or a .json/.yaml "
                                      "list)", default=None, flag="--prompts", metavar="FILE")
    clip: str | None = option("CLIP judge (default: toy CLIP for toy, else ViT-L/14)", default=None)
    num_prompts: int = option("target prompts attacked", default=4)
    num_samples: int = option("images per prompt and model", default=2)
    num_references: int = option("base-model images of the target for the embedding attacks", default=8)
    steps: int = option("denoising steps of every image", default=25)
    guidance: float = option("classifier-free guidance", default=GUIDANCE)
    batch_size: int = option("images per pipeline call", default=8)
    device: str | None = option("cuda, cpu, ... (default: cuda when available)", default=None)
    replay: str | None = option(
        "render the prompts and embeddings an earlier `ablate attack` run saved in DIR on --ablated (no search; its "
        "seed, budgets, images per prompt, sampling and task are used; relearn is re-run with its budget); --attack "
        "picks some of its attacks (default: all of them)", default=None, metavar="DIR")

    def budget_of(self, attack: str) -> int:
        """`--budget KIND=N`, else `--budget N`, else the attack's default."""
        return self.budgets.get(attack) or self.budget or ATTACKS[attack].budget

    def check(self) -> None:
        """Raise `ConfigError` for bad input, before anything is loaded or written."""
        from ablation.models import resolve_model

        if self.replay:
            self._adopt_replay()
        elif not self.attacks:
            self.attacks = ("prompts",)
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
            read_user_prompts(self.prompts_file)


    def _adopt_replay(self) -> None:
        """`--replay DIR`: the earlier run's attacks, budgets, seed, images per prompt, sampling and task."""

        source = read_source(self.replay)
        recorded = [a["attack"] for a in source["attacks"]]
        chosen = self.attacks or tuple(recorded)
        missing = [a for a in chosen if a not in recorded]
        if missing:
            raise ConfigError(f"--replay {self.replay}: {', '.join(missing)} not in that report (it has "
                              f"{', '.join(recorded)})")
        s = source["settings"]
        self.attacks = tuple(chosen)
        self.budgets = {a["attack"]: a["budget"] for a in source["attacks"]}
        self.seed, self.num_prompts, self.num_samples = s["seed"], s["num_prompts"], s["num_samples"]
        self.num_references = s["num_references"]
        self.steps, self.guidance = s["sampling"]["steps"], s["sampling"]["guidance"]
        if s.get("family"):  # the same task, hence the same plain prompts
            self.family, self.target, self.anchor = s["family"], None, None
        else:
            self.family, self.target, self.anchor = None, source["task"]["target"], source["task"]["anchor"]

    def command(self) -> str:
        """The `ablate attack` command line that repeats this run with every budget and seed pinned."""
        import shlex

        parts = ["ablate", "attack", "--base", self.base, "--ablated", self.ablated]
        for attack in self.attacks:
            parts += ["--attack", attack, "--budget", f"{attack}={self.budget_of(attack)}"]
        parts += ["--seed", str(self.seed), "--num-prompts", str(self.num_prompts), "--num-samples",
                  str(self.num_samples), "--num-references", str(self.num_references), "--steps", str(self.steps),
                  "--guidance", f"{self.guidance:g}"]
        if self.target:
            parts += ["--target", self.target] + (["--anchor", self.anchor] if self.anchor else [])
        elif self.family:
            parts += ["--family", self.family]
        if self.prompts_file:
            parts += ["--prompts", self.prompts_file]
        if self.replay:
            parts += ["--replay", self.replay]
        return shlex.join(parts + ["--out", self.out])


def resolve_task(settings: AttackSettings):
    """The concept task: `--family`, else `--target/--anchor`, else the run's recorded concept."""

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

    from ablation.evaluation.clip_judge import ClipJudge, auto_device, default_clip_for

    settings.check()
    task = resolve_task(settings)
    source = replay.read_source(settings.replay) if settings.replay else None
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
        recorded = {a["attack"]: a for a in source["attacks"]} if source else {}
        for attack in settings.attacks:
            budget = settings.budget_of(attack)
            torch.manual_seed(settings.seed)  # nothing should draw from the global generator; belt and braces
            start = time.perf_counter()
            if attack in replay.REPLAYABLE and attack in recorded:
                out = replay.run(ctx, recorded[attack], settings.replay)
            else:
                out = ATTACKS[attack].run(ctx, budget)
            folder = attack.replace("-", "_")
            out["asr"] = {**out["asr"], "pre_attack": ctx.plain["ablated"],
                          "post_attack": ctx.post_attack_asr(folder)}
            if attack in replay.REPLAYABLE:
                out["replay"], tensors[attack] = replay.entries(ctx.rendered.get(f"{folder}/ablated", []),
                                                                 len(ctx.target_prompts))
            out = {"attack": attack, "budget": budget, "budget_unit": ATTACKS[attack].unit,
                   "wall_seconds": round(time.perf_counter() - start, 3), **out}
            results.append(out)
            logger.info("%s: ASR base %s, ablated %s, post-attack %s (%.1f s)", attack, out["asr"]["base"],
                        out["asr"]["ablated"], out["asr"]["post_attack"], out["wall_seconds"])
        rep = {
            "format": "ablation-attack/1",
            "base_model": settings.base, "ablated": settings.ablated, "judge": judge.model_id,
            "device": device.type,
            "task": {"name": task.name, "target": task.target, "anchor": task.anchor,
                     "concept_type": task.concept_type, "judge_texts": task.judge_texts},
            "settings": {"seed": settings.seed, "family": settings.family, "num_prompts": settings.num_prompts,
                         "num_samples": settings.num_samples, "num_references": settings.num_references,
                         "sampling": asdict(sampling), "seed_formula": "seed + 100000 * prompt_index + sample_index",
                         "budgets": {a: settings.budget_of(a) for a in settings.attacks},
                         "replayed_from": settings.replay, "command": settings.command(),
                         "versions": _versions()},
            "asr_definition": ASR_DEFINITION,
            "plain": ctx.plain, "plain_prompts": ctx.target_prompts, "attacks": results,
        }
        report.write(rep, tmp, ctx.gallery, tensors)
        return rep

    holder: dict = {}
    atomic_dir(settings.out, lambda tmp: holder.update(report=work(Path(tmp))))
    return holder["report"]


#: written into every report (`attack.json`, `attack.md`)
ASR_DEFINITION = {
    "asr": "fraction of the images rendered from the attack's prompts or embeddings that the judge assigns to the "
           "target rather than the anchor (one column per model)",
    "pre_attack": "the ablated model's ASR on the plain, unattacked target prompts (UnlearnDiffAtk's pre-attack ASR)",
    "post_attack": "UnlearnDiffAtk's post-attack ASR: per attacked image slot (item, sample), a success when the "
                   "ablated model's image of the attack is judged the target or the unattacked image of the same "
                   "plain prompt and sample already is; so pre_attack <= post_attack in expectation, and an attack "
                   "cannot score below the ablation's own leak",
}


def _versions() -> dict:
    """Library versions a pinned run depends on (same seed, same versions: same images)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ablation", "torch", "diffusers", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
