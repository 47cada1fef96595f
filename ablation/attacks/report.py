"""Writing an attack run: `attack.json`, `attack.md`, one image grid per attack, learned tensors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ablation.attacks.replay import tensor_file
from ablation.io import json_safe

TILE = 96
LABEL = 170


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2f}"


def grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], columns: int = 8) -> Image.Image:
    """Labelled rows of image tiles (the first `columns` images of each row)."""
    canvas = Image.new("RGB", (LABEL + TILE * columns, TILE * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        draw.multiline_text((4, r * TILE + 4), label.replace(" / ", "\n"), fill="black", font=font)
        for c, image in enumerate(list(images)[:columns]):
            canvas.paste(image.convert("RGB").resize((TILE, TILE)), (LABEL + c * TILE, r * TILE))
    return canvas


def markdown(report: dict) -> str:
    """The human-readable report."""
    s = report["settings"]
    lines = [
        "# Attack report: can the concept come back?", "",
        f"- base model: `{report['base_model']}`; ablation: `{report['ablated']}`",
        f"- task: {report['task']['target']} -> {report['task']['anchor']} ({report['task']['concept_type']})",
        f"- judge: `{report['judge']}`; sampling {s['sampling']['scheduler']}, {s['sampling']['steps']} steps, "
        f"guidance {s['sampling']['guidance']}; seed {s['seed']}; {s['num_prompts']} target prompts x "
        f"{s['num_samples']} images; {s['num_references']} reference images of the target from the base model",
        "",
        "ASR (attack success rate): fraction of images the judge assigns to the target rather than the anchor. "
        "`plain`: the unattacked target prompts. `attacked`: the attack's prompts or embeddings (found on the "
        "ablated model) rendered by each model. Cost: the attack's own search or training (seconds, UNet "
        "forward calls / rows / backward passes, text-encoder calls), without rendering the evaluation images.",
        "",
        "Pre-attack and post-attack ASR, as the UnlearnDiffAtk table defines them:", "",
        f"- pre-attack: {report['asr_definition']['pre_attack']}",
        f"- post-attack: {report['asr_definition']['post_attack']}",
        "",
        f"Pinned: `{s['command']}`" + (f" (replayed from `{s['replayed_from']}`)" if s.get("replayed_from") else ""),
        "",
        "| attack | budget | plain, base | plain, ablated (pre-attack) | attacked, base | attacked, ablated | "
        "post-attack | seconds | UNet fwd (rows) | UNet bwd | text enc. fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = report["plain"]
    for a in report["attacks"]:
        c = a["cost"]
        lines.append(f"| {a['attack']} | {a['budget']} {a['budget_unit']} | {_fmt(plain['base'])} | "
                     f"{_fmt(plain['ablated'])} | {_fmt(a['asr']['base'])} | {_fmt(a['asr']['ablated'])} | "
                     f"{_fmt(a['asr'].get('post_attack'))} | {c['seconds']:.1f} | "
                     f"{c['unet_forward']} ({c['unet_forward_rows']}) | {c['unet_backward']} | "
                     f"{c['text_encoder_forward']} |")
    lines.append("")
    for a in report["attacks"]:
        lines += [f"## {a['attack']}", "", f"![{a['attack']}]({a['grid']})", ""]
        d = a.get("details", {})
        if a["attack"] == "relearn":
            lines += [f"Group `{d['group']}`, lr {d['learning_rate']:g}; recovered (target accuracy >= "
                      f"{d['threshold']:.2f}, half the base model's) after "
                      f"{d['steps_to_recover'] if d['steps_to_recover'] is not None else 'no'} steps "
                      f"(of {a['budget']}).", "", "| step | target accuracy |", "|---|---|"]
            lines += [f"| {p['step']} | {_fmt(p['target_accuracy'])} |" for p in d["curve"]]
            lines.append("")
            continue
        if a["attack"] == "prompts" and "per_category" in d:  # a replay renders the prompts without their categories
            lines += ["| category | ASR base | ASR ablated |", "|---|---|---|"]
            per = d["per_category"]
            lines += [f"| {k} | {_fmt(per['base'][k])} | {_fmt(per['ablated'][k])} |" for k in per["ablated"]]
            lines.append("")
        lines += ["Prompts:", ""]
        for p in a["prompts"][:24]:
            extra = ""
            if "asr_ablated" in p:
                extra = f" (base {_fmt(p['asr_base'])}, ablated {_fmt(p['asr_ablated'])})"
            elif "nearest_tokens" in p:
                extra = f" (nearest tokens of the prefix: `{p['nearest_tokens']}`)"
            lines.append(f"- `{p['prompt']}`{extra}")
        lines.append("")
    return "\n".join(lines)


def write(report: dict, out: Path, gallery: dict, tensors: dict) -> None:
    """Grids, tensors (safetensors), `attack.json`, `attack.md` into `out` (a fresh folder)."""
    from safetensors.torch import save_file

    out = Path(out)
    for a in report["attacks"]:
        name = a["attack"].replace("-", "_")
        rows = [("plain / base", gallery.get("plain/base", [])), ("plain / ablated", gallery.get("plain/ablated", []))]
        rows += [(f"{a['attack']} / {m}", gallery[f"{name}/{m}"]) for m in ("base", "ablated")
                 if f"{name}/{m}" in gallery]
        a["grid"] = f"grid_{name}.png"
        grid(rows).save(out / a["grid"])
        if tensors.get(a["attack"]):
            a["tensors"] = tensor_file(a["attack"])
            save_file({k: v.contiguous() for k, v in tensors[a["attack"]].items()}, str(out / a["tensors"]))
    (out / "attack.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (out / "attack.md").write_text(markdown(report))
