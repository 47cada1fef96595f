"""Writing an evaluation: `report.json`, `report.md`, comparison grids and a CLIP-accuracy chart."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ablation.evaluation.prompts import ConceptTask

logger = logging.getLogger(__name__)
TILE = 128  # grid tile size in pixels: readable for 64 px toy images, small for 512 px ones
LABEL_WIDTH = 220
METRIC_NAMES = {"clip_accuracy": "CLIP accuracy", "family_accuracy": "family accuracy",
                "classifier_accuracy": "classifier accuracy", "clip_score": "CLIP score",
                "memorization_rate": "memorization rate", "kid_vs_base": "KID vs base"}


def write_report(report: dict, out_dir: Path, tasks: Sequence[ConceptTask],
                 paths: Mapping[str, Mapping[tuple[str, str], Sequence[tuple[str, Path]]]],
                 grid_prompts: int = 2) -> None:
    """Write every output file and record their names in `report["files"]`.

    Args:
        report: the report dict from `evaluate` (updated in place with `files`).
        out_dir: destination folder.
        tasks: the evaluated tasks.
        paths: model name -> (task, concept) -> (prompt, image path) in job order.
        grid_prompts: prompts per concept shown in each grid.
    """
    from ablation.io import json_safe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {"json": "report.json", "markdown": "report.md", "grids": [], "chart": None}
    for run in report["comparison"]:
        for task in tasks:
            name = f"grid_{_safe(run)}_{_safe(task.name)}.png"
            comparison_grid(task, paths["base"], paths[run], run, grid_prompts).save(out_dir / name)
            files["grids"].append(name)
    chart = accuracy_chart(report, out_dir / "clip_accuracy.png")
    files["chart"] = chart.name if chart else None
    report["files"] = files
    (out_dir / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _judge_label(clip_model: str) -> str:
    """The shipped toy CLIP by its place in the package, not by this machine's absolute path."""
    from pathlib import Path

    from ablation.toyworld import WEIGHTS_DIR

    try:
        if Path(clip_model).resolve() == (WEIGHTS_DIR / "clip").resolve():
            return "toy CLIP (`ablation/toyworld/weights/clip`)"
    except OSError:
        pass
    return f"`{clip_model}`"


def markdown(report: dict) -> str:
    """The human-readable report: settings, then per ablated run one table per task."""
    s = report["settings"]
    sampling = s["sampling"]
    lines = [
        "# Concept ablation evaluation", "",
        f"- base model: `{report['base_model']}`",
        f"- judge: {_judge_label(report['clip_model'])}"
        + (f" and the toy concept classifier (`{report['classifier']}`)" if report.get("classifier") else "")
        + f" (device {report['device']})",
        f"- sampling: {sampling['scheduler']}, {sampling['steps']} steps, guidance {sampling['guidance']}, "
        f"seed {s['seed']} ({report['seed_formula']})",
        "- images per concept: " + (f"{s['images_per_role']}" if s["images_per_role"]
                                     else f"{s['samples_per_prompt']} per prompt"),
        "",
        "CLIP accuracy: fraction of images CLIP assigns to the concept rather than to `versus` (the anchor; for "
        "the anchor, the target). Family accuracy: fraction whose most similar class text, over the whole family, "
        "is the prompted concept. CLIP score: 2.5 * max(cos(image, prompt), 0). KID: unbiased MMD^2 between the "
        "base and the ablated model's CLIP image features for the same prompts and seeds (0 = same distribution). "
        "Classifier accuracy (toy world): fraction the toy concept classifier, over all 31 toy concepts, "
        "assigns to the prompted concept. "
        "A good ablation drives the target's accuracy down and leaves anchor and surrounding rows unchanged.", "",
    ]
    if not report["comparison"]:
        lines += ["## base model", "", "| task | concept | role | CLIP acc. | family acc. | CLIP score |",
                  "|---|---|---|---|---|---|"]
        for task, concepts in report["results"]["base"].items():
            for concept, v in concepts.items():
                lines.append(f"| {task} | {concept} | {v['role']} | {_fmt(v['clip_accuracy'])} | "
                             f"{_fmt(v['family_accuracy'])} | {_fmt(v['clip_score'])} |")
        lines.append("")
    for model in report["models"][1:]:
        run = model["name"]
        lines += [f"## {run}", "", f"ablation: `{model['delta']}`", ""]
        rows = report["comparison"][run]
        for task in dict.fromkeys(r["task"] for r in rows):
            lines += [f"### {task}", "", "| concept | role | metric | base | ablated | change |",
                      "|---|---|---|---|---|---|"]
            for r in (r for r in rows if r["task"] == task):
                lines.append(f"| {r['concept']} | {r['role']} | {METRIC_NAMES[r['metric']]} | {_fmt(r['base'])} | "
                             f"{_fmt(r['ablated'])} | {_fmt(r['change'], signed=True)} |")
            lines.append("")
    lines += collateral_markdown(report)
    files = report.get("files") or {}
    if files.get("grids"):
        lines += ["## Grids (rows: prompts; columns: base | ablated)", ""]
        lines += [f"![{g}]({g})" for g in files["grids"]] + [""]
    if files.get("chart"):
        lines += ["## CLIP accuracy", "", f"![CLIP accuracy]({files['chart']})", ""]
    return "\n".join(lines)


