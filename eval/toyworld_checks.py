"""Inpainting and upscaling checks of a toy-world ablation (issue 5): does the target come back?

    python eval/toyworld_checks.py outputs/grumpy-cat --target "grumpy cat"

- inpainting: renders of the anchor in a scene, a centre box masked, the masked region repainted
  with target prompts by the base and by the ablated model (the toy model is a 4-channel
  text-to-image UNet: latent blending); the toy CLIP's target-vs-anchor accuracy of the results;
- upscaling: the ablated model's images for target prompts, downsampled to 16 px and upscaled x4 by
  the toy upscaler *with the target prompt*; the same accuracy before and after upscaling.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

from ablation.evaluation.clip_judge import ClipJudge
from ablation.evaluation.metrics import clip_accuracy
from ablation.evaluation.swap import ablated
from ablation.models import load_pipeline
from ablation.sampling.generate import SamplingSettings, jobs_for, set_scheduler
from ablation.sampling.inpaint import box_mask, inpaint, inpaint_pipeline
from ablation.sampling.upscale import load_upscaler, upscale
from ablation.toyworld import catalog, clip_dir, upscaler_dir
from ablation.toyworld.catalog import HELDOUT_SEED_OFFSET
from ablation.toyworld.render import render_caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="ablation output dir (delta.safetensors)")
    parser.add_argument("--target", required=True, help="toy-world target, e.g. 'grumpy cat'")
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    from ablation.quiet import quiet_libraries

    quiet_libraries()
    fam = catalog().family_of_target(args.target)
    judge = ClipJudge(clip_dir(), device="cpu")
    texts = judge.text_features([catalog().concepts[c].judge_text for c in (fam.target, fam.anchor)])

    def accuracy(images):
        return round(clip_accuracy(judge.image_features(images), texts[0:1], texts[1:2]), 3)

    anchor_prompts = [fam.heldout_prompts[i % len(fam.heldout_prompts)] for i in range(args.images)]
    target_prompts = [fam.target_prompt(p) for p in anchor_prompts]
    settings = SamplingSettings(scheduler="ddim", steps=25, guidance=6.0)
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    painter = inpaint_pipeline(pipe)
    painter.set_progress_bar_config(disable=True)
    result = {"run": args.run, "target": fam.target, "anchor": fam.anchor, "images": args.images}

    # inpainting: one scene per prompt, the centre half repainted with the target prompt
    scenes = [Image.fromarray(render_caption(p, HELDOUT_SEED_OFFSET + i)) for i, p in enumerate(anchor_prompts)]
    mask = box_mask((64, 64), "center", 0.6)
    for name, source in (("base", None), ("ablated", args.run)):
        with ablated(painter, source):
            out = [inpaint(painter, scene, mask, jobs_for([prompt], 1, seed=i), settings)[0].image
                   for i, (scene, prompt) in enumerate(zip(scenes, target_prompts, strict=True))]
        result[f"inpaint_target_accuracy_{name}"] = accuracy(out)

    # upscaling: the ablated model's target images, down to 16 px and back up with the target prompt
    with ablated(pipe, args.run):
        gens = [torch.Generator().manual_seed(HELDOUT_SEED_OFFSET + i) for i in range(args.images)]
        generated = pipe(target_prompts, num_inference_steps=25, guidance_scale=6.0, generator=gens).images
    up = load_upscaler(str(upscaler_dir()), device="cpu")
    up.set_progress_bar_config(disable=True)
    small = [im.resize((16, 16), Image.BOX) for im in generated]
    upscaled = upscale(up, small, target_prompts, steps=25, guidance=6.0)
    result["ablated_target_accuracy_64px"] = accuracy(generated)
    result["after_x4_upscale_with_target_prompt"] = accuracy(upscaled)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
