"""`ablate generate | inpaint | upscale | eval`: argument parsing and the thin programs around the library.

Each `*_main(argv) -> int` parses, builds, runs and writes; the work is in the sibling modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ablation.config import DEFAULT_CLIP, GUIDANCE, LARGE_CLIP, ConceptType, Precision, Sampler
from ablation.evaluation.selection import TOY_EVAL_BATCH, TOY_EVAL_STEPS
from ablation.flags import add_argument, add_arguments, from_namespace, option
from ablation.sampling.generate import SamplingSettings

logger = logging.getLogger("ablation.evaluation")


# ------------------------------------------------------------------ options
# Each command's flags are the fields of its option classes (`ablation.flags`): the command's own, then the
# sampling group, whose per-command defaults are the subclasses below.


@dataclass
class SamplingOptions:
    """The `sampling` group of `ablate generate` and `ablate inpaint`."""

    scheduler: Sampler = option("sampler (default: ddim, as the paper)", default="ddim")
    steps: int | None = option("denoising steps", default=50)
    guidance: float | None = option("classifier-free guidance", default=GUIDANCE)
    seed: int = option("base seed; image seed = seed + 100000*prompt + sample", default=0)
    batch_size: int | None = option("images per pipeline call", default=8)
    height: int | None = option("image height (default: the model's)", default=None)
    width: int | None = option("image width (default: the model's)", default=None)
    negative_prompt: str | None = option("negative prompt for every image", default=None)
    device: str | None = option("cuda, cpu, ... (default: cuda when available)", default=None)
    dtype: Precision = option("generator precision", default="fp32")

    def settings(self) -> SamplingSettings:
        """What the sampler needs (the cache key and manifest entry)."""
        return SamplingSettings(scheduler=self.scheduler, steps=self.steps, guidance=self.guidance,
                                height=self.height, width=self.width, negative_prompt=self.negative_prompt)


@dataclass
class UpscaleSampling(SamplingOptions):
    """`ablate upscale`: steps and guidance default to the upscaler's best (`upscale_defaults`)."""

    steps: int | None = option("denoising steps (default: 1 on the toy upscaler, whose one-step estimate, its "
                               "posterior mean, has its best PSNR; else 75, as diffusers' upscale pipeline)",
                               default=None)
    guidance: float | None = option("classifier-free guidance (default: 1 on the toy upscaler, else 9)",
                                    default=None)


@dataclass
class EvalSampling(SamplingOptions):
    """`ablate eval`: steps and batch default to the model's protocol (`plan_evaluation`)."""

    steps: int | None = option(f"denoising steps (default: {TOY_EVAL_STEPS} on the toy model, as its quality "
                               f"protocol and its anchors; else 50, the paper's)", default=None)
    batch_size: int | None = option(f"images per pipeline call (default: {TOY_EVAL_BATCH} on the toy model, else "
                                    f"8)", default=None)


_MODEL = "`toy`, a diffusers directory or a hub id (default: toy)"
_DELTA = "ablation to apply: delta file, run dir, LoRA dir or pipeline dir"


@dataclass
class GenerateOptions:
    """`ablate generate`."""

    model: str = option(_MODEL, default="toy")
    delta: str | None = option(_DELTA, default=None)
    prompts: list[str] = option("prompt file (.txt/.json/.yaml) or prompt set (`grumpy_cat`, `grumpy_cat:persian "
                                "cat`, `toy/van_gogh`); repeatable", default_factory=list, repeatable=True)
    prompt: list[str] = option("a prompt (repeatable)", default_factory=list, repeatable=True)
    num_samples: int = option("images per prompt", default=4)
    out: str = option("output folder", required=True)


@dataclass
class InpaintOptions:
    """`ablate inpaint` (`--mask` or `--mask-box`, one of them)."""

    model: str = option(_MODEL, default="toy")
    delta: str | None = option(_DELTA, default=None)
    image: str = option("input image", required=True)
    mask: str | None = option("mask image (white = repaint)", default=None)
    mask_box: Literal["center", "random"] | None = option("rectangular mask instead of a file", default=None)
    mask_fraction: float = option("side of the --mask-box as a fraction", default=0.5)
    prompt: list[str] = option("prompt (repeatable)", required=True, repeatable=True)
    num_samples: int = option("images per prompt", default=1)
    strength: float = option("1.0: ignore the masked content", default=1.0)
    paste_back: bool = option("keep the original pixels outside the mask exactly", default=False)
    out: str = option("output folder", required=True)


@dataclass
class UpscaleOptions:
    """`ablate upscale`."""

    model: str = option("`toy`, an upscaler directory or a hub id such as stabilityai/stable-diffusion-x4-upscaler",
                        default="toy")
    image: list[str] = option("low-resolution image (repeatable)", required=True, repeatable=True)
    prompt: list[str] = option("one prompt for all, or one per --image", required=True, repeatable=True)
    reference: list[str] = option("high-resolution ground truth per --image: reports PSNR of the upscaler and of "
                                  "bicubic", default_factory=list, repeatable=True)
    noise_level: int = option("noise added to the low-resolution input", default=20)
    out: str = option("output folder", required=True)


