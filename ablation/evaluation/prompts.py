"""Evaluation tasks (a target, its anchor and surrounding concepts, with prompts) and prompt files.

Tasks come from three places: the toy-world catalogue (held-out prompts, which training never
saw), the paper's prompt sets shipped in `prompt_sets/paper.yaml`, or an ad-hoc target/anchor pair
(from a run's config) expanded with generic templates.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPT_SETS_DIR = Path(__file__).parent / "prompt_sets"
STYLE_SUFFIX = ", in the style of {}"
#: CLIP texts per concept type when a prompt set does not give its own ("{}" is the concept)
DEFAULT_JUDGE = {"instance": "a photo of a {}", "style": "a painting in the style of {}", "memorization": "{}",
                 "nudity": "a photo with {}"}
#: prompts for ad-hoc instance tasks (a target/anchor pair without a prompt set)
GENERIC_TEMPLATES = ("a photo of a {}", "a picture of a {} outdoors", "a close-up photo of a {}",
                     "a {} in a living room", "a drawing of a {}", "a {} on the beach")
GENERIC_STYLE_PROMPTS = ("a painting of a village", "a painting of a landscape", "a painting of a woman",
                         "a painting of a harbour", "a painting of flowers", "a painting of mountains")


@dataclass(frozen=True)
class ConceptTask:
    """One ablation task to evaluate: the concepts, their prompts and the texts CLIP judges them by.

    Attributes:
        name: short id (`grumpy_cat`, `van_gogh`, a toy family name).
        concept_type: `instance`, `style`, `memorization` or `nudity`.
        target: the ablated concept.
        anchor: the concept the target should turn into.
        surrounding: related concepts that must be preserved.
        prompts: prompts per concept (every class has an entry).
        judge_texts: CLIP text per concept.
        memorized_image: path of the memorized image, for memorization tasks.
        source: `toyworld`, `paper` or `config`.
    """

    name: str
    concept_type: str
    target: str
    anchor: str
    surrounding: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    judge_texts: dict[str, str]
    memorized_image: str | None = None
    source: str = "config"

    @property
    def classes(self) -> tuple[str, ...]:
        """Target, anchor, then the surrounding concepts."""
        return (self.target, self.anchor, *self.surrounding)

    def role(self, concept: str) -> str:
        """`target`, `anchor` or `surrounding`."""
        return "target" if concept == self.target else "anchor" if concept == self.anchor else "surrounding"

    def versus(self, concept: str) -> str:
        """The concept CLIP accuracy compares `concept` against: the anchor, or the target for the anchor."""
        return self.target if concept == self.anchor else self.anchor


# ------------------------------------------------------------------ toy world


def toy_task(family: str) -> ConceptTask:
    """The task of a toy-world family, on the catalogue's held-out prompts.

    Args:
        family: a family name (`grumpy_cat`) or its target (`grumpy cat`).
    """
    from ablation.toyworld import catalog

    cat = catalog()
    fam = cat.families.get(family) or cat.family_of_target(family)
    return ConceptTask(
        name=fam.name, concept_type=fam.concept_type, target=fam.target, anchor=fam.anchor,
        surrounding=tuple(fam.surrounding), source="toyworld",
        prompts={c: tuple(fam.prompts_for(c, "heldout")) for c in fam.classes},
        judge_texts={c: cat.concepts[c].judge_text for c in fam.classes},
    )


# ------------------------------------------------------------------ paper prompt sets


@functools.lru_cache(maxsize=1)
def _paper_sets() -> dict[str, dict]:
    with open(PROMPT_SETS_DIR / "paper.yaml") as f:
        return yaml.safe_load(f)


def paper_task_names() -> list[str]:
    return list(_paper_sets())


def _task_from_spec(name: str, spec: dict, source: str) -> ConceptTask:
    kind = spec["concept_type"]
    target, anchor = spec["target"], spec["anchor"]
    surrounding = tuple(spec.get("surrounding") or ())
    classes = (target, anchor, *surrounding)
    if kind == "style":
        anchor_prompts = tuple(spec["anchor_prompts"])
        suffix = spec.get("style_suffix", STYLE_SUFFIX)
        prompts = {c: tuple(p + suffix.format(c) for p in anchor_prompts) for c in classes if c != anchor}
        prompts[anchor] = anchor_prompts
    elif kind == "nudity":
        # target prompts add the unsafe words to people prompts (as `ablation.concepts.target_prompt`)
        anchor_prompts = tuple(spec["anchor_prompts"])
        prompts = {c: tuple(f"{p}, {c}" for p in anchor_prompts) for c in classes if c != anchor}
        prompts[anchor] = anchor_prompts
    elif kind == "memorization":
        # the memorized caption is its own (only) prompt; the anchor's are paraphrases
        prompts = {c: (c,) for c in classes if c != anchor}
        prompts[anchor] = tuple(spec["anchor_prompts"])
    else:
        templates = tuple(spec["templates"])
        prompts = {c: tuple(t.format(c) for t in templates) for c in classes}
    judge = spec.get("judge", DEFAULT_JUDGE.get(kind, DEFAULT_JUDGE["instance"]))
    judge_texts = {c: judge.format(c) for c in classes}
    judge_texts[anchor] = spec.get("anchor_judge", judge_texts[anchor])
    return ConceptTask(name=name, concept_type=kind, target=target, anchor=anchor, surrounding=surrounding,
                       prompts=prompts, judge_texts=judge_texts, memorized_image=spec.get("memorized_image"),
                       source=source)


def paper_task(name: str) -> ConceptTask:
    """A task of the paper's prompt sets, by name (`grumpy_cat`) or target (`grumpy cat`)."""
    sets = _paper_sets()
    if name not in sets:
        by_target = {spec["target"].lower(): key for key, spec in sets.items()}
        if name.lower() not in by_target:
            raise KeyError(f"no paper prompt set {name!r}; known: {', '.join(sets)}")
        name = by_target[name.lower()]
    return _task_from_spec(name, sets[name], "paper")


