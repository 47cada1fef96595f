"""Toy-world sweep: what an ablation does to its target, its anchor and every other concept.

For each configuration (a set of `ablate train` options) the script trains on the shipped toy model, then
generates the same seeded images for all 31 toy concepts (held-out prompts) with the base and the ablated model,
and judges every image among all concepts. It prints one JSON object per configuration: each concept's accuracy
(base / ablated), the target's and anchor's pairwise accuracy, the worst drop in another family, the fraction of
control images (concepts outside the target's family) whose judged concept changed, and the training time.

    python scripts/fidelity_sweep.py --target "grumpy cat" --anchor cat --per-concept 8 \\
        --sweep '{}' '{"augment": true, "hflip": true}' '{"learning_rate": 5e-5}'
    python scripts/fidelity_sweep.py --target "grumpy cat" nemo --anchor cat fish --per-concept 32   # the defaults

Several `--target` / `--anchor` pairs (in order) share the base model's images; each record names its pair.

Judges: the toy CLIP (31-way argmax over the concepts' judge texts) and, when shipped, the toy classifier.
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
import yaml


def concept_prompts(per_concept: int) -> dict[str, list[str]]:
    """Held-out prompts of every toy concept, `per_concept` of them (cycled), one image each."""
    from ablation.toyworld import catalog

    cat = catalog()
    out: dict[str, list[str]] = {}
    for fam in cat.families.values():
        for concept in fam.classes:
            if concept in out:
                continue
            prompts = list(fam.prompts_for(concept, "heldout"))
            out[concept] = [prompts[i % len(prompts)] for i in range(per_concept)]
    return out


@torch.no_grad()
def generate(pipe, prompts: dict[str, list[str]], steps: int, guidance: float, batch: int = 32) -> dict[str, list]:
    """Seeded images (seed = index within the concept) for every concept."""
    from ablation.sampling.generate import set_scheduler

    set_scheduler(pipe, "ddim")  # SD3 (toy-sd3) keeps its own flow sampler
    pipe.set_progress_bar_config(disable=True)
    flat = [(c, i, p) for c, ps in prompts.items() for i, p in enumerate(ps)]
    images: dict[str, list] = {c: [] for c in prompts}
    for k in range(0, len(flat), batch):
        chunk = flat[k:k + batch]
        gens = [torch.Generator().manual_seed(10_000 + i) for _, i, _ in chunk]
        out = pipe([p for _, _, p in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens)
        for (c, _, _), im in zip(chunk, out.images, strict=True):
            images[c].append(im)
    return images


class Judges:
    """Every judge available on the toy world: name -> function(images) -> concept names."""

    def __init__(self) -> None:
        from ablation.evaluation.clip_judge import ClipJudge
        from ablation.toyworld import catalog, clip_dir

        self.names = list(catalog().concepts)
        clip = ClipJudge(clip_dir(), device="cpu")
        texts = clip.text_features([catalog().concepts[c].judge_text for c in self.names])
        self.judges = {"toy_clip": lambda ims: [self.names[i] for i in (clip.image_features(ims) @ texts.T).argmax(1)]}
        self.pair = (clip, texts)
        try:
            from ablation.toyworld.classifier import load_classifier

            classifier = load_classifier()
            self.judges["classifier"] = lambda ims: list(classifier.predict(ims))
        except Exception as e:  # not shipped yet, or an older checkout
            print(f"(no toy classifier: {e})", file=sys.stderr)

    def pairwise(self, images: list, concept: str, versus: str) -> float:
        """Fraction of images closer to `concept`'s judge text than to `versus`'s (the paper's CLIP accuracy)."""
        clip, texts = self.pair
        a, b = texts[self.names.index(concept)], texts[self.names.index(versus)]
        feats = clip.image_features(images)
        return float(((feats @ a) > (feats @ b)).float().mean())

    def judge(self, images: dict[str, list]) -> dict[str, dict[str, list[str]]]:
        return {name: {c: fn(ims) for c, ims in images.items()} for name, fn in self.judges.items()}


def summarise(base: dict, ablated: dict, family_concepts: set[str]) -> dict:
    """Per judge: accuracy per concept (base, ablated), worst other-family drop, changed-class fraction."""
    out = {}
    for judge, base_labels in base.items():
        abl_labels = ablated[judge]
        acc = {c: (sum(lab == c for lab in base_labels[c]) / len(base_labels[c]),
                   sum(lab == c for lab in abl_labels[c]) / len(abl_labels[c])) for c in base_labels}
        others = [c for c in acc if c not in family_concepts]
        changed = sum(b != a for c in others for b, a in zip(base_labels[c], abl_labels[c], strict=True))
        total = sum(len(base_labels[c]) for c in others)
        worst = max(others, key=lambda c: acc[c][0] - acc[c][1]) if others else None  # no controls left
        out[judge] = {"accuracy": {c: [round(b, 3), round(a, 3)] for c, (b, a) in acc.items()},
                      "worst_other": [worst, round(acc[worst][0] - acc[worst][1], 3)] if worst else None,
                      "changed_fraction": round(changed / max(total, 1), 4)}
    return out


def emit(record: dict, out: Path | None) -> None:
    """Print one JSON line and, with `out`, append it there too (the benchmarks' output)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="toy or toy-sd3")
    parser.add_argument("--target", nargs="+", default=["grumpy cat"], help="target(s), paired with --anchor")
    parser.add_argument("--anchor", nargs="+", default=["cat"])
    parser.add_argument("--per-concept", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--sweep", nargs="+", default=["{}"], help="JSON objects of ablate-train options")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    if len(args.target) != len(args.anchor):
        parser.error("give one --anchor per --target")

    from ablation.config import build_config
    from ablation.models import load_pipeline
    from ablation.toyworld import catalog
    from ablation.trainer import train

    prompts = concept_prompts(args.per_concept)
    judges = Judges()
    base_pipe = load_pipeline(args.model)
    base_images = generate(base_pipe, prompts, args.steps, args.guidance)
    base_labels = judges.judge(base_images)
    for target, anchor in zip(args.target, args.anchor, strict=True):
        fam = catalog().family_of_target(target)
        base_pair = judges.pairwise(base_images[fam.target], fam.target, fam.anchor)
        for spec in args.sweep:
            options = json.loads(spec)
            with tempfile.TemporaryDirectory() as tmp:
                # a fresh anchor cache per configuration: train_seconds include making the anchors
                config = build_config(None, {"target": [target], "anchor": [anchor], "model": args.model,
                                             "output_dir": str(Path(tmp) / "run"), "checkpointing_steps": 0,
                                             "cache_dir": str(Path(tmp) / "cache"), **options})
                start = time.perf_counter()
                result = train(config, pipe=copy.deepcopy(base_pipe))
                seconds = time.perf_counter() - start
                written = yaml.safe_load((Path(tmp) / "run" / "config.yaml").read_text())
            pipe = result.pipeline
            for name in ("text_encoder", "text_encoder_2", "vae"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to("cpu")
            images = generate(pipe, prompts, args.steps, args.guidance)
            resolved = {k: written.get(k) for k in ("params", "learning_rate", "max_steps", "lora_rank",
                                                               "num_anchor_images", "prior_preservation")}
            record = {"target": fam.target, "anchor": fam.anchor, "options": options, "resolved": resolved,
                      "per_concept": args.per_concept, "train_seconds": round(seconds, 1),
                      "phase_seconds": result.phase_seconds,
                      "target_pairwise": [round(base_pair, 3),
                                          round(judges.pairwise(images[fam.target], fam.target, fam.anchor), 3)],
                      **summarise(base_labels, judges.judge(images), set(fam.classes))}
            emit(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