@dataclass
class EvalOptions:
    """`ablate eval`."""

    base: str | None = option("base model (default: the run's recorded base model, else toy)", default=None)
    ablated: list[str] = option("run output dir, delta file, LoRA dir or pipeline dir (repeatable)",
                                default_factory=list, repeatable=True)
    config: str | None = option("training recipe whose targets/anchors to evaluate", default=None)
    family: list[str] = option("task to evaluate: toy family or paper prompt set (`grumpy_cat`, `toy/...`, "
                               "`paper/...`)", default_factory=list, repeatable=True)
    target: list[str] = option("target concept to evaluate (repeatable)", default_factory=list, repeatable=True)
    anchor: list[str] = option("anchor per --target when it has no prompt set", default_factory=list,
                               repeatable=True)
    concept_type: ConceptType = option("concept type of ad-hoc --target/--anchor pairs", default="instance")
    num_samples: int = option("images per prompt and concept", default=4)
    paper_volumes: bool = option("the paper's volumes instead: 200 images for target and anchor, 50 per surrounding "
                                 "concept", default=False)
    clip: str | None = option(f"CLIP judge: hub id or folder (default: the toy CLIP for the toy model, else "
                              f"{DEFAULT_CLIP}, the judge of the paper's CLIP accuracy and score; {LARGE_CLIP} for a "
                              f"stronger judge)", default=None, flag="--clip-model", aliases=("--clip",))
    control_prompts: str | None = option("collateral damage: YAML/JSON file concept -> prompts (default: every toy "
                                         "concept outside the evaluated tasks on the toy model, else the bundled "
                                         "prompt_sets/controls.yaml)", default=None)
    control_samples: int = option("images per control concept, base vs ablated under the same seeds (0: no "
                                  "controls)", default=8)
    memorized_image: str | None = option("the memorized image (memorization tasks)", default=None)
    memorization_threshold: float = option("CLIP image cosine of a copy", default=0.9)
    kid_subsets: int = option("KID subsets", default=100)
    out: str | None = option("report folder (default: <first --ablated>/eval)", default=None)
    attacks: list[str] = option("also attack each run (`ablate attack` with its defaults; repeatable: prompts, "
                                "text-search, prefix, inversion, relearn or all) and add a robustness table to the "
                                "report", default_factory=list, repeatable=True, metavar="KIND")


