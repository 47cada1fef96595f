"""Toy-world robustness table: every attack on plain and `--robust` ablations, with what the ablation costs.

For each target and training mode the script trains on the shipped toy model (timed end to end with a fresh
anchor cache), measures the ablation's fidelity on seeded held-out images of all 31 toy concepts (base and ablated
model, same seeds; both toy judges: target, anchor, surrounding, the worst other-family drop, the fraction of
control images whose judged concept changed, KID of the control images' CLIP features), then runs every attack of
`ablate attack` with pinned budgets and seeds. It prints one JSON object per (target, mode) and appends it to
`--out`:

    python scripts/robustness_table.py --target "grumpy cat" "van gogh" r2d2 nemo \\
        "the iconic lighthouse at dawn poster" --anchor cat painting robot fish lighthouse \\
        --mode plain robust --out docs/toy_robustness.jsonl

`--num-prompts 8 --num-samples 4` (the defaults) give 32 images per attack cell, so one image is 0.03.
`--robust-options` are the `ablate train` options of the robust mode (default: just `robust: true`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_sweep as fs  # noqa: E402  (the shared image and judge helpers of the fidelity sweep)


def fidelity(judges: fs.Judges, base_images: dict, images: dict, family: set[str], target: str, anchor: str) -> dict:
    """Both judges' summary, the target's pairwise accuracy and KID of the control images (CLIP features)."""
    from ablation.evaluation.metrics import kid

    base_labels, labels = judges.judge(base_images), judges.judge(images)
    out = fs.summarise(base_labels, labels, family)
    clip, _ = judges.pair
    others = [c for c in images if c not in family]
    a = clip.image_features([im for c in others for im in base_images[c]])
    b = clip.image_features([im for c in others for im in images[c]])
    mean, std = kid(a, b, num_subsets=50, subset_size=len(a))
    out["kid_controls"] = [round(mean, 5), round(std, 5)]
    out["target_pairwise"] = [round(judges.pairwise(base_images[target], target, anchor), 3),
                              round(judges.pairwise(images[target], target, anchor), 3)]
    return out


def attacks(run_dir: Path, out_dir: Path, base_pipe, judge, num_prompts: int, num_samples: int) -> dict:
    """Every attack with its default budget, pinned seed 0; the compact result per attack."""
    from ablation.attacks import ATTACKS, AttackSettings, run_attacks

    report = run_attacks(AttackSettings(ablated=str(run_dir), attacks=tuple(ATTACKS), out=str(out_dir),
                                        num_prompts=num_prompts, num_samples=num_samples, device="cpu"),
                         pipe=copy.deepcopy(base_pipe), judge=judge)
    rows = {}
    for a in report["attacks"]:
        row = {"asr": a["asr"], "seconds": a["wall_seconds"], "budget": a["budget"]}
        if a["attack"] == "relearn":
            row["steps_to_recover"] = a["details"]["steps_to_recover"]
            row["curve"] = [[p["step"], p["target_accuracy"]] for p in a["details"]["curve"]]
        rows[a["attack"]] = row
    return {"plain": report["plain"], "attacks": rows, "command": report["settings"]["command"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", nargs="+", default=["grumpy cat"])
    parser.add_argument("--anchor", nargs="+", default=["cat"])
    parser.add_argument("--mode", nargs="+", default=["plain", "robust"], choices=["plain", "robust"])
    parser.add_argument("--robust-options", default='{"robust": true}', help="JSON ablate-train options of --robust")
    parser.add_argument("--per-concept", type=int, default=16, help="fidelity images per toy concept")
    parser.add_argument("--fidelity-steps", type=int, default=10, help="DDIM steps of the fidelity images")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs and attack reports here")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    if len(args.target) != len(args.anchor):
        parser.error("give one --anchor per --target")

    from ablation.config import GUIDANCE, build_config
    from ablation.evaluation.clip_judge import ClipJudge
    from ablation.models import load_pipeline
    from ablation.toyworld import catalog, clip_dir
    from ablation.trainer import train

    judges = fs.Judges()
    judge = ClipJudge(clip_dir(), device="cpu")
    base_pipe = load_pipeline("toy")
    prompts = fs.concept_prompts(args.per_concept)
    base_images = fs.generate(base_pipe, prompts, args.fidelity_steps, GUIDANCE)
    keep = args.keep or Path(tempfile.mkdtemp(prefix="robustness_table_"))
    for target, anchor in zip(args.target, args.anchor, strict=True):
        fam = catalog().family_of_target(target)
        for mode in args.mode:
            options = json.loads(args.robust_options) if mode == "robust" else {}
            name = f"{fam.name}-{mode}"
            run_dir = keep / "runs" / name
            with tempfile.TemporaryDirectory() as cache:  # cold anchor cache: the time includes the anchors
                config = build_config(None, {"target": [target], "anchor": [anchor], "output_dir": str(run_dir),
                                             "overwrite": True, "checkpointing_steps": 0, "cache_dir": cache,
                                             **options})
                start = time.perf_counter()
                result = train(config, pipe=copy.deepcopy(base_pipe))
                seconds = time.perf_counter() - start
            pipe = result.pipeline
            for part in ("text_encoder", "vae"):
                getattr(pipe, part).to("cpu")
            images = fs.generate(pipe, prompts, args.fidelity_steps, GUIDANCE)
            del pipe, result
            torch.manual_seed(0)
            record = {"target": fam.target, "anchor": fam.anchor, "mode": mode, "options": options,
                      "train_seconds": round(seconds, 1),
                      "fidelity": {"per_concept": args.per_concept, "steps": args.fidelity_steps,
                                   **fidelity(judges, base_images, images, set(fam.classes), fam.target, fam.anchor)},
                      **attacks(run_dir, keep / "attacks" / name, base_pipe, judge, args.num_prompts,
                                args.num_samples)}
            fs.emit(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
