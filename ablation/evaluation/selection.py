"""Which concepts to evaluate for a run, and which base model it came from.

Targets and anchors come from explicit `--family` / `--target` flags, else from a recipe given with
`--config`, else from each run: its `config.yaml`, or the delta metadata (`concepts`, written by
`ablation.checkpoint`) of a bare delta file. Each pair then gets its surrounding concepts and held-out prompts from the
toy catalogue (toy base model) or the paper's prompt sets; a pair known to neither is evaluated
with generic prompts and no surrounding concepts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ablation.evaluation.prompts import ConceptTask, find_task

Pair = tuple[str, str, str | None, str | None]  # target, anchor, concept type, anchor prompt file


def _metadata(source: str) -> dict[str, str]:
    from ablation.checkpoint import read_metadata, resolve_delta

    return read_metadata(resolve_delta(source)[1])


def pairs_from_config(data: dict) -> list[Pair]:
    """Pairs of a training config (`TrainConfig` keys: `concepts`, or paired `target`/`anchor` lists)."""
    if data.get("concepts"):
        return [(c["target"], c["anchor"], c.get("concept_type") or data.get("concept_type"),
                 c.get("anchor_prompts") or data.get("anchor_prompts")) for c in data["concepts"]]
    targets, anchors = data.get("target") or [], data.get("anchor") or []
    targets = [targets] if isinstance(targets, str) else targets
    anchors = [anchors] if isinstance(anchors, str) else anchors
    if len(targets) != len(anchors):
        raise ValueError(f"config has {len(targets)} targets but {len(anchors)} anchors")
    return [(t, a, data.get("concept_type"), data.get("anchor_prompts")) for t, a in zip(targets, anchors, strict=True)]


def pairs_from_run(source: str) -> list[Pair]:
    """Pairs recorded by a run: `<run>/config.yaml` (it names anchor prompt files), else the delta metadata."""
    config = Path(source) / "config.yaml"
    if config.is_file():
        return pairs_from_config(yaml.safe_load(config.read_text()) or {})
    concepts = json.loads(_metadata(source).get("concepts") or "[]")
    return [(c["target"], c["anchor"], c.get("concept_type"), c.get("anchor_prompts")) for c in concepts]


def default_base(runs: Sequence[str]) -> str:
    """The base model recorded in the first run's metadata, else `toy`."""
    for run in runs:
        base = _metadata(run).get("base_model")
        if base:
            return base
    return "toy"


#: `ablate eval` / `ablation.evaluate` on the toy model: the sampler steps of its quality protocol (docs/toyworld.md)
#: and of its anchor images, and a batch that keeps 2 CPU cores busy on 8x8 latents (8 leaves them waiting on
#: overhead); other models: the paper's 50 DDIM steps, batch 8
TOY_EVAL_STEPS = 25
TOY_EVAL_BATCH = 32


def sampling_defaults(base: str, steps: int | None = None, batch_size: int | None = None) -> tuple[int, int]:
    """(steps, batch size) of an evaluation of `base`: the given values, else the model's defaults (see above)."""
    from ablation.models import is_toy

    toy = is_toy(base)
    return (steps if steps is not None else (TOY_EVAL_STEPS if toy else 50),
            batch_size if batch_size is not None else (TOY_EVAL_BATCH if toy else 8))


def default_out(runs: Sequence[str]) -> Path:
    """`<first run dir>/eval` (the folder holding it for a delta file)."""
    if not runs:
        raise ValueError("pass --out when no --ablated run is given")
    path = Path(runs[0]).expanduser()
    return (path.parent if path.is_file() else path) / "eval"


def select_tasks(base: str, runs: Sequence[str], *, families: Sequence[str] = (), targets: Sequence[str] = (),
                 anchors: Sequence[str] = (), concept_type: str = "instance",
                 config: str | None = None) -> list[ConceptTask]:
    """Resolve the tasks to evaluate (see the module docstring), without duplicates.

    Raises:
        ValueError: nothing to evaluate, or --anchor given without matching --target count.
        KeyError: a family or target is unknown and has no anchor.
    """
    from ablation.models import is_toy

    toy = is_toy(base)
    if anchors and len(anchors) != len(targets):
        raise ValueError(f"got {len(targets)} --target but {len(anchors)} --anchor; pair them in order")
    if families:
        tasks = [find_task(f, toy=toy) for f in families]
    elif targets:
        tasks = [find_task(t, toy=toy, anchor=anchors[i] if anchors else None, concept_type=concept_type)
                 for i, t in enumerate(targets)]
    else:
        if config:
            pairs = pairs_from_config(yaml.safe_load(Path(config).read_text()) or {})
        else:
            pairs = [p for run in runs for p in pairs_from_run(run)]
        tasks = [find_task(t, toy=toy, anchor=a, concept_type=k or "instance", anchor_prompts=f)
                 for t, a, k, f in pairs]
    unique = list({t.name: t for t in tasks}.values())
    if not unique:
        raise ValueError("nothing to evaluate: the runs record no concepts; pass --family, --target or --config")
    return unique


@dataclass
class EvalPlan:
    """What an evaluation runs on, resolved the same way for `ablate eval` and `ablation.evaluate`."""

    base: str
    tasks: list[ConceptTask]
    out: Path
    steps: int
    batch_size: int


def plan_evaluation(runs: Sequence[str], *, base: str | None = None, families: Sequence[str] = (),
                    targets: Sequence[str] = (), anchors: Sequence[str] = (), concept_type: str = "instance",
                    config: str | None = None, out: str | Path | None = None, steps: int | None = None,
                    batch_size: int | None = None) -> EvalPlan:
    """Base model (default: the runs' recorded one), tasks, report folder and the model's sampling defaults.

    Raises:
        ValueError, KeyError, FileNotFoundError: as `select_tasks` / `default_out` (the callers turn them into
            one-line errors).
    """
    base = base or default_base(runs)
    tasks = select_tasks(base, runs, families=families, targets=targets, anchors=anchors,
                         concept_type=concept_type, config=config)
    steps, batch_size = sampling_defaults(base, steps, batch_size)
    return EvalPlan(base, tasks, Path(out) if out else default_out(runs), steps, batch_size)


def refresh_model_cards(runs: Sequence[str]) -> None:
    """Rewrite each run folder's model card so that it shows the new evaluation (delta files have none)."""
    from ablation.model_card import write_model_card

    for run in runs:
        if (Path(run) / "config.yaml").is_file():
            write_model_card(Path(run))