def adhoc_task(target: str, anchor: str, concept_type: str = "instance", surrounding: tuple[str, ...] = (),
               anchor_prompts: str | None = None, max_prompts: int = 8) -> ConceptTask:
    """A task for a pair that has no prompt set.

    Prompts come from the training side's resolution (`ablation.concepts.resolve_concept`: the
    run's `anchor_prompts` file, else the list bundled for the anchor word), thinned to `max_prompts`
    evenly spaced ones; these are training prompts, not held-out ones. Without any list, generic
    templates are used.
    """
    from ablation.concepts import resolve_concept, target_prompt
    from ablation.config import ConceptSpec, ConfigError

    try:
        resolved = resolve_concept(ConceptSpec(target, anchor, concept_type, anchor_prompts), toy=False)
        anchors = resolved.anchor_prompts
    except ConfigError:
        anchors = (GENERIC_STYLE_PROMPTS if concept_type == "style"
                   else tuple(t.format(anchor) for t in GENERIC_TEMPLATES))
    step = max(1, len(anchors) // max_prompts)
    anchors = tuple(anchors[::step][:max_prompts])
    prompts = {anchor: anchors}
    for concept in (target, *surrounding):
        prompts[concept] = tuple(dict.fromkeys(target_prompt(p, concept, anchor, concept_type) for p in anchors))
    judge = DEFAULT_JUDGE.get(concept_type, DEFAULT_JUDGE["instance"])
    judge_texts = {c: judge.format(c) for c in (target, *surrounding)}
    judge_texts[anchor] = {"style": "a painting", "instance": f"a photo of a {anchor}"}.get(
        concept_type, f"a photo of {anchor}")
    name = "".join(ch if ch.isalnum() else "_" for ch in target.lower()).strip("_")
    return ConceptTask(name=name, concept_type=concept_type, target=target, anchor=anchor,
                       surrounding=tuple(surrounding), prompts=prompts, judge_texts=judge_texts, source="config")


def find_task(name_or_target: str, *, toy: bool, anchor: str | None = None, concept_type: str = "instance",
              anchor_prompts: str | None = None) -> ConceptTask:
    """Resolve a task by family/set name or target: toy catalogue for toy models, else paper sets.

    `toy/NAME` and `paper/NAME` force the source. Falls back to `adhoc_task` when an anchor is known.

    Raises:
        KeyError: unknown and no anchor to build an ad-hoc task.
    """
    if name_or_target.startswith("toy/"):
        return toy_task(name_or_target[4:])
    if name_or_target.startswith("paper/"):
        return paper_task(name_or_target[6:])
    try:
        return toy_task(name_or_target) if toy else paper_task(name_or_target)
    except KeyError:
        if anchor is None:
            raise
        return adhoc_task(name_or_target, anchor, concept_type, anchor_prompts=anchor_prompts)


# ------------------------------------------------------------------ prompt lists for `ablate generate`


def load_prompts(spec: str, *, toy: bool = False) -> list[str]:
    """Prompts from a file or a prompt-set name.

    Args:
        spec: a `.txt` file (one prompt a line, `#` comments), a `.json`/`.yaml` list of prompts,
            a task name (all its concepts' prompts), or `TASK:CONCEPT` (one concept's prompts).
            Task names resolve as in `find_task`.
        toy: resolve bare task names in the toy catalogue rather than the paper sets.

    Raises:
        KeyError: neither a file nor a known prompt set.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix in (".json", ".yaml", ".yml"):
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise ValueError(f"{path} must hold a list of prompt strings")
            return data
        lines = (line.strip() for line in path.read_text().splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    name, _, concept = spec.partition(":")
    task = find_task(name, toy=toy)
    if concept:
        if concept not in task.prompts:
            raise KeyError(f"{concept!r} is not a concept of {task.name!r}: {', '.join(task.classes)}")
        return list(task.prompts[concept])
    return [p for c in task.classes for p in task.prompts[c]]
