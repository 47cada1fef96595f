"""How the toy concept classifier judges the base toy model's own generations, concept by concept.

    python eval/toy_classifier_quality.py                       # 32 images per concept, all 31 concepts
    python eval/toy_classifier_quality.py --per-concept 8 --json /tmp/q.json
    python eval/toy_classifier_quality.py --prompts reworded --per-concept 16 \
        --json docs/toy_reworded_quality.json                    # prompts worded unlike any training caption

Images: the shipped toy pipeline (or `--model DIR`), each concept's held-out prompts (`--prompts heldout`: the
catalogue's held-out templates, never trained on; `--prompts reworded`: `ablation.toyworld.rewording`'s
hand-written rewordings, whose frames and words no training caption contains; memorized captions excluded),
DDIM 25 steps, guidance 6, seeds as in `ablate eval` (`seed + 100000 * prompt_index + sample_index`);
cached in `--cache` so that a second run (more images, another judge) regenerates nothing. Judged by
the classifier (31-way) and, for comparison, by the toy CLIP zero-shot over the same 31 concept texts.
Writes one JSON: per concept the fraction judged as the prompted concept and what the misjudged images
were taken for, plus the classifier's held-out accuracy on renders and reconstructions (from its config).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-concept", type=int, default=32, help="images per concept")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", type=Path, default=Path("work_toy_classifier_quality"), help="image cache folder")
    p.add_argument("--classifier", type=Path, default=None, help="classifier folder (default: the shipped one)")
    p.add_argument("--prompts", choices=("heldout", "reworded"), default="heldout")
    p.add_argument("--model", default="toy", help="the pipeline to judge (default: the shipped toy model)")
    p.add_argument("--generate-only", action="store_true", help="fill the cache, judge nothing")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "toy_classifier_quality.json")
    args = p.parse_args(argv)
    if args.per_concept < 1:
        p.error("--per-concept must be >= 1")
    from ablation.quiet import quiet_libraries

    quiet_libraries()
    from ablation.evaluation.collateral import toy_controls, toy_judges
    from ablation.models import load_pipeline
    from ablation.sampling.generate import SamplingSettings, cache_path, generate, set_scheduler
    from ablation.toyworld.catalog import slug

    controls = toy_controls()
    if args.prompts == "reworded":
        from ablation.evaluation.collateral import ControlConcept
        from ablation.toyworld.rewording import heldout_reworded_prompts, reworded_concepts

        keep = set(reworded_concepts())
        controls = [ControlConcept(c.name, heldout_reworded_prompts(c.name), c.judge_text)
                    for c in controls if c.name in keep]
    jobs = [j for c in controls for j in c.jobs(args.per_concept, args.seed)]
    labels = [c.name for c in controls for _ in range(args.per_concept)]
    settings = SamplingSettings(scheduler="ddim", steps=args.steps, guidance=args.guidance)
    pipe = load_pipeline(args.model)
    set_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    model_key = "toy" if args.model == "toy" else slug(str(Path(args.model).resolve()))
    key = f"{model_key}-{args.prompts}-ddim{args.steps}-g{args.guidance:g}"
    samples = generate(pipe, jobs, settings, batch_size=args.batch_size,
                       path_for=lambda j: cache_path(args.cache / key, j),
                       progress=lambda d, t: print(f"generated {d}/{t}", file=sys.stderr, flush=True))
    if args.generate_only:
        return 0
    from ablation.toyworld.classifier import CLASSIFIER_DIR, load_classifier

    classifier = load_classifier(args.classifier) if args.classifier else None
    judges = toy_judges(classifier=classifier)
    verdicts = judges.judge([s.image for s in samples])
    out: dict = {"model": args.model, "prompts": args.prompts, "per_concept": args.per_concept, "steps": args.steps,
                 "guidance": args.guidance, "seed": args.seed,
                 "concepts": {}}
    for judge, said in verdicts.items():
        right = [s == c for s, c in zip(said, labels, strict=True)]
        out[f"{judge}_mean"] = round(sum(right) / len(right), 4)
    for concept in dict.fromkeys(labels):
        idx = [i for i, c in enumerate(labels) if c == concept]
        row = {}
        for judge, said in verdicts.items():
            wrong = Counter(said[i] for i in idx if said[i] != concept)
            row[judge] = round(sum(said[i] == concept for i in idx) / len(idx), 3)
            row[f"{judge}_mistaken_for"] = dict(wrong.most_common())
        out["concepts"][concept] = row
    config = json.loads(((args.classifier or CLASSIFIER_DIR) / "config.json").read_text())
    out["classifier_heldout"] = {k: config["heldout"][k] for k in ("per_concept", "accuracy_renders",
                                                                     "accuracy_reconstructions")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "concepts"}, indent=2))
    for concept, row in out["concepts"].items():
        print(f"{concept:46s} classifier {row['classifier']:.2f}  clip {row['clip']:.2f}  "
              f"{row['classifier_mistaken_for'] or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
