"""Collateral damage: what an ablation does to concepts outside the ablated family.

Target, anchor and surrounding concepts say whether the ablation did its job within its family; an
ablation can still leak elsewhere (on the toy world, a grumpy-cat delta that paints robots orange).
This module generates *control* images of other concepts with the base and the ablated model under
the same seeds and judges both with up to two judges:

* `clip`: the CLIP judge, zero-shot over the judge texts of every control concept (and, in
  `ablate eval`, the evaluated tasks' concepts);
* `classifier` (toy world only): the 31-way toy concept classifier (`ablation.toyworld.classifier`),
  which shares nothing with the toy CLIP or the diffusion model.

Per concept and judge: accuracy base vs ablated (fraction of images judged as the prompted concept);
over all control images: `changed_fraction`, the fraction whose judged concept differs between the
base and the ablated image of the same prompt and seed.

Controls are every toy concept (`toy_controls`) or, for real models, a prompt set (`load_controls`:
`--control-prompts FILE` or `prompt_sets/controls.yaml`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ablation.config import GUIDANCE, ConfigError
from ablation.evaluation.swap import ablated
from ablation.sampling.generate import Job, SamplingSettings, generate, jobs_for_total, set_scheduler
from ablation.toyworld import catalog, clip_dir
from ablation.toyworld.classifier import load_classifier

CONTROLS_FILE = Path(__file__).parent / "prompt_sets" / "controls.yaml"
JUDGES = ("classifier", "clip")


@dataclass(frozen=True)
class ControlConcept:
    """A concept whose images must not change: its prompts and the text CLIP judges it by."""

    name: str
    prompts: tuple[str, ...]
    judge_text: str

    def jobs(self, per_concept: int, seed: int) -> list[Job]:
        """`per_concept` images spread over the prompts (seeds as everywhere in evaluation)."""
        return jobs_for_total(self.prompts, per_concept, seed)


def toy_controls(exclude: Sequence[str] = ()) -> list[ControlConcept]:
    """Every toy-world concept except `exclude`, on the catalogue's held-out prompts (catalogue order)."""

    cat = catalog()
    prompts: dict[str, tuple[str, ...]] = {}
    for fam in cat.families.values():
        for concept in fam.classes:
            if concept not in prompts:
                prompts[concept] = tuple(fam.prompts_for(concept, "heldout"))
    return [ControlConcept(c, prompts[c], cat.concepts[c].judge_text) for c in cat.concepts if c not in exclude]


def load_controls(path: str | Path | None = None, exclude: Sequence[str] = ()) -> list[ControlConcept]:
    """Control concepts of a YAML/JSON file (default: `prompt_sets/controls.yaml`).

    The file maps each concept to its prompts, either a list of prompts or
    `{prompts: [...], judge: "text"}`; the judge text defaults to `a photo of a <concept>`.

    Raises:
        ValueError: the file is not such a mapping, or a concept has no prompts.
        FileNotFoundError: the file does not exist.
    """

    path = Path(path) if path is not None else CONTROLS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"control prompt file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping concept -> prompts (or {{prompts: [...], judge: text}})")
    out = []
    for name, spec in data.items():
        prompts, judge = (spec.get("prompts"), spec.get("judge")) if isinstance(spec, dict) else (spec, None)
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{path}: concept {name!r} needs a non-empty list of prompt strings")
        if str(name) not in exclude:
            out.append(ControlConcept(str(name), tuple(prompts), judge or f"a photo of a {name}"))
    return out


class Judges:
    """The judges of control images: CLIP over a label set of texts, and optionally the toy classifier.

    Args:
        labels: concept names CLIP chooses among (each with its judge text).
        texts: CLIP text of each label.
        clip: a `ClipJudge`, or None.
        classifier: a `ToyClassifier`, or None.
    """

    def __init__(self, labels: Sequence[str], texts: Sequence[str], clip=None, classifier=None) -> None:
        self.labels, self.clip, self.classifier = list(labels), clip, classifier
        self._text_feats = clip.text_features(list(texts)) if clip is not None else None

    @property
    def names(self) -> list[str]:
        return [n for n, j in (("classifier", self.classifier), ("clip", self.clip)) if j is not None]

    def judge(self, images: Sequence, clip_features=None, classified: list[str] | None = None) -> dict[str, list[str]]:
        """Judge name -> the concept each image is judged to show.

        Args:
            images: PIL images (only needed for what is not given below).
            clip_features: the images' CLIP features when already computed (saves a CLIP pass).
            classified: the classifier's verdicts when already computed.
        """
        out: dict[str, list[str]] = {}
        if self.classifier is not None:
            out["classifier"] = classified if classified is not None else self.classifier.predict(images)
        if self.clip is not None:
            feats = clip_features if clip_features is not None else self.clip.image_features(images)
            best = (feats @ self._text_feats.T).argmax(-1).tolist() if len(feats) else []
            out["clip"] = [self.labels[i] for i in best]
        return out


