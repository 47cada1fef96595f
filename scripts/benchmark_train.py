"""Benchmark an ablation run: anchor generation, training steps, end to end, peak memory.

Prints one JSON object with, per model:
  * `anchor_images_per_s`: `ablation.sampling.anchors.generate_latents` on the loaded pipeline (after one warm-up
    image);
  * `end_to_end_s`: `ablation.trainer.train` with an empty anchor cache (load, generate, train, write delta);
  * `train_steps_per_s`: from two more `train` runs on the warm cache with `steps` and `2 * steps` steps, so the
    fixed costs (loading, prompt encoding, the summary losses, writing the delta) cancel out;
  * `peak_rss_mb` (resource.getrusage) and, on CUDA, `peak_cuda_allocated_mb` (torch.cuda.max_memory_allocated),
    both taken right after the end-to-end run; `anchor_peak_cuda_allocated_mb` for the sampler alone.

`--compare` (toy model, CPU): end-to-end `ablate train` runs of named configurations, each a fresh process on an
empty anchor cache, then judged. One JSON line per configuration and task with the run's phase times (its
`timings.json`: start-up from process start, load, anchor data, setup, train, save), anchor images/s, train
steps/s, wall seconds, the child's peak RSS, and the quality the time bought (`ablation.evaluation.collateral.
measure`, toy CLIP and toy classifier, held-out prompts, `--per-concept` images each): target, anchor and
surrounding accuracy base -> ablated and the fraction of other concepts' images whose judged class changed.

    python scripts/benchmark_train.py --compare                      # paper-matched vs defaults, both tasks
    python scripts/benchmark_train.py --compare defaults --tasks grumpy-cat

Models: `toy` (the embedded toy-world model, skipped with a note when its weights are missing), `sd15`
(the real SD 1.5 UNet / VAE / text-encoder configs with random weights, built once into --workdir; no download)
and, with `--only sdxl` (for a GPU), the same for SDXL base 1.0's configs.
Each model runs in its own subprocess so that peak memory and accelerate's global state are per model.

    python scripts/benchmark_train.py --only sd15 --device cpu --steps 2 --resolution 256
    python scripts/benchmark_train.py --device cuda --steps 20 --resolution 512 --batch-size 4
    python scripts/benchmark_train.py --only sdxl --device cuda --steps 20 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablation.published import (  # noqa: E402  (the published configs: one source with the planner's)
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
)

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
# The benchmark concept: an instance without prior preservation (the paper's R2D2 -> robot setting).
TARGET, ANCHOR = "R2D2", "robot"

# --compare: the side-by-side setting (200 anchors from DPM-Solver++ 25 steps, guidance 6; 100 steps at
# batch 4 on cross-attention K/V, model-based; the toy world's cross-attention learning rate) and the defaults.
COMPARE_CONFIGS = {
    "paper-matched": ["--params", "cross-attn", "--num-anchor-images", "200", "--anchor-scheduler", "dpm++",
                      "--anchor-steps", "25", "--anchor-guidance", "6", "--max-steps", "100",
                      "--train-batch-size", "4", "--learning-rate", "1e-4"],
    "defaults": [],
}
COMPARE_TASKS = {  # name -> (target, anchor, extra options); grumpy cat keeps prior preservation as in the table
    "grumpy-cat": ("Grumpy Cat", "Cat", []),
    "van-gogh": ("Van Gogh", "Painting", []),
}


def build_sd15(path: Path) -> None:
    """Save a randomly initialised SD-1.5-shaped pipeline (fp16 files: half the disk, loaded as fp32)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ablation.tokenizer_util import clip_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=clip_tokenizer(77),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    tmp = path.with_name(path.name + ".tmp")
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)