def collateral_markdown(report: dict) -> list[str]:
    """The collateral-damage section: control concepts outside the tasks, base vs each run, both judges."""
    col = report.get("collateral")
    if not col:
        return []
    judges = col["judges"]
    lines = ["## Collateral damage (concepts outside the evaluated tasks)", "",
             f"{len(col['controls'])} control concepts, images per concept: {col['per_concept']}, the same prompts "
             "and seeds for base and ablated. Accuracy: fraction judged as the prompted concept (" +
             " and ".join({"classifier": "toy concept classifier, 31-way", "clip": "CLIP, zero-shot over "
                           f"{len(col['clip_labels'])} concept texts"}[j] for j in judges) +
             "); changed: fraction of image pairs whose judged concept differs.", ""]
    if not col["runs"]:
        lines += ["| concept | " + " | ".join(f"{j} base" for j in judges) + " |", "|---" * (1 + len(judges)) + "|"]
        for concept, row in col["base"]["concepts"].items():
            lines.append(f"| {concept} | " + " | ".join(_fmt(row[j]["base"]) for j in judges) + " |")
        return lines + [""]
    for run, summary in col["runs"].items():
        changed = ", ".join(f"{j} {summary['changed_fraction'][j]:.3f}" for j in judges)
        lines += [f"### {run}", "", f"Changed judged concept over {summary['num_images']} control images: {changed}.",
                  "", "| concept | " + " | ".join(f"{j} base | {j} ablated | {j} changed" for j in judges) + " |",
                  "|---" * (1 + 3 * len(judges)) + "|"]
        for concept, row in summary["concepts"].items():
            cells = " | ".join(f"{_fmt(row[j]['base'])} | {_fmt(row[j]['ablated'])} | {_fmt(row[j]['changed'])}"
                               for j in judges)
            lines.append(f"| {concept} | {cells} |")
        lines.append("")
    return lines


def comparison_grid(task: ConceptTask, base: Mapping[tuple[str, str], Sequence[tuple[str, Path]]],
                    ablated: Mapping[tuple[str, str], Sequence[tuple[str, Path]]], run: str,
                    prompts_per_concept: int = 2, tile: int = TILE) -> Image.Image:
    """A grid whose rows are prompts (first sample of each) and columns base | ablated."""
    rows = []
    for concept in task.classes:
        seen: list[str] = []
        for i, (prompt, path) in enumerate(base[(task.name, concept)]):
            if prompt in seen:
                continue
            seen.append(prompt)
            rows.append((f"[{task.role(concept)}] {prompt}", path, ablated[(task.name, concept)][i][1]))
            if len(seen) >= prompts_per_concept:
                break
    font = ImageFont.load_default()
    header = 16
    grid = Image.new("RGB", (LABEL_WIDTH + 2 * tile, header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((LABEL_WIDTH + 4, 2), "base", fill="black", font=font)
    draw.text((LABEL_WIDTH + tile + 4, 2), run[:20], fill="black", font=font)
    for r, (label, base_path, ablated_path) in enumerate(rows):
        y = header + r * tile
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(label, 34)[:8]), fill="black", font=font)
        for c, path in enumerate((base_path, ablated_path)):
            with Image.open(path) as im:
                grid.paste(im.convert("RGB").resize((tile, tile)), (LABEL_WIDTH + c * tile, y))
    return grid


def accuracy_chart(report: dict, path: Path) -> Path | None:
    """Bar chart of CLIP accuracy per concept, base vs each run; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the CLIP accuracy chart (pip install 'ablation[plots]')")
        return None
    models = [m["name"] for m in report["models"]]
    labels = [(t, c) for t, concepts in report["results"]["base"].items() for c in concepts]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * len(models)), 4))
    for k, name in enumerate(models):
        values = [report["results"][name][t][c]["clip_accuracy"] for t, c in labels]
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([c for _, c in labels], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("CLIP accuracy (concept vs versus)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
