"""The paper's evaluation protocol (Kumari et al., ICCV 2023) for ablated runs, via `ablation.evaluation`.

Volumes: 200 images for the target and for the anchor concept, 50 per surrounding concept, DDIM
50 steps, guidance 6, fixed seeds; judged with CLIP ViT-B/32 as the official `evaluate.py` (the toy CLIP
and the toy concept classifier for the toy model; `--clip-model openai/clip-vit-large-patch14` for ViT-L/14).

    python eval/paper_protocol.py --ablated outputs/grumpy_cat_sd14 --base CompVis/stable-diffusion-v1-4
    python eval/paper_protocol.py --ablated outputs/toy/van_gogh --family van_gogh --out reports/van_gogh

Any `ablate eval` option can follow (`--dtype fp16`, `--batch-size 16`, `--clip DIR`, ...); the
protocol's volumes and sampler settings come first so that later flags can still override them.
At 512 px on one A100 this is roughly 1,000 images per model and task (about 15 minutes in fp16).
"""

from __future__ import annotations

import sys

from ablation.evaluation.cli import eval_main

PROTOCOL = ["--paper-volumes", "--scheduler", "ddim", "--steps", "50", "--guidance", "6", "--seed", "0"]


def main(argv: list[str] | None = None) -> int:
    """Run `ablate eval` with the paper's volumes and settings, then the caller's flags."""
    return eval_main(PROTOCOL + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
