"""Seeded, batched text-to-image sampling with an on-disk image cache and a manifest.

Every image has its own seed, `seed + SEED_STRIDE * prompt_index + sample_index`, and its own CPU
`torch.Generator`, so an image does not depend on the batch size, on the device (noise is drawn on
the CPU) or on which other images were generated with it; the base and the ablated model get the
same noise for the same (prompt, sample), which makes their images directly comparable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ablation.config import GUIDANCE, SAMPLERS

#: seeds of consecutive prompts are this far apart (more samples per prompt than this would collide)
SEED_STRIDE = 100_000
SCHEDULERS = tuple(SAMPLERS)


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled (part of every cache key and manifest).

    Attributes:
        scheduler: a key of `ablation.config.SAMPLERS` (`dpm++`: DPM-Solver++ multistep).
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        height: image height in pixels (None: the model's default).
        width: image width in pixels (None: the model's default).
        negative_prompt: optional negative prompt.
        eta: DDIM eta (0: deterministic DDIM).
    """

    scheduler: str = "ddim"
    steps: int = 50
    guidance: float = GUIDANCE
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {SCHEDULERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Job:
    """One image to produce."""

    prompt: str
    prompt_index: int
    sample_index: int
    seed: int


@dataclass
class Sample:
    """One produced image, with where it lies on disk (None when not saved)."""

    job: Job
    image: Image.Image
    path: Path | None
    cached: bool


def seed_for(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one image: `seed + SEED_STRIDE * prompt_index + sample_index`."""
    if not 0 <= sample_index < SEED_STRIDE:
        raise ValueError(f"sample index {sample_index} out of range [0, {SEED_STRIDE})")
    return seed + SEED_STRIDE * prompt_index + sample_index


def jobs_for(prompts: Sequence[str], num_samples: int, seed: int = 0) -> list[Job]:
    """`num_samples` jobs per prompt, prompt-major."""
    return [Job(p, i, s, seed_for(seed, i, s)) for i, p in enumerate(prompts) for s in range(num_samples)]


def jobs_for_total(prompts: Sequence[str], total: int, seed: int = 0) -> list[Job]:
    """`total` jobs spread over the prompts round-robin (image j: prompt j % P, sample j // P)."""
    n = len(prompts)
    return [Job(prompts[j % n], j % n, j // n, seed_for(seed, j % n, j // n)) for j in range(total)]


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler, keeping its noise schedule and prediction type."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):  # SD3 / FLUX sample with their own flow scheduler
        return
    pipe.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


def prompt_hash(prompt: str) -> str:
    """A short, stable directory name for a prompt."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, job: Job) -> Path:
    """Where the cache keeps a job's image: `<cache_dir>/<prompt hash>/<seed>.png`."""
    return Path(cache_dir) / prompt_hash(job.prompt) / f"{job.seed}.png"


def _sample_batch(pipe, jobs: Sequence[Job], settings: SamplingSettings, pipe_kwargs: dict) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, generator=generators)
    if settings.height is not None or settings.width is not None:  # not every pipeline takes a size (upscaler)
        kwargs.update(height=settings.height, width=settings.width)
    kwargs.update(pipe_kwargs)
    if settings.negative_prompt:
        kwargs["negative_prompt"] = [settings.negative_prompt] * len(jobs)
    if settings.scheduler == "ddim" and type(pipe.scheduler).__name__ == "DDIMScheduler":
        kwargs["eta"] = settings.eta
    return list(pipe([j.prompt for j in jobs], **kwargs).images)


def generate(pipe, jobs: Sequence[Job], settings: SamplingSettings, *, batch_size: int = 8,
             path_for: Callable[[Job], Path] | None = None, reuse: bool = True,
             progress: Callable[[int, int], None] | None = None, pipe_kwargs: dict | None = None) -> list[Sample]:
    """Sample the jobs' images in batches, saving each and reusing images already on disk.

    The pipeline's scheduler must already be the one `settings` names (see `set_scheduler`): the
    caller swaps it once per loaded pipeline.

    Args:
        pipe: a text-to-image diffusers pipeline.
        jobs: what to produce (see `jobs_for`).
        settings: sampling settings.
        batch_size: images per pipeline call.
        path_for: where each image is saved (None: not saved).
        reuse: load an image that exists at its path instead of generating it (the cache).
        progress: called with (done, total) after each batch.
        pipe_kwargs: further pipeline arguments shared by every call (`image`, `mask_image`, ...).

    Returns:
        One `Sample` per job, in the order of `jobs`.
    """
    results: list[Sample | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        path = path_for(job) if path_for else None
        if reuse and path is not None and path.exists():
            with Image.open(path) as im:
                results[i] = Sample(job, im.convert("RGB"), path, cached=True)
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        images = _sample_batch(pipe, [jobs[i] for i in idx], settings, pipe_kwargs or {})
        for i, image in zip(idx, images, strict=True):
            path = path_for(jobs[i]) if path_for else None
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                prompt_file = path.parent / "prompt.txt"
                if not prompt_file.exists():  # lets a person browse the cache
                    prompt_file.write_text(jobs[i].prompt + "\n")
            results[i] = Sample(jobs[i], image, path, cached=False)
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return results  # type: ignore[return-value]


def write_manifest(out_dir: Path, samples: Sequence[Sample], info: dict) -> None:
    """Write `manifest.jsonl` (one line per image) and `manifest.json` (settings + all images).

    Args:
        out_dir: folder the image paths are made relative to.
        samples: the generated samples.
        info: model, delta and settings, repeated on every line so that each line stands alone.
    """
    out_dir = Path(out_dir)
    rows = []
    for s in samples:
        file = str(s.path.relative_to(out_dir)) if s.path is not None else None
        rows.append({**asdict(s.job), "file": file, **info})
    with open(out_dir / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    images = [{k: r[k] for k in ("prompt", "prompt_index", "sample_index", "seed", "file")} for r in rows]
    (out_dir / "manifest.json").write_text(json.dumps({**info, "images": images}, indent=2) + "\n")