def toy_judges(clip=None, classifier=None, device: str = "cpu") -> Judges:
    """Both toy judges over all 31 toy concepts (loads the shipped ones unless given)."""
    from ablation.evaluation.clip_judge import ClipJudge

    concepts = catalog().concepts
    return Judges(list(concepts), [c.judge_text for c in concepts.values()],
                  clip=clip or ClipJudge(clip_dir(), device=device), classifier=classifier or load_classifier())


def summarize(concepts: Sequence[str], base: dict[str, list[str]], ablated: dict[str, list[str]]) -> dict:
    """Accuracy base vs ablated per concept and judge, and the fraction of images whose judgement changed.

    Args:
        concepts: the prompted concept of each image.
        base: judge -> judged concept of each base image.
        ablated: judge -> judged concept of each ablated image (same prompts and seeds, same order).

    Returns:
        `{"judges", "num_images", "changed_fraction": {judge: f}, "accuracy": {judge: {base, ablated}},
        "concepts": {concept: {"num_images", judge: {"base", "ablated", "change", "changed"}}}}`.
    """
    concepts = list(concepts)
    names = [j for j in JUDGES if j in base]
    rows: dict[str, dict] = {}
    for concept in dict.fromkeys(concepts):
        idx = [i for i, c in enumerate(concepts) if c == concept]
        row: dict = {"num_images": len(idx)}
        for j in names:
            b = float(np.mean([base[j][i] == concept for i in idx]))
            a = float(np.mean([ablated[j][i] == concept for i in idx]))
            changed = float(np.mean([base[j][i] != ablated[j][i] for i in idx]))
            row[j] = {"base": b, "ablated": a, "change": a - b, "changed": changed}
        rows[concept] = row
    n = len(concepts)
    return {
        "judges": names,
        "num_images": n,
        "changed_fraction": {j: (float(np.mean([x != y for x, y in zip(base[j], ablated[j], strict=True)]))
                                 if n else float("nan")) for j in names},
        "accuracy": {j: {"base": float(np.mean([base[j][i] == c for i, c in enumerate(concepts)])) if n else None,
                         "ablated": float(np.mean([ablated[j][i] == c for i, c in enumerate(concepts)])) if n else None}
                     for j in names},
        "concepts": rows,
    }


@contextlib.contextmanager
def _scheduler(pipe, name: str) -> Iterator:
    original = pipe.scheduler
    set_scheduler(pipe, name)
    try:
        yield
    finally:
        pipe.scheduler = original


def measure(base_pipe, ablated_pipe, *, concepts: Sequence[str] | None = None, per_concept: int = 8, seed: int = 0,
            steps: int = 10, guidance: float = GUIDANCE, scheduler: str = "ddim", batch_size: int = 64,
            judges: Judges | None = None) -> dict:
    """Collateral damage of an ablation on the toy world, measured by both toy judges.

    Args:
        base_pipe: the base toy pipeline.
        ablated_pipe: the ablated pipeline, or an ablation source (delta file, run dir, LoRA dir)
            that is applied to `base_pipe` for the ablated half and taken off afterwards.
        concepts: toy concepts to generate (default: all 31).
        per_concept: images per concept, spread over its held-out prompts.
        seed: base seed (the same seeds for both models).
        steps: sampler steps (10 is enough for the toy judges to recognise every concept).
        guidance: classifier-free guidance.
        scheduler: sampler (swapped in for the call, restored after).
        batch_size: images per pipeline call.
        judges: prebuilt judges (default: `toy_judges()`; pass them to time only generation).

    Returns:
        `summarize(...)` plus `settings`; `concepts[c]["classifier"|"clip"]` hold accuracy base/ablated.

    Raises:
        KeyError: an unknown toy concept.
    """

    controls = toy_controls()
    if concepts is not None:
        by_name = {c.name: c for c in controls}
        unknown = [c for c in concepts if c not in by_name]
        if unknown:
            raise KeyError(f"unknown toy concepts {unknown}; known: {', '.join(by_name)}")
        controls = [by_name[c] for c in concepts]
    judges = judges or toy_judges()
    settings = SamplingSettings(scheduler=scheduler, steps=steps, guidance=guidance)
    jobs = [job for c in controls for job in c.jobs(per_concept, seed)]
    labels = [c.name for c in controls for _ in range(per_concept)]

    def run(pipe) -> dict[str, list[str]]:
        with _scheduler(pipe, scheduler):
            samples = generate(pipe, jobs, settings, batch_size=batch_size)
        return judges.judge([s.image for s in samples])

    base = run(base_pipe)
    if isinstance(ablated_pipe, str | Path):
        with ablated(base_pipe, ablated_pipe):
            other = run(base_pipe)
    else:
        other = run(ablated_pipe)
    out = summarize(labels, base, other)
    out["settings"] = {"per_concept": per_concept, "seed": seed, "steps": steps, "guidance": guidance,
                       "scheduler": scheduler}
    return out