def _parse(prog: str, description: str, options, sampling, argv: list[str], *, exclusive: tuple[str, ...] = ()):
    """Parse `argv` into (`options`, `sampling`) instances; the fields in `exclusive` are one required choice."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p, options, skip=exclusive)
    if exclusive:
        group = p.add_mutually_exclusive_group(required=True)
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            if f.name in exclusive:
                add_argument(group, f, hints[f.name])
    add_arguments(p.add_argument_group("sampling"), sampling)
    args = p.parse_args(argv)
    return from_namespace(options, args), from_namespace(sampling, args)


def _setup_logging() -> None:
    import os

    from ablation.quiet import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # our lines stay plain (quiet's is a no-op then)
    # loading bars, the torch_dtype FutureWarning, bitsandbytes' kernel note: the libraries' own switches
    quiet_libraries(verbose=bool(os.environ.get("ABLATION_VERBOSE")))
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(model: str, args: SamplingOptions, pipeline_fn=None):
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
    args, s = _parse("ablate generate", "Sample images for a prompt set with fixed seeds (independent of the batch "
                     "size) and write them with a manifest.", GenerateOptions, SamplingOptions, argv)
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
    settings = s.settings()
    if args.delta:  # a missing or damaged delta fails here, before any model is loaded or folder made
        from ablation.checkpoint import resolve_delta

        try:
            resolve_delta(args.delta)
        except (ValueError, FileNotFoundError) as err:
            return _fail(str(err))
    try:
        pipe, device = _load(args.model, s)
    except (ValueError, FileNotFoundError) as err:  # ConfigError: offline hub, unreadable single file, ...
        return _fail(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(prompts, args.num_samples, s.seed)
    with ablated(pipe, args.delta):
        samples = generate(pipe, jobs, settings, batch_size=s.batch_size, reuse=False,
                           path_for=lambda j: out / f"{j.prompt_index:04d}_{j.sample_index:03d}.png",
                           progress=lambda d, t: logger.info("generated %d/%d", d, t))
    info = {"model": args.model, "delta": args.delta, "settings": asdict(settings), "device": device.type,
            "dtype": s.dtype}
    write_manifest(out, samples, info)
    logger.info("wrote %d images and manifest.jsonl to %s", len(samples), out)
    return 0


# ------------------------------------------------------------------ inpaint


def inpaint_main(argv: list[str]) -> int:
    """`ablate inpaint`: repaint a masked region with a prompt (9-channel or ordinary 4-channel UNets)."""
    args, s = _parse("ablate inpaint", "Inpaint a masked region of an image. Works with inpainting (9-channel) "
                     "models and, by latent blending, with ordinary text-to-image models; --delta applies a "
                     "text-to-image ablation to either.", InpaintOptions, SamplingOptions, argv,
                     exclusive=("mask", "mask_box"))
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
        mask_image = box_mask(image.size, args.mask_box, args.mask_fraction, s.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mask_image.save(out / "mask.png")
    try:
        pipe, device = _load(args.model, s, inpaint_pipeline)
    except FileNotFoundError as err:
        return _fail(str(err))
    jobs = jobs_for(args.prompt, args.num_samples, s.seed)
    with ablated(pipe, args.delta):
        samples = inpaint(pipe, image, mask_image, jobs, s.settings(), strength=args.strength,
                          paste_back=args.paste_back, batch_size=s.batch_size,
                          path_for=lambda j: out / f"{j.prompt_index:04d}_{j.sample_index:03d}.png")
    info = {"model": args.model, "delta": args.delta, "image": args.image, "mask": args.mask or args.mask_box,
            "unet_in_channels": pipe.unet.config.in_channels, "strength": args.strength,
            "paste_back": args.paste_back, "settings": asdict(s.settings()), "device": device.type}
    write_manifest(out, samples, info)
    logger.info("wrote %d inpainted images to %s", len(samples), out)
    return 0


# ------------------------------------------------------------------ upscale


def upscale_main(argv: list[str]) -> int:
    """`ablate upscale`: x4 super-resolution with a prompt; PSNR vs bicubic when references are given."""
    args, s = _parse("ablate upscale", "Upscale images x4 with a latent upscaler conditioned on a prompt (`--model "
                     "toy`: the toy world's 16 -> 64 px upscaler).", UpscaleOptions, UpscaleSampling, argv)
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
        pipe = load_upscaler(args.model, s.device, DTYPES[s.dtype])
    except FileNotFoundError as err:
        return _fail(str(err))
    from ablation.sampling.generate import set_scheduler

    set_scheduler(pipe, s.scheduler)
    from ablation.sampling.upscale import upscale_defaults

    steps, guidance = upscale_defaults(pipe)
    kwargs = dict(seed=s.seed, steps=steps if s.steps is None else s.steps,
                  guidance=guidance if s.guidance is None else s.guidance, noise_level=args.noise_level,
                  batch_size=s.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = upscale(pipe, images, prompts, **kwargs)
    rows = []
    for path, prompt, image in zip(args.image, prompts, results, strict=True):
        name = f"{Path(path).stem}_x4.png"
        image.save(out / name)
        rows.append({"image": path, "prompt": prompt, "file": name, "size": list(image.size)})
    manifest = {"model": args.model, "settings": {**kwargs, "scheduler": s.scheduler}, "images": rows}
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
    args, s = _parse("ablate eval", "Evaluate ablated runs against the base model: CLIP accuracy, family "
                     "accuracy, CLIP score, KID (and memorization rate) per target, anchor and surrounding concept.",
                     EvalOptions, EvalSampling, argv)
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
                               steps=s.steps, batch_size=s.batch_size)
        base, tasks, out = plan.base, plan.tasks, plan.out
        if args.control_samples < 0:
            raise ValueError(f"--control-samples must be >= 0, got {args.control_samples}")
        controls = None
        if args.control_prompts:
            from ablation.evaluation.collateral import load_controls

            controls = load_controls(args.control_prompts, exclude=[c for t in tasks for c in t.classes])
    except (KeyError, ValueError, FileNotFoundError) as err:
        return _fail(str(err).strip("'\""))
    s.steps, s.batch_size = plan.steps, plan.batch_size
    if s.steps < 1 or s.batch_size < 1:
        return _fail("--steps and --batch-size must be >= 1")
    settings = EvalSettings(
        sampling=s.settings(), samples_per_prompt=args.num_samples, seed=s.seed, batch_size=s.batch_size,
        images_per_role={"target": 200, "anchor": 200, "surrounding": 50} if args.paper_volumes else None,
        kid_subsets=args.kid_subsets, memorization_threshold=args.memorization_threshold, dtype=s.dtype,
        control_samples=args.control_samples)
    report = evaluate(base, args.ablated, tasks, out, settings, clip_model=args.clip, device=s.device,
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
            attack_runs(base, args.ablated, attacks, out, seed=s.seed, device=s.device, clip=args.clip)
        except ConfigError as err:
            return _fail(str(err))
    logger.info("wrote %s", out / "report.md")
    refresh_model_cards(args.ablated)  # the run's model card shows the new evaluation
    return 0
