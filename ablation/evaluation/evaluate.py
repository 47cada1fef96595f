"""Evaluate ablated runs against their base model: generate (cached), embed with CLIP, score.

One base pipeline is loaded per evaluation; each run's ablation is swapped in and out of it
(`ablation.evaluation.swap`). Images are cached under `<out>/images/<model key>/<prompt hash>/<seed>.png`,
where the model key hashes the model, the ablation file's identity and the sampling settings, so
re-scoring (another judge, other metrics, a new run next to old ones) regenerates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ablation import models  # models.load_pipeline at call time: tests swap it to prove nothing loads
from ablation.checkpoint import read_metadata, resolve_delta
from ablation.evaluation import metrics
from ablation.evaluation.clip_judge import ClipJudge, auto_device, default_clip_for
from ablation.evaluation.collateral import Judges, load_controls, summarize, toy_controls
from ablation.evaluation.prompts import ConceptTask
from ablation.evaluation.report import write_report
from ablation.evaluation.swap import DeltaCache, ablated
from ablation.models import is_toy, resolve_model, torch_dtype
from ablation.sampling.generate import (
    Job,
    SamplingSettings,
    cache_path,
    generate,
    jobs_for,
    jobs_for_total,
    set_scheduler,
)
from ablation.toyworld import catalog
from ablation.toyworld.classifier import load_classifier
from ablation.toyworld.render import render

logger = logging.getLogger(__name__)
REPORT_FORMAT = "ablation-eval/1"


@dataclass
class EvalSettings:
    """What `evaluate` generates and how it scores (all of it is written to `report.json`).

    Attributes:
        sampling: sampler, steps, guidance, size.
        samples_per_prompt: images per prompt of every concept (unless `images_per_role` is set).
        images_per_role: total images per concept by role (`target`, `anchor`, `surrounding`), spread
            over its prompts round-robin; the paper uses 200 / 200 / 50.
        seed: base seed; image seeds are `seed + 100000 * prompt_index + sample_index`.
        batch_size: images per pipeline call.
        kid_subsets: KID subsets (Binkowski et al.).
        kid_subset_size: KID subset size (capped at the number of images).
        memorization_threshold: CLIP image-image cosine above which a sample copies the memorized image.
        grid_prompts: prompts per concept shown in the comparison grids.
        dtype: `fp32`, `fp16` or `bf16` for the generator.
        control_samples: images per control concept (collateral damage, `ablation.evaluation.collateral`):
            every toy concept outside the evaluated tasks, or the control prompt set of a real model; 0: none.
    """

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    samples_per_prompt: int = 4
    images_per_role: dict[str, int] | None = None
    seed: int = 0
    batch_size: int = 8
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    memorization_threshold: float = 0.9
    grid_prompts: int = 2
    dtype: str = "fp32"
    control_samples: int = 8

    def jobs(self, prompts: Sequence[str], role: str) -> list[Job]:
        if self.images_per_role and role in self.images_per_role:
            return jobs_for_total(prompts, self.images_per_role[role], self.seed)
        return jobs_for(prompts, self.samples_per_prompt, self.seed)


DTYPES = {name: torch_dtype(name) for name in ("fp32", "fp16", "bf16")}


def _fingerprint(path: Path) -> list:
    """Identity of a file or folder's files (name, size, mtime): changes when a run is retrained."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    if not path.is_dir():
        return [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and "eval" not in p.relative_to(path).parts)
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _recorded_settings(settings: EvalSettings, pipe) -> dict:
    """The settings as the report states them: SD3/FLUX sample with their own flow scheduler whatever was asked."""
    out = asdict(settings)
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        out["sampling"]["scheduler"] = f"{type(pipe.scheduler).__name__} (the model's own)"
    return out


def model_key(name: str, model: str, source: str | None, settings: EvalSettings, device: str) -> str:
    """Cache folder name of one generator: readable name + hash of everything images depend on."""

    resolved = resolve_model(model)
    ident = {"model": resolved, "model_files": _fingerprint(Path(resolved)) if Path(resolved).exists() else None,
             "source": _fingerprint(_source_path(source)) if source else None,
             "sampling": asdict(settings.sampling), "dtype": settings.dtype, "device": device}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]
    return f"{safe}-{digest}"


def _source_path(source: str) -> Path:
    return resolve_delta(source)[1]


def run_name(source: str, taken: set[str]) -> str:
    """A short unique name for an ablated run: its folder name (the parent's for a delta file)."""
    path = Path(source).expanduser()
    name = path.parent.name if path.is_file() else path.name
    name = name or "ablated"
    unique, i = name, 2
    while unique in taken or unique == "base":
        unique, i = f"{name}-{i}", i + 1
    taken.add(unique)
    return unique


