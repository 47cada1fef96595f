"""Toy-world benchmark: several concepts ablated in one run, against one concept's run.

Trains one run per `--set` (each a comma-separated list of `target=anchor` pairs) on the shipped toy model with the
defaults (timed end to end, fresh anchor cache), then judges seeded held-out images of all 31 toy concepts with
both toy judges (base and ablated model, same seeds). Prints one JSON object per set: train seconds, each target's
accuracy (31-way, per judge; and the pairwise target-vs-anchor accuracy of the toy CLIP), the anchors', the worst
drop of a concept outside every target's family and the fraction of those control images whose judged concept
changed:

    python scripts/multi_concept.py --set "grumpy cat=cat" \\
        --set "grumpy cat=cat,van gogh=painting,snoopy=dog,nemo=fish,r2d2=robot" --out docs/toy_multi_concept.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_sweep as fs  # noqa: E402  (the shared image and judge helpers of the fidelity sweep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", required=True, help="target=anchor,target=anchor,... (repeatable)")
    parser.add_argument("--options", default="{}", help="JSON ablate-train options for every set")
    parser.add_argument("--per-concept", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the judged images")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = parser.parse_args(argv)

    import yaml

    from ablation.config import GUIDANCE, build_config
    from ablation.models import load_pipeline
    from ablation.toyworld import catalog
    from ablation.trainer import train

    judges = fs.Judges()
    base_pipe = load_pipeline("toy")
    prompts = fs.concept_prompts(args.per_concept)
    base_images = fs.generate(base_pipe, prompts, args.steps, GUIDANCE)
    base_labels = judges.judge(base_images)
    for spec in args.set:
        pairs = [tuple(p.strip() for p in item.split("=")) for item in spec.split(",")]
        families = [catalog().family_of_target(t) for t, _ in pairs]
        covered = {c for f in families for c in f.classes}
        with tempfile.TemporaryDirectory() as tmp:
            config = build_config(None, {"target": [t for t, _ in pairs], "anchor": [a for _, a in pairs],
                                         "output_dir": str(Path(tmp) / "run"), "checkpointing_steps": 0,
                                         "cache_dir": str(Path(tmp) / "cache"), **json.loads(args.options)})
            start = time.perf_counter()
            result = train(config, pipe=copy.deepcopy(base_pipe))
            seconds = time.perf_counter() - start
            written = yaml.safe_load((Path(tmp) / "run" / "config.yaml").read_text())
        pipe = result.pipeline
        for part in ("text_encoder", "vae"):
            getattr(pipe, part).to("cpu")
        images = fs.generate(pipe, prompts, args.steps, GUIDANCE)
        summary = fs.summarise(base_labels, judges.judge(images), covered)
        record = {"pairs": pairs, "train_seconds": round(seconds, 1), "phase_seconds": result.phase_seconds,
                  "resolved": {k: written.get(k) for k in ("params", "learning_rate", "max_steps",
                                                           "num_anchor_images", "prior_preservation",
                                                           "preserve_uncond")},
                  "per_concept": args.per_concept,
                  "targets": {f.target: {judge: summary[judge]["accuracy"][f.target] for judge in summary}
                              | {"pairwise": [round(judges.pairwise(base_images[f.target], f.target, f.anchor), 3),
                                              round(judges.pairwise(images[f.target], f.target, f.anchor), 3)]}
                              for f in families},
                  "anchors": {f.anchor: {judge: summary[judge]["accuracy"][f.anchor] for judge in summary}
                              for f in families},
                  "controls": {judge: {"worst": summary[judge]["worst_other"],
                                       "changed_fraction": summary[judge]["changed_fraction"]} for judge in summary}}
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
        del pipe, result
    return 0


if __name__ == "__main__":
    sys.exit(main())
