"""Measure how well the shipped toy-world models do what issue 3 asks, and draw one grid per family.

    python eval/toyworld_quality.py                      # everything, ~5 minutes on 2 CPU cores
    python eval/toyworld_quality.py --samples 8 --skip-upscaler   # a quick look

Prints one JSON object (also written to `--json`) with:
- `clip_renders`: the toy CLIP's zero-shot accuracy within each family on fresh renders with
  held-out seeds and held-out templates (goal >= 0.95 per family);
- `pipeline`: for every concept, the fraction of generated images (held-out prompts, DDIM 25
  steps, guidance 6) that the toy CLIP assigns to the prompted concept within its family (goal >=
  0.85), plus a grid PNG per family;
- `memorization`: the fraction of samples whose CLIP image cosine to the memorized image exceeds
  the threshold, for the memorized caption (goal >= 0.6) and for its paraphrases (goal <= 0.1),
  with the similarity of fresh *renders* of paraphrases as the justification of the threshold;
- `sampling_seconds_32`: wall time to sample 32 images (25 steps, guidance) on this machine;
- `upscaler`: PSNR of the toy x4 upscaler and of bicubic on held-out renders (16 -> 64 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ablation.evaluation.clip_judge import ClipJudge
from ablation.evaluation.metrics import family_accuracy, memorization_rate
from ablation.toyworld import catalog, clip_dir, pipeline_dir, upscaler_dir
from ablation.toyworld.catalog import HELDOUT_SEED_OFFSET
from ablation.toyworld.render import render, render_caption

ROOT = Path(__file__).resolve().parents[1]


def judged_families() -> dict[str, tuple[str, ...]]:
    """Family name -> judge classes; the style families share one class set, so it is judged once."""
    out, seen = {}, set()
    for fam in catalog().families.values():
        if fam.concept_type == "memorization" or frozenset(fam.classes) in seen:
            continue
        seen.add(frozenset(fam.classes))
        out["paintings" if fam.concept_type == "style" else fam.name] = fam.classes
    return out


def prompts(concept: str, family: str, n: int) -> list[str]:
    fam = catalog().families["van_gogh" if family == "paintings" else family]
    held = fam.prompts_for(concept, "heldout")
    return [held[i % len(held)] for i in range(n)]


def sample(pipe, texts: list[str], seed: int, batch: int = 32) -> list[Image.Image]:
    out = []
    for i in range(0, len(texts), batch):
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(texts[i:i + batch]))]
        out += pipe(texts[i:i + batch], num_inference_steps=25, guidance_scale=6.0, generator=gens).images
    return out


def grid(rows: list[list[Image.Image]], labels: list[str], path: Path, cell: int = 64) -> None:
    from PIL import ImageDraw

    label_w = 130
    canvas = Image.new("RGB", (label_w + cell * max(len(r) for r in rows), cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, (row, label) in enumerate(zip(rows, labels, strict=True)):
        draw.text((4, y * cell + cell // 2 - 6), label, fill="black")
        for x, im in enumerate(row):
            canvas.paste(im.resize((cell, cell)), (label_w + x * cell, y * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="images per concept")
    parser.add_argument("--grid-dir", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "toyworld_quality.json")
    parser.add_argument("--threshold", type=float, default=0.9, help="CLIP image cosine of a memorized copy")
    parser.add_argument("--skip-upscaler", action="store_true")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with pipeline/, clip/, upscaler/ (a retrain's --out); default: the shipped one")
    parser.add_argument("--families", default="", help="comma-separated judged families only (a quick look)")
    args = parser.parse_args()
    dirs = {"pipeline": pipeline_dir(), "clip": clip_dir(), "upscaler": upscaler_dir()}
    if args.weights is not None:
        dirs = {name: args.weights / name for name in dirs}
        needed = [name for name in dirs if not (name == "upscaler" and args.skip_upscaler)]
        missing = [str(dirs[name]) for name in needed if not dirs[name].is_dir()]
        if missing:
            parser.error(f"--weights lacks {missing}; give the --out folder of scripts/train_toyworld.py assemble")
    wanted = [f for f in args.families.split(",") if f]
    if set(wanted) - set(judged_families()):
        parser.error(f"--families: unknown {sorted(set(wanted) - set(judged_families()))}; "
                     f"choose from {', '.join(judged_families())}")
    torch.manual_seed(0)
    from diffusers import StableDiffusionPipeline

    judge = ClipJudge(dirs["clip"], device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(dirs["pipeline"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cat = catalog()
    result: dict = {"clip_renders": {}, "pipeline": {}, "memorization": {}, "samples_per_concept": args.samples}

    for family, classes in judged_families().items():
        if wanted and family not in wanted:
            continue
        texts = judge.text_features([cat.concepts[c].judge_text for c in classes])
        render_acc, rows = [], []
        for ci, concept in enumerate(classes):
            ps = prompts(concept, family, args.samples)
            renders = [Image.fromarray(render_caption(p, HELDOUT_SEED_OFFSET + i)) for i, p in enumerate(ps)]
            render_acc.append(family_accuracy(judge.image_features(renders), texts, ci))
            images = sample(pipe, ps, seed=HELDOUT_SEED_OFFSET)
            result["pipeline"][concept] = round(family_accuracy(judge.image_features(images), texts, ci), 3)
            rows.append(images[:10])
            print(f"{family:12s} {concept:18s} renders {render_acc[-1]:.2f} "
                  f"generated {result['pipeline'][concept]:.2f}", file=sys.stderr, flush=True)
        result["clip_renders"][family] = round(float(np.mean(render_acc)), 3)
        grid(rows, list(classes), args.grid_dir / f"toyworld_{family}.png")

    for fam in (f for f in cat.families.values() if f.concept_type == "memorization" and not wanted):
        reference = judge.image_features([Image.fromarray(render(fam.target, 0))])
        memorized = sample(pipe, [fam.target] * args.samples, seed=HELDOUT_SEED_OFFSET)
        para = [fam.heldout_prompts[i % len(fam.heldout_prompts)] for i in range(args.samples)]
        paraphrased = sample(pipe, para, seed=HELDOUT_SEED_OFFSET)
        para_renders = [Image.fromarray(render_caption(p, HELDOUT_SEED_OFFSET + i)) for i, p in enumerate(para)]
        render_sims = (judge.image_features(para_renders) @ reference.T).squeeze(1)
        result["memorization"][fam.name] = {
            "caption": fam.target,
            "memorized_rate": round(memorization_rate(judge.image_features(memorized), reference, args.threshold), 3),
            "paraphrase_rate": round(memorization_rate(judge.image_features(paraphrased), reference, args.threshold),
                                     3),
            "threshold": args.threshold,
            "paraphrase_render_similarity_max": round(float(render_sims.max()), 3),
            "paraphrase_render_similarity_mean": round(float(render_sims.mean()), 3),
        }
        grid([memorized[:10], paraphrased[:10]], ["memorized caption", "paraphrases"],
             args.grid_dir / f"toyworld_{fam.name}.png")

    start = time.perf_counter()
    sample(pipe, ["a photo of a cat"] * 32, seed=0)
    result["sampling_seconds_32"] = round(time.perf_counter() - start, 2)
    result["torch_threads"] = torch.get_num_threads()

    if not args.skip_upscaler:
        from ablation.sampling.upscale import load_upscaler, toy_heldout_pairs, upscaler_psnr

        up = load_upscaler(str(dirs["upscaler"]), device="cpu")
        captions, pairs = toy_heldout_pairs(32)
        # one step = the UNet's posterior-mean estimate (the PSNR setting); 25 steps = a sample, sharper, lower PSNR
        one = upscaler_psnr(up, pairs, captions, steps=1, guidance=1.0)
        sampled = upscaler_psnr(up, pairs, captions, steps=25, guidance=1.0)
        result["upscaler"] = {"psnr_upscaler_1_step_db": round(one.psnr_upscaler, 2),
                              "psnr_upscaler_25_steps_db": round(sampled.psnr_upscaler, 2),
                              "psnr_bicubic_db": round(one.psnr_bicubic, 2), "pairs": one.num_pairs}

    if wanted:  # a quick look is not a verdict on the thresholds
        result["partial"] = wanted
    else:
        result["pass"] = {
            "clip_renders_ge_0.95": all(v >= 0.95 for v in result["clip_renders"].values()),
            "pipeline_ge_0.85": all(v >= 0.85 for v in result["pipeline"].values()),
            "memorized_ge_0.6": all(m["memorized_rate"] >= 0.6 for m in result["memorization"].values()),
            "paraphrase_le_0.1": all(m["paraphrase_rate"] <= 0.1 for m in result["memorization"].values()),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