@dataclass
class ConceptImages:
    """The images of one concept by one model: their jobs, files and CLIP features."""

    jobs: list[Job]
    paths: list[Path]
    features: torch.Tensor
    generated: int
    classified: list[str] | None = None


def _memorized_reference(task: ConceptTask, judge, size: tuple[int, int], override: str | None,
                         base_images: ConceptImages | None) -> tuple[torch.Tensor | None, str]:
    """Features of the memorized image: given file, the toy renderer's image, or the base model's centroid."""
    path = override or task.memorized_image
    if path:
        with Image.open(path) as im:
            return judge.image_features([im.convert("RGB")]), str(path)
    if task.source == "toyworld":
        image = Image.fromarray(render(task.target, 0, size=size[0]))
        return judge.image_features([image]), "toyworld-render"
    if base_images is not None and len(base_images.features):
        centroid = torch.nn.functional.normalize(base_images.features.mean(0, keepdim=True), dim=-1)
        return centroid, "base-centroid"
    return None, "none"


def score_concept(task: ConceptTask, concept: str, images: ConceptImages, judge, *,
                  base: ConceptImages | None, settings: EvalSettings,
                  memorized: torch.Tensor | None) -> dict:
    """All numbers of one concept for one model (see `metrics` for the formulas)."""
    feats = images.features
    texts = judge.text_features(list(task.judge_texts[c] for c in task.classes))
    index = {c: i for i, c in enumerate(task.classes)}
    versus = task.versus(concept)
    prompt_feats = judge.text_features([j.prompt for j in images.jobs])
    row = {
        "role": task.role(concept), "versus": versus, "judge_text": task.judge_texts[concept],
        "num_images": len(images.jobs), "num_prompts": len({j.prompt for j in images.jobs}),
        "seeds": [j.seed for j in images.jobs], "generated": images.generated,
        "clip_accuracy": metrics.clip_accuracy(feats, texts[index[concept]], texts[index[versus]]),
        "family_accuracy": metrics.family_accuracy(feats, texts, index[concept]),
        "clip_score": metrics.clip_score(feats, prompt_feats),
    }
    if images.classified is not None:  # the toy world's second judge, over all 31 concepts
        row["classifier_accuracy"] = float(np.mean([p == concept for p in images.classified]))
    if base is not None and min(len(base.features), len(feats)) >= 2:  # KID needs two samples a side
        mean, std = metrics.kid(base.features, feats, num_subsets=settings.kid_subsets,
                                subset_size=settings.kid_subset_size, seed=settings.seed)
        row["kid_vs_base"], row["kid_vs_base_std"] = mean, std
    if task.concept_type == "memorization" and concept == task.target and memorized is not None:
        row["memorization_rate"] = metrics.memorization_rate(feats, memorized, settings.memorization_threshold)
    return row


def _load_base(model: str, device: torch.device, dtype: str, scheduler: str):
    pipe = models.load_pipeline(model, torch_dtype=DTYPES[dtype]).to(device)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _default_controls(base_model: str, tasks: Sequence[ConceptTask], settings: EvalSettings):
    """Every toy concept outside the tasks (toy model), else the default control prompt set."""

    if settings.control_samples < 1:
        return []
    taken = [c for t in tasks for c in t.classes]
    return toy_controls(exclude=taken) if is_toy(base_model) else load_controls(exclude=taken)


def _toy_classifier(base_model: str, device: torch.device):
    """The toy world's concept classifier for the toy model (None elsewhere, or when its weights are missing)."""

    if not is_toy(base_model):
        return None

    try:
        return load_classifier(device=device)
    except FileNotFoundError as err:
        logger.warning("%s: evaluating with the toy CLIP only", err)
        return None


