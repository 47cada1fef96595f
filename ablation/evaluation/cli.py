"""`ablate generate | inpaint | upscale | eval`: argument parsing and the thin programs around the library.

Each `*_main(argv) -> int` parses, builds, runs and writes; the work is in the sibling modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from ablation.config import GUIDANCE
from ablation.evaluation.selection import TOY_EVAL_BATCH, TOY_EVAL_STEPS

logger = logging.getLogger("ablation.evaluation")


# ------------------------------------------------------------------ shared options


def _add_sampling(p: argparse.ArgumentParser, steps: int | None = 50, guidance: float | None = GUIDANCE,
                  batch_size: int | None = 8, steps_help: str | None = None, batch_help: str | None = None,
                  guidance_help: str | None = None) -> None:
    from ablation.sampling.generate import SCHEDULERS

    g = p.add_argument_group("sampling")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="sampler (default: ddim, as the paper)")
    g.add_argument("--steps", type=int, default=steps, help=steps_help or f"denoising steps (default: {steps})")
    g.add_argument("--guidance", type=float, default=guidance,
                   help=guidance_help or f"classifier-free guidance (default: {guidance})")
    g.add_argument("--seed", type=int, default=0, help="base seed; image seed = seed + 100000*prompt + sample")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=batch_help or f"images per pipeline call (default: {batch_size})")
    g.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="generator precision")


def _sampling(args):
    from ablation.sampling.generate import SamplingSettings

    return SamplingSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, height=args.height,
                            width=args.width, negative_prompt=args.negative_prompt)


def _setup_logging() -> None:
    import os

    from ablation.quiet import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # our lines stay plain (quiet's is a no-op then)
    # loading bars, the torch_dtype FutureWarning, bitsandbytes' kernel note: the libraries' own switches
    quiet_libraries(verbose=bool(os.environ.get("ABLATION_VERBOSE")))
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(model: str, args, pipeline_fn=None):
    """Load the base pipeline onto the device with the chosen scheduler (one load per program)."""
    import torch

    from ablation.evaluation.clip_judge import auto_device
    from ablation.evaluation.evaluate import DTYPES
    from ablation.models import load_pipeline
    from ablation.sampling.generate import set_scheduler

    device = torch.device(args.device) if args.device else auto_device()
    pipe = load_pipeline(model, torch_dtype=DTYPES[args.dtype]).to(device)
    if pipeline_fn is not None:
        pipe = pipeline_fn(pipe)
    set_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


def _fail(message: str) -> int:
    print(f"ablate: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ generate


def generate_main(argv: list[str]) -> int:
    """`ablate generate`: text-to-image samples for prompts, PNGs + manifest."""
    p = argparse.ArgumentParser(prog="ablate generate", description="Sample images for a prompt set with fixed "
                                "seeds (independent of the batch size) and write them with a manifest.")
    p.add_argument("--model", default="toy", help="`toy`, a diffusers directory or a hub id (default: toy)")
    p.add_argument("--delta", default=None, help="ablation to apply: delta file, run dir, LoRA dir or pipeline dir")
    p.add_argument("--prompts", action="append", default=[],
                   help="prompt file (.txt/.json/.yaml) or prompt set (`grumpy_cat`, `grumpy_cat:persian cat`, "
                        "`toy/van_gogh`); repeatable")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--num-samples", type=int, default=4, help="images per prompt")
    p.add_argument("--out", required=True, help="output folder")
    _add_sampling(p)
    args = p.parse_args(argv)
    _setup_logging()
    from ablation.evaluation.prompts import load_prompts
    from ablation.evaluation.swap import ablated
    from ablation.models import is_toy
    from ablation.sampling.generate import generate, jobs_for, write_manifest

    try:
        prompts = [q for spec in args.prompts for q in load_prompts(spec, toy=is_toy(args.model))] + args.prompt
    except (KeyError, ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    if not prompts:
        return _fail("no prompts: pass --prompts FILE|SET or --prompt TEXT")
    if args.num_samples < 1:
        return _fail("--num-samples must be >= 1")
    settings = _sampling(args)
    if args.delta:  # a missing or damaged delta fails here, before any model is loaded or folder made
        from ablation.checkpoint import resolve_delta

        try:
            resolve_delta(args.delta)
        except (ValueError, FileNotFoundError) as err:
            return _fail(str(err))
    try:
        pipe, device = _load(args.model, args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError: offline hub, unreadable single file, ...
        return _fail(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(prompts, args.num_samples, args.seed)
    with ablated(pipe, args.delta):
        samples = generate(pipe, jobs, settings, batch_size=args.batch_size, reuse=False,
                           path_for=lambda j: out / f"{j.prompt_index:04d}_{j.sample_index:03d}.png",
                           progress=lambda d, t: logger.info("generated %d/%d", d, t))
    info = {"model": args.model, "delta": args.delta, "settings": asdict(settings), "device": device.type,
            "dtype": args.dtype}
    write_manifest(out, samples, info)
    logger.info("wrote %d images and manifest.jsonl to %s", len(samples), out)
    return 0


# ------------------------------------------------------------------ inpaint


def inpaint_main(argv: list[str]) -> int:
    """`ablate inpaint`: repaint a masked region with a prompt (9-channel or ordinary 4-channel UNets)."""
    p = argparse.ArgumentParser(prog="ablate inpaint", description="Inpaint a masked region of an image. Works "
                                "with inpainting (9-channel) models and, by latent blending, with ordinary "
                                "text-to-image models; --delta applies a text-to-image ablation to either.")
    p.add_argument("--model", default="toy", help="`toy`, a diffusers directory or a hub id (default: toy)")
    p.add_argument("--delta", default=None, help="ablation to apply: delta file, run dir, LoRA dir or pipeline dir")
    p.add_argument("--image", required=True, help="input image")
    mask = p.add_mutually_exclusive_group(required=True)
    mask.add_argument("--mask", help="mask image (white = repaint)")
    mask.add_argument("--mask-box", choices=("center", "random"), help="rectangular mask instead of a file")
    p.add_argument("--mask-fraction", type=float, default=0.5, help="side of the --mask-box as a fraction")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="images per prompt")
    p.add_argument("--strength", type=float, default=1.0, help="1.0: ignore the masked content")
    p.add_argument("--paste-back", action="store_true", help="keep the original pixels outside the mask exactly")
    p.add_argument("--out", required=True, help="output folder")
    _add_sampling(p)
    args = p.parse_args(argv)
    _setup_logging()
    from PIL import Image

    from ablation.evaluation.swap import ablated
    from ablation.sampling.generate import jobs_for, write_manifest
    from ablation.sampling.inpaint import box_mask, inpaint, inpaint_pipeline

    with Image.open(args.image) as im:
        image = im.convert("RGB")
    if args.mask:
        with Image.open(args.mask) as im:
            mask_image = im.convert("L")
    else:
        mask_image = box_mask(image.size, args.mask_box, args.mask_fraction, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mask_image.save(out / "mask.png")
    try:
        pipe, device = _load(args.model, args, inpaint_pipeline)
    except FileNotFoundError as err:
        return _fail(str(err))
    jobs = jobs_for(args.prompt, args.num_samples, args.seed)
    with ablated(pipe, args.delta):
        samples = inpaint(pipe, image, mask_image, jobs, _sampling(args), strength=args.strength,
                          paste_back=args.paste_back, batch_size=args.batch_size,
                          path_for=lambda j: out / f"{j.prompt_index:04d}_{j.sample_index:03d}.png")
    info = {"model": args.model, "delta": args.delta, "image": args.image, "mask": args.mask or args.mask_box,
            "unet_in_channels": pipe.unet.config.in_channels, "strength": args.strength,
            "paste_back": args.paste_back, "settings": asdict(_sampling(args)), "device": device.type}
    write_manifest(out, samples, info)
    logger.info("wrote %d inpainted images to %s", len(samples), out)
    return 0


# ------------------------------------------------------------------ upscale


def upscale_main(argv: list[str]) -> int:
    """`ablate upscale`: x4 super-resolution with a prompt; PSNR vs bicubic when references are given."""
    p = argparse.ArgumentParser(prog="ablate upscale", description="Upscale images x4 with a latent upscaler "
                                "conditioned on a prompt (`--model toy`: the toy world's 16 -> 64 px upscaler).")
    p.add_argument("--model", default="toy", help="`toy`, an upscaler directory or a hub id such as "
                   "stabilityai/stable-diffusion-x4-upscaler")
    p.add_argument("--image", action="append", required=True, help="low-resolution image (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="one prompt for all, or one per --image")
    p.add_argument("--reference", action="append", default=[],
                   help="high-resolution ground truth per --image: reports PSNR of the upscaler and of bicubic")
    p.add_argument("--noise-level", type=int, default=20, help="noise added to the low-resolution input")
    p.add_argument("--out", required=True, help="output folder")
    _add_sampling(p, steps=None, guidance=None,
                  steps_help="denoising steps (default: 1 on the toy upscaler, whose one-step estimate, its posterior "
                             "mean, has its best PSNR; else 75, as diffusers' upscale pipeline)",
                  guidance_help="classifier-free guidance (default: 1 on the toy upscaler, else 9)")
    args = p.parse_args(argv)
    _setup_logging()
    from PIL import Image

    from ablation.evaluation.evaluate import DTYPES
    from ablation.sampling.upscale import load_upscaler, score_upscaled, upscale

    if len(args.prompt) not in (1, len(args.image)):
        return _fail(f"give one --prompt or one per --image ({len(args.image)})")
    if args.reference and len(args.reference) != len(args.image):
        return _fail("give one --reference per --image")
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    images = [Image.open(path).convert("RGB") for path in args.image]
    try:
        pipe = load_upscaler(args.model, args.device, DTYPES[args.dtype])
    except FileNotFoundError as err:
        return _fail(str(err))
    from ablation.sampling.generate import set_scheduler

    set_scheduler(pipe, args.scheduler)
    from ablation.sampling.upscale import upscale_defaults

    steps, guidance = upscale_defaults(pipe)
    kwargs = dict(seed=args.seed, steps=steps if args.steps is None else args.steps,
                  guidance=guidance if args.guidance is None else args.guidance, noise_level=args.noise_level,
                  batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = upscale(pipe, images, prompts, **kwargs)
    rows = []
    for path, prompt, image in zip(args.image, prompts, results, strict=True):
        name = f"{Path(path).stem}_x4.png"
        image.save(out / name)
        rows.append({"image": path, "prompt": prompt, "file": name, "size": list(image.size)})
    manifest = {"model": args.model, "settings": {**kwargs, "scheduler": args.scheduler}, "images": rows}
    if args.reference:
        pairs = [(im, Image.open(ref).convert("RGB")) for im, ref in zip(images, args.reference, strict=True)]
        score = score_upscaled(results, pairs)  # the images above: no second run of the upscaler
        manifest["psnr"] = {"upscaler": score.psnr_upscaler, "bicubic": score.psnr_bicubic, "gain": score.gain}
        logger.info("PSNR upscaler %.2f dB, bicubic %.2f dB", score.psnr_upscaler, score.psnr_bicubic)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %d upscaled images to %s", len(rows), out)
    return 0


# ------------------------------------------------------------------ eval


def eval_main(argv: list[str]) -> int:
    """`ablate eval`: compare ablated runs with their base model; report.json, report.md, grids, chart."""
    from ablation.evaluation.clip_judge import DEFAULT_CLIP, LARGE_CLIP

    p = argparse.ArgumentParser(prog="ablate eval", description="Evaluate ablated runs against the base model: "
                                "CLIP accuracy, family accuracy, CLIP score, KID (and memorization rate) per "
                                "target, anchor and surrounding concept.")
    p.add_argument("--base", default=None, help="base model (default: the run's recorded base model, else toy)")
    p.add_argument("--ablated", action="append", default=[],
                   help="run output dir, delta file, LoRA dir or pipeline dir (repeatable)")
    p.add_argument("--config", default=None, help="training recipe whose targets/anchors to evaluate")
    p.add_argument("--family", action="append", default=[],
                   help="task to evaluate: toy family or paper prompt set (`grumpy_cat`, `toy/...`, `paper/...`)")
    p.add_argument("--target", action="append", default=[], help="target concept to evaluate (repeatable)")
    p.add_argument("--anchor", action="append", default=[], help="anchor per --target when it has no prompt set")
    p.add_argument("--concept-type", default="instance", choices=("instance", "style", "memorization", "nudity"),
                   help="concept type of ad-hoc --target/--anchor pairs")
    p.add_argument("--num-samples", type=int, default=4, help="images per prompt and concept")
    p.add_argument("--paper-volumes", action="store_true",
                   help="the paper's volumes instead: 200 images for target and anchor, 50 per surrounding concept")
    p.add_argument("--clip-model", "--clip", dest="clip", default=None,
                   help=f"CLIP judge: hub id or folder (default: the toy CLIP for the toy model, else {DEFAULT_CLIP}, "
                        f"the judge of the paper's CLIP accuracy and score; {LARGE_CLIP} for a stronger judge)")
    p.add_argument("--control-prompts", default=None,
                   help="collateral damage: YAML/JSON file concept -> prompts (default: every toy concept outside "
                        "the evaluated tasks on the toy model, else the bundled prompt_sets/controls.yaml)")
    p.add_argument("--control-samples", type=int, default=8,
                   help="images per control concept, base vs ablated under the same seeds (0: no controls)")
    p.add_argument("--memorized-image", default=None, help="the memorized image (memorization tasks)")
    p.add_argument("--memorization-threshold", type=float, default=0.9, help="CLIP image cosine of a copy")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    p.add_argument("--out", default=None, help="report folder (default: <first --ablated>/eval)")
    p.add_argument("--attacks", action="append", default=[], metavar="KIND",
                   help="also attack each run (`ablate attack` with its defaults; repeatable: prompts, text-search, "
                        "prefix, inversion, relearn or all) and add a robustness table to the report")
    _add_sampling(p, steps=None, batch_size=None,
                  steps_help=f"denoising steps (default: {TOY_EVAL_STEPS} on the toy model, as its quality protocol "
                             f"and its anchors; else 50, the paper's)",
                  batch_help=f"images per pipeline call (default: {TOY_EVAL_BATCH} on the toy model, else 8)")
    args = p.parse_args(argv)
    _setup_logging()
    from ablation.evaluation.evaluate import EvalSettings, evaluate
    from ablation.evaluation.selection import plan_evaluation, refresh_model_cards

    try:
        from ablation.attacks.registry import ATTACKS

        attacks = list(ATTACKS) if "all" in args.attacks else list(dict.fromkeys(args.attacks))
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"--attacks {', '.join(unknown)}: choose from {', '.join(ATTACKS)} or all")
        plan = plan_evaluation(args.ablated, base=args.base, families=args.family, targets=args.target,
                               anchors=args.anchor, concept_type=args.concept_type, config=args.config, out=args.out,
                               steps=args.steps, batch_size=args.batch_size)
        base, tasks, out = plan.base, plan.tasks, plan.out
        if args.control_samples < 0:
            raise ValueError(f"--control-samples must be >= 0, got {args.control_samples}")
        controls = None
        if args.control_prompts:
            from ablation.evaluation.collateral import load_controls

            controls = load_controls(args.control_prompts, exclude=[c for t in tasks for c in t.classes])
    except (KeyError, ValueError, FileNotFoundError) as err:
        return _fail(str(err).strip("'\""))
    args.steps, args.batch_size = plan.steps, plan.batch_size
    if args.steps < 1 or args.batch_size < 1:
        return _fail("--steps and --batch-size must be >= 1")
    settings = EvalSettings(
        sampling=_sampling(args), samples_per_prompt=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        images_per_role={"target": 200, "anchor": 200, "surrounding": 50} if args.paper_volumes else None,
        kid_subsets=args.kid_subsets, memorization_threshold=args.memorization_threshold, dtype=args.dtype,
        control_samples=args.control_samples)
    report = evaluate(base, args.ablated, tasks, out, settings, clip_model=args.clip, device=args.device,
                      memorized_image=args.memorized_image, controls=controls)
    for run, rows in report["comparison"].items():
        for r in rows:
            if r["metric"] == "clip_accuracy":
                logger.info("%-12s %-28s %-11s CLIP acc %.2f -> %.2f", run, r["concept"], r["role"], r["base"],
                            r["ablated"])
    if attacks:
        from ablation.config import ConfigError
        from ablation.evaluation.robustness import attack_runs

        try:
            attack_runs(base, args.ablated, attacks, out, seed=args.seed, device=args.device, clip=args.clip)
        except ConfigError as err:
            return _fail(str(err))
    logger.info("wrote %s", out / "report.md")
    refresh_model_cards(args.ablated)  # the run's model card shows the new evaluation
    return 0
