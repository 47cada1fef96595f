"""Training data: anchor latents (generated and cached, or encoded from real images) and prompt embeddings.

Model-based anchors are sampled by the model itself with `output_type="latent"` and kept as latents:
decoding and re-encoding them would only add VAE error. They are cached on disk as a Hugging Face
`datasets` dataset (columns `prompt`, `prompt_index`, `seed`, `latents`) under a key that hashes
everything that determines them, so a rerun, or a second concept with the same anchor, reuses them.
Generation is split across processes (image k on rank k % world_size); every image has its own seed,
so the set does not depend on the number of processes or the batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ablation.config import ConfigError

logger = logging.getLogger(__name__)

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RETRIEVAL_INSTALL = "pip install 'ablation[retrieval]'"


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that determines a set of generated anchor latents."""

    model_key: str
    prompts: tuple[str, ...]
    scheduler: str
    steps: int
    guidance: float
    resolution: int
    count: int
    seed: int

    def cache_key(self) -> str:
        """Hash of the settings (directory name in the cache)."""
        blob = json.dumps(self.__dict__, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


@dataclass
class AnchorSet:
    """Anchor latents of one concept; `prompt_index[i]` is the anchor prompt of `latents[i]`."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    generated: bool  # False when read from the cache or from images


# --------------------------------------------------------------------------------------------------
# model-based anchors: generation and cache
# --------------------------------------------------------------------------------------------------


def _sampler(pipe, name: str):
    import diffusers

    return getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_latents(pipe, settings: SamplerSettings, indices: list[int], batch_size: int,
                     disable_progress: bool = False) -> dict[str, list]:
    """Sample anchor latents for the given image indices (image k: prompt k mod P, seed `seed + k`).

    Returns:
        Columns `prompt`, `prompt_index`, `seed`, `latents` (float32 arrays, the UNet's latent space).
    """
    original = pipe.scheduler
    pipe.scheduler = _sampler(pipe, settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    num_prompts = len(settings.prompts)
    columns: dict[str, list] = {"prompt": [], "prompt_index": [], "seed": [], "latents": []}
    try:
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        for batch in tqdm(batches, desc="anchor images", disable=disable_progress):
            prompts = [settings.prompts[k % num_prompts] for k in batch]
            seeds = [settings.seed + k for k in batch]
            # CPU generators: the same anchors on every device.
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            out = pipe(prompt=prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       height=settings.resolution, width=settings.resolution, generator=generators,
                       output_type="latent")
            latents = out.images.float().cpu().numpy()
            columns["prompt"] += prompts
            columns["prompt_index"] += [k % num_prompts for k in batch]
            columns["seed"] += seeds
            columns["latents"] += list(latents)
    finally:
        pipe.scheduler = original
    return columns


def _to_dataset(columns: dict[str, list]):
    from datasets import Array3D, Dataset, Features, Value

    shape = tuple(columns["latents"][0].shape) if columns["latents"] else (1, 1, 1)
    features = Features({"prompt": Value("string"), "prompt_index": Value("int64"), "seed": Value("int64"),
                         "latents": Array3D(shape=shape, dtype="float32")})
    return Dataset.from_dict(columns, features=features)


def _atomic_save(dataset, final: Path) -> None:
    """Write to a temporary directory beside `final`, then rename (readers never see half a cache)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        dataset.save_to_disk(str(tmp / "data"))
        try:
            os.rename(tmp / "data", final)
        except OSError:
            if not final.exists():  # another run may have won the race; its copy is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_anchor_set(path: Path, generated: bool) -> AnchorSet:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path)).with_format("numpy")
    latents = torch.from_numpy(np.asarray(dataset["latents"], dtype=np.float32))
    index = torch.from_numpy(np.asarray(dataset["prompt_index"], dtype=np.int64))
    return AnchorSet(latents=latents, prompt_index=index, generated=generated)


def cached_anchor_latents(pipe, settings: SamplerSettings, cache_dir: str | Path, batch_size: int = 16,
                          autocast=None) -> AnchorSet:
    """Anchor latents from the cache, generating (distributed) and caching them on a miss.

    Every process must call this (it synchronises them).

    Args:
        pipe: the pretrained pipeline, on its device.
        settings: what determines the latents (its hash is the cache key).
        cache_dir: cache root.
        batch_size: images per generation batch.
        autocast: optional context manager factory for mixed-precision sampling.

    Returns:
        The anchor set; `generated` tells whether this call sampled it.
    """
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Saving the dataset" bars would drown the training log
    state = PartialState()
    final = Path(cache_dir).expanduser() / settings.cache_key()
    hit = (final / "dataset_info.json").exists()
    state.wait_for_everyone()  # everybody looked before anybody writes
    if hit:
        logger.info("anchor cache hit: %s (%d images)", final, settings.count)
        return _load_anchor_set(final, generated=False)
    logger.info("generating %d anchor images (%s, %d steps, guidance %.1f) into %s", settings.count,
                settings.scheduler, settings.steps, settings.guidance, final)
    shards = final.parent / f"{final.name}.shards"
    indices = list(range(state.process_index, settings.count, state.num_processes))
    with autocast() if autocast else contextlib.nullcontext():
        columns = generate_latents(pipe, settings, indices, batch_size,
                                   disable_progress=not state.is_local_main_process)
    if state.num_processes == 1:
        _atomic_save(_to_dataset(columns), final)
    else:
        _to_dataset(columns).save_to_disk(str(shards / f"rank-{state.process_index}"))
        state.wait_for_everyone()
        if state.is_main_process:
            from datasets import concatenate_datasets, load_from_disk

            parts = [load_from_disk(str(shards / f"rank-{r}")) for r in range(state.num_processes)]
            merged = concatenate_datasets(parts).sort("seed")
            _atomic_save(merged.flatten_indices(), final)
            shutil.rmtree(shards, ignore_errors=True)
    state.wait_for_everyone()
    return _load_anchor_set(final, generated=True)


# --------------------------------------------------------------------------------------------------
# image-based anchors: folders, datasets, retrieval
# --------------------------------------------------------------------------------------------------


def check_image_source(path: str | None, retrieval: bool) -> None:
    """Fail early on a missing image folder/dataset, or on --retrieval without clip-retrieval installed."""
    if retrieval:
        import importlib.util

        if importlib.util.find_spec("clip_retrieval") is None:
            raise ConfigError(f"--retrieval needs clip-retrieval: {RETRIEVAL_INSTALL}")
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--anchor-images {path!r} is not a directory (image folder or saved dataset)")
        if not _is_dataset_dir(p) and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
            raise ConfigError(f"--anchor-images {path!r} has no images ({', '.join(IMAGE_SUFFIXES)})")


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def load_images(path: str | Path, limit: int | None = None) -> list:
    """PIL images (RGB) from a folder (sorted by name) or a saved `datasets` dataset (column `image`)."""
    from PIL import Image

    path = Path(path).expanduser()
    if _is_dataset_dir(path):
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take the first split
            dataset = dataset[next(iter(dataset.keys()))]
        if "image" not in dataset.column_names:
            raise ConfigError(f"dataset {str(path)!r} has no `image` column (columns: {dataset.column_names})")
        images = list(dataset["image"][:limit] if limit else dataset["image"])
    else:
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        images = [Image.open(f) for f in files]
    return [img.convert("RGB") for img in images]


def _preprocess(image, resolution: int) -> torch.Tensor:
    """Resize the shorter side, centre-crop, scale to [-1, 1] (CHW)."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae, images: list, resolution: int, seed: int, batch_size: int = 8) -> torch.Tensor:
    """VAE latents of images: `latent_dist.sample() * scaling_factor` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([_preprocess(img, resolution) for img in images[i:i + batch_size]])
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        out.append(dist.sample(generator=generator).float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def retrieve_images(query: str, count: int, out_dir: str | Path) -> Path:
    """Download up to `count` images for `query` from a public CLIP retrieval index (LAION) into `out_dir`."""
    try:
        from clip_retrieval.clip_client import ClipClient
    except ImportError:
        raise ConfigError(f"--retrieval needs clip-retrieval: {RETRIEVAL_INSTALL}") from None
    import urllib.request

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = ClipClient(url="https://knn.laion.ai/knn-service", indice_name="laion5B-L-14", num_images=4 * count)
    saved = 0
    for i, result in enumerate(client.query(text=query)):
        if saved >= count:
            break
        try:
            with urllib.request.urlopen(result["url"], timeout=10) as response:
                (out_dir / f"{i:06d}.jpg").write_bytes(response.read())
            saved += 1
        except Exception as e:  # dead links are common in LAION; skip them
            logger.debug("skipping %s: %s", result.get("url"), e)
    if not saved:
        raise RuntimeError(f"clip-retrieval returned no downloadable images for {query!r}")
    return out_dir


def image_anchor_latents(vae, source: str | Path, num_prompts: int, count: int, resolution: int,
                         seed: int) -> AnchorSet:
    """Anchor latents from real images; image i is paired with anchor prompt i mod P (captions are ignored)."""
    images = load_images(source, limit=count)
    if not images:
        raise ConfigError(f"no images in {str(source)!r}")
    latents = encode_images(vae, images, resolution, seed)
    return AnchorSet(latents=latents, prompt_index=torch.arange(len(images)) % num_prompts, generated=False)


# --------------------------------------------------------------------------------------------------
# prompt embeddings
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """Text conditioning of a list of prompts: `embeds` [N, L, D] and, for SDXL, `pooled` [N, P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> PromptEmbeddings:
        """Rows `index` (a batch)."""
        return PromptEmbeddings(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def to(self, device, dtype=None) -> PromptEmbeddings:
        """Moved (and optionally cast) copy."""
        return PromptEmbeddings(self.embeds.to(device, dtype),
                                None if self.pooled is None else self.pooled.to(device, dtype))


def is_sdxl(pipe) -> bool:
    """Two text encoders and pooled embeddings."""
    return getattr(pipe, "text_encoder_2", None) is not None


def encode_prompts(pipe, prompts: list[str], device, batch_size: int = 64) -> PromptEmbeddings:
    """Encode prompts with the pipeline's own `encode_prompt` (no classifier-free guidance).

    Gradients flow when the caller has not disabled them (the `embedding` group trains through it).
    """
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        if is_sdxl(pipe):
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            pooled.append(p)
        else:
            e, _ = pipe.encode_prompt(chunk, device, 1, False)
        embeds.append(e)
    return PromptEmbeddings(torch.cat(embeds), torch.cat(pooled) if pooled else None)


def sdxl_time_ids(resolution: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.expand(batch, 6)
