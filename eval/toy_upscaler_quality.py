"""PSNR of the toy x4 upscaler against bicubic interpolation on held-out renders (issue 13's bar: >= 1 dB).

    python eval/toy_upscaler_quality.py                          # the shipped upscaler
    python eval/toy_upscaler_quality.py --model DIR --json out.json

The benchmark is `ablation.sampling.upscale.toy_heldout_pairs`: held-out renders of every family (held-out
caption templates and seeds), 64 px, and their 16 px box-filtered reductions; the first 32 are the test set of
`tests/test_toyworld_model.py`, renders 32-159 a second set that no choice was made on. Settings: one DDIM step
without guidance (the UNet's estimate from pure noise, its posterior mean), 5 and 25 steps without guidance
(samples) and `ablate upscale`'s defaults (50 steps, guidance 6); noise level 20 (the pipeline's default).
Also the x4 VAE's own reconstruction (its encode/decode ceiling). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ablation.evaluation.metrics import psnr
from ablation.sampling.upscale import load_upscaler, toy_heldout_pairs, upscaler_psnr
from ablation.toyworld import upscaler_dir

SETTINGS = {"1_step": dict(steps=1, guidance=1.0), "5_steps": dict(steps=5, guidance=1.0),
            "25_steps": dict(steps=25, guidance=1.0), "cli_default_50_steps_guidance_6": dict(steps=50, guidance=6.0)}


@torch.no_grad()
def vae_ceiling(vae, pairs) -> float:
    """Mean PSNR of decode(encode(x)) (latent mode) over the pairs' ground truth."""
    x = torch.stack([torch.from_numpy(np.asarray(h, dtype=np.float32)).permute(2, 0, 1) for _, h in pairs]) / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    out = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([psnr(Image.fromarray(o), h) for o, (_, h) in zip(out, pairs, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="upscaler folder (default: the shipped toy upscaler)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    from ablation.quiet import quiet_libraries

    quiet_libraries()
    up = load_upscaler(args.model or str(upscaler_dir()), device="cpu")
    captions, pairs = toy_heldout_pairs(160)
    sets = {"test_0_31": (captions[:32], pairs[:32]), "second_32_159": (captions[32:], pairs[32:])}
    result = {"model": args.model or "shipped", "noise_level": 20, "torch_threads": torch.get_num_threads()}
    for name, (caps, prs) in sets.items():
        row = {"bicubic_db": None, "vae_ceiling_db": round(vae_ceiling(up.vae, prs), 2)}
        for label, kwargs in SETTINGS.items():
            if name != "test_0_31" and label == "cli_default_50_steps_guidance_6":
                continue
            start = time.perf_counter()
            score = upscaler_psnr(up, prs, caps, batch_size=16, **kwargs)
            row["bicubic_db"] = round(score.psnr_bicubic, 2)
            row[label] = {"psnr_db": round(score.psnr_upscaler, 2), "gain_db": round(score.gain, 2),
                          "seconds": round(time.perf_counter() - start, 1)}
        result[name] = row
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