def evaluate(base_model: str, runs: Sequence[str], tasks: Sequence[ConceptTask], out_dir: str | Path,
             settings: EvalSettings | None = None, *, clip_model: str | None = None, device: str | None = None,
             memorized_image: str | None = None, pipe=None, judge=None, controls=None, classifier=None) -> dict:
    """Generate, score and compare; write `report.json`, `report.md`, grids and a chart into `out_dir`.

    Args:
        base_model: `toy`, a diffusers directory or a hub id.
        runs: ablation sources (delta files, run dirs, LoRA dirs, pipeline dirs); may be empty.
        tasks: what to evaluate (see `ablation.evaluation.prompts`).
        out_dir: report folder; images are cached in `out_dir/images`.
        settings: generation and scoring settings.
        clip_model: judge id or dir (default: toy CLIP for the toy model, else CLIP ViT-B/32, the paper's).
        device: `cuda`, `cpu`, ... (default: CUDA when available).
        memorized_image: the memorized image of memorization tasks (overrides the prompt set's).
        pipe: an already loaded base pipeline (its scheduler is replaced by the settings').
        judge: an already built `ClipJudge`.
        controls: `collateral.ControlConcept`s for collateral damage (default: every toy concept outside
            the tasks on the toy model, else `prompt_sets/controls.yaml`); `settings.control_samples` each.
        classifier: the toy concept classifier (default: the shipped one on the toy model, else none).

    Returns:
        The report (as written to `report.json`).
    """

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    dev = torch.device(device) if device else auto_device()
    if pipe is None:
        pipe = _load_base(base_model, dev, settings.dtype, settings.sampling.scheduler)
    else:
        set_scheduler(pipe, settings.sampling.scheduler)
    judge = judge or ClipJudge(clip_model or default_clip_for(base_model), device=dev)
    classifier = classifier if classifier is not None else _toy_classifier(base_model, dev)
    controls = list(controls) if controls is not None else _default_controls(base_model, tasks, settings)
    if settings.control_samples < 1:
        controls = []
    taken: set[str] = set()
    models = [{"name": "base", "model": base_model, "delta": None}]
    models += [{"name": run_name(r, taken), "model": base_model, "delta": str(r)} for r in runs]
    cache = DeltaCache()
    plan = _plan(tasks, controls, settings)
    progress = _Progress(len(plan.jobs) * len(models))
    images: dict[str, dict[tuple[str, str], ConceptImages]] = {}
    control_images: dict[str, ConceptImages] = {}
    try:
        for entry in models:
            entry["key"] = model_key(entry["name"], base_model, entry["delta"], settings, dev.type)
            if entry["delta"]:
                entry["metadata"] = read_metadata(_source_path(entry["delta"]))
            with ablated(pipe, entry["delta"], cache=cache):
                images[entry["name"]], control_images[entry["name"]] = _generate_all(
                    pipe, plan, settings, judge, classifier, out_dir / "images" / entry["key"], progress)
            logger.info("%s: %d images generated, rest from cache", entry["name"],
                        sum(c.generated for c in images[entry["name"]].values())
                        + control_images[entry["name"]].generated)
    finally:
        progress.close()
    results: dict[str, dict] = {}
    references: dict[str, str] = {}
    for entry in models:
        name = entry["name"]
        results[name] = {}
        for task in tasks:
            base_imgs = images["base"].get((task.name, task.target))
            memorized, ref = None, "none"
            if task.concept_type == "memorization":
                first = images[name][(task.name, task.target)].paths[0]
                with Image.open(first) as im:
                    size = im.size
                memorized, ref = _memorized_reference(task, judge, size, memorized_image, base_imgs)
                references[task.name] = ref
            results[name][task.name] = {
                c: score_concept(task, c, images[name][(task.name, c)], judge,
                                 base=images["base"][(task.name, c)] if name != "base" else None,
                                 settings=settings, memorized=memorized)
                for c in task.classes
            }
    report = {
        "format": REPORT_FORMAT,
        "base_model": base_model,
        "clip_model": judge.model_id,
        "classifier": "toyworld/classifier" if classifier is not None else None,
        "device": dev.type,
        "settings": _recorded_settings(settings, pipe),
        "seed_formula": "seed + 100000 * prompt_index + sample_index",
        "models": models,
        "tasks": [_task_info(t, references.get(t.name)) for t in tasks],
        "results": results,
        "comparison": {m["name"]: compare(results["base"], results[m["name"]]) for m in models[1:]},
    }
    if controls:
        judges = _control_judges(base_model, tasks, controls, judge, classifier)
        verdicts = {m["name"]: _judge_controls(judges, control_images[m["name"]]) for m in models}
        labels = plan.control_labels
        report["collateral"] = {
            "controls": [c.name for c in controls], "per_concept": settings.control_samples,
            "judges": judges.names, "clip_labels": judges.labels,
            "base": summarize(labels, verdicts["base"], verdicts["base"]),
            "runs": {m["name"]: summarize(labels, verdicts["base"], verdicts[m["name"]]) for m in models[1:]},
        }
    paths = {name: {k: [(j.prompt, p) for j, p in zip(v.jobs, v.paths, strict=True)] for k, v in per.items()}
             for name, per in images.items()}
    write_report(report, out_dir, tasks, paths, settings.grid_prompts)
    return report


@dataclass
class _Plan:
    """Every image one model must produce: the tasks' concepts, then the control concepts."""

    concepts: list[tuple[ConceptTask, str, list[Job]]]
    control_jobs: list[Job]
    control_labels: list[str]
    jobs: list[Job]