def build_sdxl(path: Path, unet: dict | None = None, vae: dict | None = None, text: dict | None = None,
               text_2: dict | None = None) -> None:
    """Save a randomly initialised SDXL-shaped pipeline (fp16 files); the configs default to SDXL base 1.0's.

    On CPU building it takes about 14 GB of memory (fp32 before the cast); it is meant for the GPU benchmark."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ablation.tokenizer_util import clip_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**(unet or SDXL_UNET)), vae=AutoencoderKL(**(vae or SDXL_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**(text or SDXL_TEXT))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**(text_2 or SDXL_TEXT_2))),
        tokenizer=clip_tokenizer(77), tokenizer_2=clip_tokenizer(77),
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                            if k not in ("skip_prk_steps", "set_alpha_to_one")}))
    tmp = path.with_name(path.name + ".tmp")
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)


def _peaks(device: str) -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device == "cuda":
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def bench_model(name: str, args) -> dict:
    """All measurements for one model, in this process."""
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by accelerate's state: train() then stays on CPU
    import torch

    from ablation.concepts import resolve_concepts
    from ablation.config import build_config
    from ablation.models import load_pipeline
    from ablation.sampling import anchors
    from ablation.trainer import plan_run, train

    work = Path(args.workdir)
    if name == "toy":
        from ablation.toyworld import WEIGHTS_DIR

        if not (WEIGHTS_DIR / "pipeline" / "model_index.json").exists():
            return {"skipped": f"toy weights missing ({WEIGHTS_DIR / 'pipeline'}); train them with "
                               f"scripts/train_toyworld.py"}
        model = "toy"
    else:
        model = str(work / f"{name}-random")
        if not Path(model, "model_index.json").exists():
            t = time.perf_counter()
            # A child process: building in fp32 would otherwise dominate this process's peak RSS.
            subprocess.run([sys.executable, __file__, f"--build-{name}", model], check=True)
            print(f"built {model} in {time.perf_counter() - t:.0f}s", file=sys.stderr)

    def config(steps: int, cache: str, out: str):
        values = dict(model=model, target=[TARGET], anchor=[ANCHOR], max_steps=steps, prior_preservation=False,
                      train_batch_size=args.batch_size, num_anchor_images=args.anchor_images,
                      anchor_steps=args.anchor_steps, anchor_batch_size=args.anchor_batch_size,
                      mixed_precision=args.mixed_precision, checkpointing_steps=0, seed=0, overwrite=True,
                      cache_dir=str(work / cache), output_dir=str(work / out))
        if args.resolution:
            values["resolution"] = args.resolution
        return build_config(None, values)

    result: dict = {"model": model, "device": args.device, "batch_size": args.batch_size,
                    "mixed_precision": args.mixed_precision}
    plan = plan_run(config(args.steps, f"cache-{name}-gen", f"out-{name}"))
    cfg = plan.config
    result.update(resolution=cfg.resolution, anchor_sampler=cfg.anchor_scheduler, anchor_steps=cfg.anchor_steps,
                  anchor_images=cfg.num_anchor_images, params=cfg.params)

    # (a) anchor generation through the data module's public sampler
    pipe = load_pipeline(plan.model_path).to(args.device)
    (concept,) = resolve_concepts(cfg.concept_specs(), plan.toy)
    settings = anchors.SamplerSettings("benchmark", concept.anchor_prompts, cfg.anchor_scheduler, cfg.anchor_steps,
                                    cfg.anchor_guidance, cfg.resolution, cfg.num_anchor_images, cfg.seed)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    autocast = torch.autocast(args.device, dtype=dtype) if dtype else torch.autocast(args.device, enabled=False)
    with autocast:
        anchors.generate_latents(pipe, settings, [0], 1, disable_progress=True)  # warm-up (kernels, allocator)
        _sync(args.device)
        t = time.perf_counter()
        anchors.generate_latents(pipe, settings, list(range(cfg.num_anchor_images)), args.anchor_batch_size,
                              disable_progress=True)
        _sync(args.device)
    result["anchor_images_per_s"] = round(cfg.num_anchor_images / (time.perf_counter() - t), 4)
    del pipe
    gc.collect()
    if args.device == "cuda":
        result["anchor_peak_cuda_allocated_mb"] = _peaks("cuda")["peak_cuda_allocated_mb"]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # (b) end to end on an empty cache
    t = time.perf_counter()
    run = train(config(args.steps, f"cache-{name}-e2e-{os.getpid()}", f"out-{name}"))
    result["end_to_end_s"] = round(time.perf_counter() - t, 2)
    result["anchor_images_generated"] = run.anchor_images_generated
    # Peaks of the end-to-end run (RSS: of the process so far, which the anchor benchmark's pipeline does not exceed).
    result.update(_peaks(args.device))
    gc.collect()

    # (c) training rate: 2s - s steps on the warm cache
    timings = {}
    for steps in (args.steps, 2 * args.steps):
        t = time.perf_counter()
        train(config(steps, f"cache-{name}-e2e-{os.getpid()}", f"out-{name}"))
        timings[steps] = time.perf_counter() - t
    extra = timings[2 * args.steps] - timings[args.steps]
    result["train_steps_per_s"] = round(args.steps / extra, 4) if extra > 0 else None
    result["train_runs_s"] = {str(k): round(v, 2) for k, v in timings.items()}
    return result


def _child_peak_rss(cmd: list[str], env: dict) -> tuple[int, float, float]:
    """Run `cmd` in a wrapper process whose only child it is: (exit status, wall s, the child's peak RSS MB)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:])"
               ".returncode; w = time.perf_counter() - t; "
               "print(rc, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, stdout=subprocess.PIPE, text=True)
    rc, wall, rss = out.stdout.split()[-3:]
    return int(rc), float(wall), float(rss)


def _run_and_judge(row: dict, cli_args: list[str], targets: list[str], out: Path, cache: Path, base, judges,
                   per_concept: int) -> dict:
    """One `ablate train` process (timed, peak RSS), then every toy concept judged base vs ablated (not timed).

    `quality`: per target [base, ablated] accuracy by each judge; the worst drop among every anchor and other
    concept of the targets' families (`worst_kept`); the fraction of all non-target images whose judged class
    changed (`changed_fraction`).
    """
    from ablation.evaluation.collateral import measure
    from ablation.toyworld import catalog

    cmd = [sys.executable, "-m", "ablation.cli", "train", "--output-dir", str(out), "--overwrite", *cli_args]
    rc, wall, rss = _child_peak_rss(cmd, {**os.environ, "ABLATION_CACHE": str(cache)})
    if rc != 0:
        return {**row, "error": f"exit {rc}"}
    timings = json.loads((out / "timings.json").read_text())
    phases = timings["phase_seconds"]
    row.update(end_to_end_s=round(wall, 2), phase_seconds=phases, peak_rss_mb=round(rss, 1),
               anchor_images=timings["anchor_images_generated"],
               anchor_images_per_s=round(timings["anchor_images_generated"] / phases["anchor data"], 2)
               if timings["anchor_images_generated"] else None,
               train_steps=timings["steps"], train_steps_per_s=round(timings["steps"] / phases["train"], 2))
    cat = catalog()
    quality = measure(base, out, concepts=list(cat.concepts), per_concept=per_concept, judges=judges)
    rows = quality["concepts"]

    def acc(c: str) -> dict:
        return {j: [round(rows[c][j]["base"], 3), round(rows[c][j]["ablated"], 3)] for j in quality["judges"]}

    kept = sorted({c for t in targets for c in cat.family_of_target(t).classes} - set(targets))
    worst = {j: max(kept, key=lambda c: rows[c][j]["base"] - rows[c][j]["ablated"]) for j in quality["judges"]}
    others = [c for c in cat.concepts if c not in targets]
    changed = {j: round(float(sum(rows[c][j]["changed"] * rows[c]["num_images"] for c in others)
                              / sum(rows[c]["num_images"] for c in others)), 4) for j in quality["judges"]}
    row["quality"] = {"targets": {t: acc(t) for t in targets},
                      "worst_kept": {j: [c, round(rows[c][j]["base"] - rows[c][j]["ablated"], 3)]
                                     for j, c in worst.items()},
                      "changed_fraction": changed, "per_concept": per_concept}
    return row


def compare(names: list[str], tasks: list[str], per_concept: int, workdir: Path) -> list[dict]:
    """`--compare`: each configuration x task end to end in a fresh process, then judged (not timed)."""
    from ablation.evaluation.collateral import toy_judges
    from ablation.models import load_pipeline

    judges, base, rows = toy_judges(), load_pipeline("toy"), []
    for task in tasks:
        target, anchor, extra = COMPARE_TASKS[task]
        for name in names:
            row = {"config": name, "task": task, "options": COMPARE_CONFIGS[name] + extra}
            row = _run_and_judge(row, ["--target", target, "--anchor", anchor, *COMPARE_CONFIGS[name], *extra],
                                 [target.lower()], workdir / f"{task}-{name}", workdir / f"cache-{task}-{name}",
                                 base, judges, per_concept)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# --many: the toy world's targets in this order, the first n in one run
MANY_TARGETS = [("Grumpy Cat", "Cat"), ("Snoopy", "Dog"), ("Nemo", "Fish"), ("R2D2", "Robot"),
                ("Van Gogh", "Painting"), ("Monet", "Painting"), ("Salvador Dali", "Painting"),
                ("Greg Rutkowski", "Painting"), ("the iconic lighthouse at dawn poster", "lighthouse"),
                ("the famous red balloon over paris photograph", "balloon")]


def many(counts: list[int], extra: list[str], per_concept: int, workdir: Path) -> list[dict]:
    """`--many`: n concepts in one run for each n in `counts` (fresh cache each), then judged."""
    from ablation.evaluation.collateral import toy_judges
    from ablation.models import load_pipeline

    judges, base, rows = toy_judges(), load_pipeline("toy"), []
    for n in counts:
        pairs = MANY_TARGETS[:n]
        cli = [a for t, anc in pairs for a in ("--target", t, "--anchor", anc)] + extra
        row = _run_and_judge({"concepts": n, "options": extra}, cli, [t.lower() for t, _ in pairs],
                             workdir / f"many-{n}", workdir / f"cache-many-{n}", base, judges, per_concept)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sequential(per_concept: int, workdir: Path) -> dict:
    """`--sequential`: ablate grumpy cat, then snoopy on the result (its exported pipeline, with the toy recipe
    spelled out, since an exported folder is not `toy`); how far does the first ablation drift?"""
    from ablation.evaluation.collateral import measure, toy_judges
    from ablation.models import load_pipeline
    from ablation.toyworld import catalog

    toy_recipe = ["--params", "embedding", "--learning-rate", "2e-2", "--max-steps", "60", "--num-anchor-images",
                  "16", "--anchor-scheduler", "ddim", "--anchor-steps", "10", "--train-batch-size", "8"]
    first, second = workdir / "seq-1-grumpy-cat", workdir / "seq-2-snoopy"
    runs = [(first, ["--target", "Grumpy Cat", "--anchor", "Cat", "--export", "pipeline"]),
            (second, ["--model", str(first / "pipeline"), "--target", "Snoopy", "--anchor", "Dog", "--export",
                      "pipeline", *toy_recipe])]
    seconds = []
    for out, cli in runs:
        cmd = [sys.executable, "-m", "ablation.cli", "train", "--output-dir", str(out), "--overwrite", *cli]
        rc, wall, _ = _child_peak_rss(cmd, {**os.environ, "ABLATION_CACHE": str(workdir / "cache-seq")})
        if rc != 0:
            return {"error": f"{out.name}: exit {rc}"}
        seconds.append(round(wall, 2))
    judges, base = toy_judges(), load_pipeline("toy")
    concepts = list(catalog().concepts)
    after_first = measure(base, first, concepts=concepts, per_concept=per_concept, judges=judges)
    # the second run's exported pipeline holds both ablations
    after_both = measure(base, load_pipeline(str(second / "pipeline")), concepts=concepts, per_concept=per_concept,
                         judges=judges)

    def acc(q: dict, c: str) -> dict:
        return {j: [round(q["concepts"][c][j]["base"], 3), round(q["concepts"][c][j]["ablated"], 3)]
                for j in q["judges"]}

    return {"seconds": seconds,
            "after_first": {c: acc(after_first, c) for c in ("grumpy cat", "cat", "snoopy", "dog")},
            "after_second": {c: acc(after_both, c) for c in ("grumpy cat", "cat", "snoopy", "dog")},
            "changed_fraction_after_second": after_both["changed_fraction"], "per_concept": per_concept}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", nargs="*", choices=sorted(COMPARE_CONFIGS), default=None,
                        help="end-to-end comparison of these configurations on the toy model (none named: all)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(COMPARE_TASKS), default=sorted(COMPARE_TASKS),
                        help="--compare: the tasks")
    parser.add_argument("--many", type=int, nargs="+", default=None, metavar="N",
                        help="several concepts in one run: the first N toy targets, for each N given (e.g. 1 2 5 10)")
    parser.add_argument("--sequential", action="store_true", help="grumpy cat, then snoopy on the result")
    parser.add_argument("--train-args", default="", help="--many: extra `ablate train` options (one string)")
    parser.add_argument("--per-concept", type=int, default=8, help="--compare/--many: judged images per concept")
    parser.add_argument("--only", choices=("toy", "sd15", "sdxl"),
                        help="benchmark one model (default: toy and sd15; sdxl is for a GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--steps", type=int, default=2, help="training steps of the timed runs (also 2x this)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training/anchor resolution in px (default: toy native, sd15 256, sdxl native 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="training batch size")
    parser.add_argument("--anchor-images", type=int, default=2, help="anchor images to generate")
    parser.add_argument("--anchor-steps", type=int, default=5, help="sampler steps per anchor image")
    parser.add_argument("--anchor-batch-size", type=int, default=2, help="images per generation batch")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--workdir", default=None,
                        help="keeps the random SD 1.5 model and caches between invocations (default: a temp dir)")
    parser.add_argument("--build-sd15", metavar="DIR", help=argparse.SUPPRESS)  # internal: child process
    parser.add_argument("--build-sdxl", metavar="DIR", help=argparse.SUPPRESS)  # internal: child process
    parser.add_argument("--json-out", metavar="FILE", help=argparse.SUPPRESS)  # internal: child's result
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_sd15:
        build_sd15(Path(args.build_sd15))
        return 0
    if args.build_sdxl:
        build_sdxl(Path(args.build_sdxl))
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    with tempfile.TemporaryDirectory(prefix="ablation-bench-") as tmp:
        args.workdir = args.workdir or tmp
        if args.sequential:
            os.environ["ACCELERATE_USE_CPU"] = "true"
            print(json.dumps(sequential(args.per_concept, Path(args.workdir)), indent=2))
            return 0
        if args.many:
            import shlex

            os.environ["ACCELERATE_USE_CPU"] = "true"
            rows = many(args.many, shlex.split(args.train_args), args.per_concept, Path(args.workdir))
            print(json.dumps(rows, indent=2))
            return 0
        if args.compare is not None:
            os.environ["ACCELERATE_USE_CPU"] = "true"
            rows = compare(args.compare or list(COMPARE_CONFIGS), args.tasks, args.per_concept, Path(args.workdir))
            print(json.dumps(rows, indent=2))
            return 0
        if args.only and args.json_out:  # child: one model, result to a file
            Path(args.json_out).write_text(json.dumps(bench_model(args.only, args)))
            return 0
        report: dict = {}
        for name in ([args.only] if args.only else ["toy", "sd15"]):
            if name == "sd15" and args.resolution is None:
                args.resolution = 256
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--only", name, "--json-out", str(out), "--device", args.device,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--anchor-images",
                   str(args.anchor_images), "--anchor-steps", str(args.anchor_steps), "--anchor-batch-size",
                   str(args.anchor_batch_size), "--mixed-precision", args.mixed_precision, "--workdir", args.workdir]
            if args.resolution:
                cmd += ["--resolution", str(args.resolution)]
            proc = subprocess.run(cmd)
            report[name] = json.loads(out.read_text()) if proc.returncode == 0 else {"error": f"exit {proc.returncode}"}
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