def _plan(tasks: Sequence[ConceptTask], controls, settings: EvalSettings) -> _Plan:
    concepts = [(task, c, settings.jobs(task.prompts[c], task.role(c))) for task in tasks for c in task.classes]
    control_jobs = [j for c in controls for j in c.jobs(settings.control_samples, settings.seed)]
    labels = [c.name for c in controls for _ in range(settings.control_samples)]
    # a prompt may repeat across tasks and controls: generate it once
    jobs = list(dict.fromkeys([j for _, _, js in concepts for j in js] + control_jobs))
    return _Plan(concepts, control_jobs, labels, jobs)


class _Progress:
    """One progress bar over every image of every model (cached images count as done at once)."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        # disable=None: shown on a terminal, silent in logs and CI
        self.bar = tqdm(total=total, desc="eval images", unit="img", disable=None)
        self._done = 0

    def start(self, cached: int) -> None:
        self._done = 0
        self.bar.update(cached)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        self.bar.close()


def _generate_all(pipe, plan: _Plan, settings: EvalSettings, judge, classifier, cache_dir: Path,
                  progress: _Progress | None = None) -> tuple[dict[tuple[str, str], ConceptImages], ConceptImages]:
    """Every concept's and control's images for the pipeline as it is now, generated in shared batches."""
    all_jobs = plan.jobs
    if progress is not None:
        progress.start(sum(cache_path(cache_dir, j).exists() for j in all_jobs))
    samples = generate(pipe, all_jobs, settings.sampling, batch_size=settings.batch_size,
                       path_for=lambda job: cache_path(cache_dir, job), progress=progress)
    by_job = dict(zip(all_jobs, samples, strict=True))
    pil = [s.image for s in samples]
    feats = judge.image_features(pil)
    classified = classifier.predict(pil) if classifier is not None else None
    row = {job: i for i, job in enumerate(all_jobs)}

    def pick(jobs: list[Job]) -> ConceptImages:
        idx = [row[j] for j in jobs]
        return ConceptImages(jobs=jobs, paths=[by_job[j].path for j in jobs],
                             features=feats[torch.tensor(idx, dtype=torch.long)],
                             generated=sum(not by_job[j].cached for j in jobs),
                             classified=[classified[i] for i in idx] if classified is not None else None)

    return {(task.name, c): pick(jobs) for task, c, jobs in plan.concepts}, pick(plan.control_jobs)


def _control_judges(base_model: str, tasks: Sequence[ConceptTask], controls, judge, classifier):
    """CLIP chooses among every toy concept (toy model), else among the controls and the tasks' concepts."""

    if is_toy(base_model):
        concepts = catalog().concepts
        return Judges(list(concepts), [c.judge_text for c in concepts.values()], judge, classifier)
    texts = {c.name: c.judge_text for c in controls}
    for task in tasks:
        for c in task.classes:
            texts.setdefault(c, task.judge_texts[c])
    return Judges(list(texts), list(texts.values()), judge, classifier)


def _judge_controls(judges, images: ConceptImages) -> dict[str, list[str]]:
    # features and classifier verdicts were computed with the task images: no second pass
    return judges.judge([], clip_features=images.features, classified=images.classified)


def _task_info(task: ConceptTask, memorized_reference: str | None) -> dict:
    info = {"name": task.name, "concept_type": task.concept_type, "target": task.target, "anchor": task.anchor,
            "surrounding": list(task.surrounding), "source": task.source, "judge_texts": task.judge_texts,
            "prompts": {c: list(p) for c, p in task.prompts.items()}}
    if memorized_reference:
        info["memorized_reference"] = memorized_reference
    return info


COMPARED = ("clip_accuracy", "family_accuracy", "classifier_accuracy", "clip_score", "memorization_rate")


def compare(base: dict, ablated: dict) -> list[dict]:
    """Rows `{task, concept, role, metric, base, ablated, change}`; KID rows hold the distance in `ablated`."""
    rows = []
    for task, concepts in ablated.items():
        for concept, values in concepts.items():
            for metric in COMPARED:
                if metric in values:
                    b, a = base[task][concept].get(metric), values[metric]
                    change = None if b is None else a - b
                    rows.append({"task": task, "concept": concept, "role": values["role"], "metric": metric,
                                 "base": b, "ablated": a, "change": change})
            if "kid_vs_base" in values:
                rows.append({"task": task, "concept": concept, "role": values["role"], "metric": "kid_vs_base",
                             "base": None, "ablated": values["kid_vs_base"], "change": None})
    return rows


