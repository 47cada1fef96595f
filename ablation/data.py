"""Training data: anchor latents (generated and cached, or encoded from real images) and prompt embeddings.

Model-based anchors are sampled by the model itself (`ablation.sampling.anchors`) and kept as latents:
decoding and re-encoding them would only add VAE error. They are cached on disk as a Hugging Face
`datasets` dataset (columns `index`, `prompt`, `prompt_index`, `seed`, `latents`, and the settings in
`anchor_settings.json`) under a key that hashes everything that determines them (`SamplerSettings`:
the weights, configs, tokenizers and scheduler config via `anchor_model_key`, the hub revision, the
sampler, the precision, the negative prompt, the copy filter), so a rerun, or a second concept with
the same anchor, reuses them and any change regenerates them.
Generation is split across processes (image k on rank k % world_size); every image has its own seed,
so the set does not depend on the number of processes or the batch size.

Memorization anchors can pass a copy filter (`CopyFilter`: image-image cosine to the memorized image,
CLIP or a user's SSCD TorchScript file), which resamples copies. Real anchor images come from a folder,
a saved dataset, or clip-retrieval (`retrieve_images`, validated, atomic and resumable); every image
source is checked before expensive work (`check_image_source`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

# prompt encoding lives with the architecture adapters; its names stay importable from here
from ablation.architectures import PromptEmbeddings, encode_prompts, is_sdxl, sdxl_time_ids, training_adapter  # noqa: F401
from ablation.config import ConfigError
from ablation.io import atomic_write_bytes, atomic_write_text
from ablation.sampling.anchors import SamplerSettings, decode_latents, generate_latents

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RETRIEVAL_INSTALL = "pip install 'ablation[retrieval]'"


def _one_line(error: BaseException | str) -> str:
    """An exception's message on one line (PIL and torch messages may span several)."""
    return " ".join(str(error).split()) or type(error).__name__




# Config entries that say where, how or with which library version a model was saved, not what it
# computes (saving adds `_class_name` and `architectures`; the class is hashed separately; the dtype is
# in the weights' checksum).
_CONFIG_NOISE = {"transformers_version", "dtype", "torch_dtype", "architectures"}


def _config_dict(config) -> dict:
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if k not in _CONFIG_NOISE and not k.startswith("_")}


@torch.no_grad()
def _weights_checksum(module: torch.nn.Module) -> list:
    """Per tensor: name, shape, dtype, sum and sum of squares (float64, 10 significant digits).

    Every element enters the sums, so a change to one row (e.g. one token embedding) is seen, unlike a
    strided sample; rounding makes the key (almost always) the same on CPU and GPU, whose float64 sums
    differ in the last bits.
    """
    rows = []
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        if not t.is_floating_point():
            rows.append([name, list(t.shape), str(t.dtype), hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()])
            continue
        t = (t.cpu() if t.device.type == "mps" else t).to(torch.float64)  # MPS has no float64
        rows.append([name, list(t.shape), str(tensor.dtype), f"{t.sum().item():.10e}",
                     f"{t.square().sum().item():.10e}"])
    return rows


def _tokenizer_identity(tokenizer) -> list:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return [type(tokenizer).__name__, len(tokenizer), tokenizer.model_max_length, digest]


def anchor_model_key(model_id: str, model_path: str, pipe, revision: str | None) -> str:
    """Identity of everything in `pipe` that anchor sampling depends on, for the anchor cache key.

    Hashes the configs and the weight checksums (every tensor's sum and sum of squares) of the UNet, VAE
    and text encoder(s), the tokenizer(s) (class, length, vocabulary) and the scheduler config, with
    the hub revision. The weights themselves decide, not the path, file names or times: a copied or
    re-downloaded model reuses its anchors, a retrained one (same path and config) does not. Reads every
    weight once (0.85 s for the toy model on 2 CPU cores, most of it the tokenizer's vocabulary).

    Args:
        model_id: the id the user gave (`toy`, a directory or a hub id); logged, not hashed.
        model_path: what it resolved to (`ablation.models.resolve_model`); logged, not hashed.
        pipe: the loaded pipeline, in the dtype it samples with.
        revision: hub revision (branch, tag or commit), or None.

    Returns:
        A 32-hex-digit key.
    """
    parts: dict = {"revision": revision}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            parts[name] = {"class": type(module).__name__, "config": _config_dict(module.config),
                           "weights": _weights_checksum(module)}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            parts[name] = _tokenizer_identity(tokenizer)
    parts["scheduler"] = {"class": type(pipe.scheduler).__name__, "config": _config_dict(pipe.scheduler.config)}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    logger.debug("anchor model key of %s (%s, revision %s): %s", model_id, model_path, revision, digest[:32])
    return digest[:32]


@dataclass
class AnchorSet:
    """Anchor latents of one concept; `prompt_index[i]` is the anchor prompt of `latents[i]`."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    generated: bool  # False when read from the cache or from images
    trajectory: torch.Tensor | None = None  # [N, S, C, H, W]: the state each of the sampler's S steps starts from
    trajectory_t: torch.Tensor | None = None  # [N, S]: the timestep each state belongs to


# --------------------------------------------------------------------------------------------------
# copy filter (memorization anchors)
# --------------------------------------------------------------------------------------------------

# Image-image cosine above which an anchor counts as a copy of the memorized image. CLIP: 0.9, as the
# memorization rate of `ablate eval` (eval/README.md); SSCD: 0.5, the paper's and the official code's
# threshold (`filter` in its utils.py keeps images with descriptor similarity <= 0.5).
CLIP_COPY_THRESHOLD = 0.9
SSCD_COPY_THRESHOLD = 0.5

EmbedFn = Callable[[Sequence[Any]], torch.Tensor]


@torch.no_grad()
def filter_copies(latents_or_images, reference_image, embed_fn: EmbedFn, threshold: float = CLIP_COPY_THRESHOLD,
                  *, vae=None, batch_size: int = 16) -> torch.Tensor:
    """Which anchors to keep: those whose embedding's cosine to the reference image is <= `threshold`.

    Args:
        latents_or_images: anchor latents `[N, C, h, w]` (decoded with `vae`) or a list of PIL images.
        reference_image: the memorized image (PIL image or path).
        embed_fn: images -> `[N, D]` embeddings, e.g. `ClipJudge.image_features` (threshold
            `CLIP_COPY_THRESHOLD`) or `load_torchscript_embedder(sscd_file)` (threshold `SSCD_COPY_THRESHOLD`).
        threshold: similarity above which an anchor is a copy.
        vae: decodes latents; needed only for latents.
        batch_size: images per `embed_fn` call.

    Returns:
        Boolean mask `[N]` (CPU): True for anchors to keep.
    """
    from PIL import Image

    if isinstance(latents_or_images, torch.Tensor):
        if vae is None:
            raise ValueError("filter_copies needs the vae to decode latents")
        images = decode_latents(vae, latents_or_images)
    else:
        images = list(latents_or_images)
    if not images:
        return torch.zeros(0, dtype=torch.bool)
    if not isinstance(reference_image, Image.Image):
        reference_image = Image.open(reference_image)
    reference = torch.nn.functional.normalize(embed_fn([reference_image.convert("RGB")]).float().cpu(), dim=-1)
    feats = torch.cat([embed_fn(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
    similarity = (torch.nn.functional.normalize(feats, dim=-1) @ reference.T).amax(dim=1)
    logger.debug("copy filter: similarity to the reference %s", [round(s, 3) for s in similarity.tolist()])
    return similarity <= threshold


@dataclass
class CopyFilter:
    """Drop anchors that copy a memorized image, sampling replacements (official memorization recipe).

    Attributes:
        reference_image: the memorized image (RGB PIL image).
        embed_fn: images -> embeddings (see `filter_copies`).
        embedder: identity of `embed_fn` for the cache key, e.g. `"toy-clip"`, a CLIP id, or
            `TorchScriptEmbedder.name` (which hashes the file).
        threshold: cosine above which an anchor is a copy (`CLIP_COPY_THRESHOLD` for CLIP image
            embeddings, `SSCD_COPY_THRESHOLD` for SSCD descriptors).
        max_rounds: replacement rounds at most; a slot still copying after them is dropped (with a warning).
    """

    reference_image: Any
    embed_fn: EmbedFn
    embedder: str
    threshold: float = CLIP_COPY_THRESHOLD
    max_rounds: int = 3

    def key(self) -> str:
        """Hash of what decides which anchors are kept (reference pixels, embedder, threshold, rounds)."""
        image = self.reference_image.convert("RGB")
        digest = hashlib.sha256(image.tobytes())
        digest.update(json.dumps([image.size, self.embedder, self.threshold, self.max_rounds]).encode())
        return digest.hexdigest()[:24]


def load_reference_image(path: str | Path):
    """The memorized image for a `CopyFilter`, fully decoded (RGB).

    Raises:
        ConfigError: one line naming the file when it is missing or not a readable image.
    """
    from PIL import Image

    path = Path(path).expanduser()
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:
        raise ConfigError(f"memorized image {str(path)!r} is not a readable image ({_one_line(e)})") from None


class TorchScriptEmbedder:
    """Image embeddings from a TorchScript image encoder such as SSCD (`sscd_disc_mixup.torchscript.pt`).

    Preprocessing is the SSCD one the official code uses (`small_288`): resize the shorter side to
    `resize` px (bilinear), ImageNet mean/std normalisation.

    Warning: `torch.jit.load` runs the file's TorchScript code. It is not a pickle of arbitrary Python
    objects, but a hostile file can still do harm: load only files the user supplied and trusts.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, resize: int = 288):
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"SSCD/TorchScript model {str(path)!r} is not a file")
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digest = sha.hexdigest()
        self.device = torch.device(device or "cpu")
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:  # RuntimeError of any kind for a file that is not TorchScript
            raise ConfigError(f"cannot load TorchScript model {str(path)!r}: {_one_line(e)}") from None
        self.resize = resize
        self.name = f"torchscript:{digest[:16]}:{resize}"

    def _tensor(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """`[N, D]` descriptors; images of different sizes go through the model separately."""
        tensors = [self._tensor(im) for im in images]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for rows in by_shape.values():
            feats = self.model(torch.stack([tensors[i] for i in rows]).to(self.device)).float().cpu()
            for i, f in zip(rows, feats, strict=True):
                out[i] = f
        return torch.stack(out)


def load_torchscript_embedder(path: str | Path, device: str | torch.device | None = None) -> TorchScriptEmbedder:
    """Load a user-supplied SSCD (or other TorchScript) image encoder; see `TorchScriptEmbedder` (runs its code).

    Raises:
        ConfigError: the file is missing or not TorchScript.
    """
    return TorchScriptEmbedder(path, device)


# --------------------------------------------------------------------------------------------------
# model-based anchors: the cache (the sampling itself is ablation.sampling.anchors)
# --------------------------------------------------------------------------------------------------


def _generate_filtered(pipe, settings: SamplerSettings, indices: list[int], batch_size: int,
                       copy_filter: CopyFilter, disable_progress: bool, offload_text_encoders: bool = False
                       ) -> dict[str, list]:
    """Sample, drop copies, resample the dropped slots with fresh seeds (`seed + r * count + k` in round r).

    A slot keeps its prompt; its seeds depend only on k and the round, so the set is the same for any
    number of processes.
    """
    kept: dict[int, int] = {}  # slot -> row in `rows`
    rows: dict[str, list] = {}
    pending = list(indices)
    for round_ in range(copy_filter.max_rounds + 1):
        if not pending:
            break
        seeds = [settings.seed + round_ * settings.count + k for k in pending]
        columns = generate_latents(pipe, settings, pending, batch_size, disable_progress or round_ > 0, seeds,
                                   offload_text_encoders)
        keep = filter_copies(torch.from_numpy(np.stack(columns["latents"])), copy_filter.reference_image,
                             copy_filter.embed_fn, copy_filter.threshold, vae=pipe.vae)
        for j, ok in enumerate(keep.tolist()):
            if ok:
                for name, values in columns.items():
                    rows.setdefault(name, []).append(values[j])
                kept[columns["index"][j]] = len(rows["index"]) - 1
        pending = [k for k, ok in zip(pending, keep.tolist(), strict=True) if not ok]
        if pending:
            logger.info("copy filter: %d of this process's anchors copy the reference image; resampling (round %d)",
                        len(pending), round_ + 1)
    if pending:
        logger.warning("copy filter: %d anchor images still copied the reference after %d rounds; dropped them",
                       len(pending), copy_filter.max_rounds)
    order = [kept[k] for k in sorted(kept)]
    names = ["index", "prompt", "prompt_index", "seed", "latents"]
    names += ["trajectory", "trajectory_t"] if settings.trajectory else []
    return {name: [rows.get(name, [])[r] for r in order] for name in names}


def _to_dataset(columns: dict[str, list], latent_shape: tuple[int, ...], steps: int = 0):
    from datasets import Array3D, Array4D, Dataset, Features, Sequence, Value

    features = {"index": Value("int64"), "prompt": Value("string"), "prompt_index": Value("int64"),
                "seed": Value("int64"), "latents": Array3D(shape=latent_shape, dtype="float32")}
    if "trajectory" in columns:
        features["trajectory"] = Array4D(shape=(steps, *latent_shape), dtype="float32")
        features["trajectory_t"] = Sequence(Value("float32"), length=steps)
    return Dataset.from_dict(columns, features=Features(features))


def _latent_shape(pipe, columns: dict[str, list], resolution: int) -> tuple[int, ...]:
    """Shape of one latent (also for a process that kept none)."""
    if columns["latents"]:
        return tuple(columns["latents"][0].shape)
    factor = getattr(pipe, "vae_scale_factor", 8)
    unet = getattr(pipe, "unet", None)  # SD3 / FLUX: the VAE's channels (FLUX's transformer takes them packed)
    channels = unet.config.in_channels if unet is not None else pipe.vae.config.latent_channels
    return (channels, resolution // factor, resolution // factor)


SETTINGS_FILE = "anchor_settings.json"


def _atomic_save(dataset, final: Path, settings: SamplerSettings) -> None:
    """Write the dataset and its settings to a temporary directory beside `final`, then rename.

    Readers never see half a cache. A unique temporary name (not `ablation.io.atomic_dir`, which clears
    other writers' temporaries) lets two runs generate the same key at once; the loser's identical copy
    is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        dataset.save_to_disk(str(tmp / "data"))
        (tmp / "data" / SETTINGS_FILE).write_text(json.dumps(settings.__dict__, indent=1, default=list))
        try:
            os.rename(tmp / "data", final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_anchor_set(path: Path, generated: bool) -> AnchorSet:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path)).with_format("numpy")
    latents = torch.from_numpy(np.asarray(dataset["latents"], dtype=np.float32))
    index = torch.from_numpy(np.asarray(dataset["prompt_index"], dtype=np.int64))
    trajectory = trajectory_t = None
    if "trajectory" in dataset.column_names:
        trajectory = torch.from_numpy(np.asarray(dataset["trajectory"], dtype=np.float32))
        trajectory_t = torch.from_numpy(np.asarray(dataset["trajectory_t"], dtype=np.float32))
    return AnchorSet(latents=latents, prompt_index=index, generated=generated, trajectory=trajectory,
                     trajectory_t=trajectory_t)


def cached_anchor_latents(pipe, settings: SamplerSettings, cache_dir: str | Path, batch_size: int = 16,
                          autocast=None, copy_filter: CopyFilter | None = None,
                          offload_text_encoders: bool = False) -> AnchorSet:
    """Anchor latents from the cache, generating (distributed) and caching them on a miss.

    Every process must call this (it synchronises them).

    Args:
        pipe: the pretrained pipeline, on its device.
        settings: what determines the latents (its hash is the cache key); `settings.precision` must
            match `autocast`.
        cache_dir: cache root.
        batch_size: images per generation batch.
        autocast: optional context manager factory for mixed-precision sampling.
        copy_filter: drop (and resample) anchors that copy a memorized image; part of the cache key.
        offload_text_encoders: the text encoders are in CPU memory (`generate_latents`); not part of the key.

    Returns:
        The anchor set; `generated` tells whether this call sampled it. With a copy filter it may hold
        fewer than `settings.count` images (a warning says so).
    """
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Saving the dataset" bars would drown the training log
    if copy_filter is not None:
        settings = dataclasses.replace(settings, copy_filter=copy_filter.key())
    state = PartialState()
    final = Path(cache_dir).expanduser() / settings.cache_key()
    hit = (final / "dataset_info.json").exists()
    state.wait_for_everyone()  # everybody looked before anybody writes
    if hit:
        anchors = _load_anchor_set(final, generated=False)
        logger.info("anchor cache hit: %s (%d images)", final, len(anchors.latents))
        return _checked_count(anchors, settings)
    logger.info("generating %d anchor images (%s, %d steps, guidance %.1f, %s%s) into %s", settings.count,
                settings.scheduler, settings.steps, settings.guidance, settings.precision,
                ", copy filter" if copy_filter else "", final)
    shards = final.parent / f"{final.name}.shards"
    indices = list(range(state.process_index, settings.count, state.num_processes))
    disable = not state.is_local_main_process
    with autocast() if autocast else contextlib.nullcontext():
        if copy_filter is None:
            columns = generate_latents(pipe, settings, indices, batch_size, disable_progress=disable,
                                       offload_text_encoders=offload_text_encoders)
        else:
            columns = _generate_filtered(pipe, settings, indices, batch_size, copy_filter, disable,
                                         offload_text_encoders)
    shape = _latent_shape(pipe, columns, settings.resolution)
    # `datasets` cannot save an empty dataset: a process whose anchors were all copies writes no shard,
    # and an empty set is never cached (every process then fails below, none waits forever).
    if state.num_processes == 1:
        if columns["index"]:
            _atomic_save(_to_dataset(columns, shape, settings.steps), final, settings)
    else:
        if columns["index"]:
            _to_dataset(columns, shape, settings.steps).save_to_disk(str(shards / f"rank-{state.process_index}"))
        state.wait_for_everyone()
        if state.is_main_process:
            from datasets import concatenate_datasets, load_from_disk

            parts = [load_from_disk(str(shards / f"rank-{r}")) for r in range(state.num_processes)
                     if (shards / f"rank-{r}").exists()]
            if parts:
                merged = concatenate_datasets(parts).sort("index")
                _atomic_save(merged.flatten_indices(), final, settings)
            shutil.rmtree(shards, ignore_errors=True)
    state.wait_for_everyone()
    if not (final / "dataset_info.json").exists():
        raise RuntimeError(f"no anchor image is left: every one copied the reference image (settings {final.name}); "
                           f"raise the copy threshold or change the anchor prompts")
    return _checked_count(_load_anchor_set(final, generated=True), settings)


def _checked_count(anchors: AnchorSet, settings: SamplerSettings) -> AnchorSet:
    """Warn on a short set (the copy filter drops slots it cannot fill)."""
    if len(anchors.latents) < settings.count:
        logger.warning("using %d of %d anchor images: the others copied the reference image",
                       len(anchors.latents), settings.count)
    return anchors


# --------------------------------------------------------------------------------------------------
# image-based anchors: folders, datasets, retrieval
# --------------------------------------------------------------------------------------------------


def check_image_source(path: str | None, retrieval: bool, count: int | None = None) -> None:
    """Fail early on a bad image source, before any expensive work.

    Checks that --retrieval has clip-retrieval installed, that `path` is an image folder or a saved
    dataset with an `image` column, and that every image training will use (the first `count`, or
    all) opens (`PIL.Image.verify`, which reads headers and structure without decoding the pixels).
    Warns (one line) when fewer than `count` images exist.

    Raises:
        ConfigError: one line naming the folder or the first unreadable file.
    """
    if retrieval:
        import importlib.util

        if importlib.util.find_spec("clip_retrieval") is None:
            raise ConfigError(f"--retrieval needs clip-retrieval: {RETRIEVAL_INSTALL}")
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--anchor-images {path!r} is not a directory (image folder or saved dataset)")
    found = _verify_dataset(p, count) if _is_dataset_dir(p) else _verify_folder(p, count)
    if found == 0:
        raise ConfigError(f"--anchor-images {path!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if count is not None and found < count:
        logger.warning("--anchor-images %r has %d images, fewer than the %d requested (--num-anchor-images); "
                       "training uses the %d", path, found, count, found)


def _image_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))


def _verify_folder(path: Path, count: int | None) -> int:
    """Verify the first `count` image files; returns how many files there are (at most `count`)."""
    from PIL import Image

    files = _image_files(path)[:count]
    for f in files:
        try:
            with Image.open(f) as image:
                image.verify()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ConfigError(f"--anchor-images: {f} is not a readable image ({_one_line(e)})") from None
    return len(files)


def _dataset_split(path: Path):
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as e:
        raise ConfigError(f"--anchor-images: cannot read the dataset {str(path)!r} ({_one_line(e)})") from None
    if hasattr(dataset, "keys"):  # a DatasetDict: take the first split
        dataset = dataset[next(iter(dataset.keys()))]
    if "image" not in dataset.column_names:
        raise ConfigError(f"dataset {str(path)!r} has no `image` column (columns: {dataset.column_names})")
    return dataset


def _verify_dataset(path: Path, count: int | None) -> int:
    """Verify the first `count` images of a saved dataset from their encoded bytes (no decoding)."""
    import io

    from datasets import Image as ImageFeature
    from PIL import Image

    dataset = _dataset_split(path)
    n = len(dataset) if count is None else min(count, len(dataset))
    try:
        raw = dataset.select(range(n)).cast_column("image", ImageFeature(decode=False))["image"]
    except Exception as e:
        raise ConfigError(f"dataset {str(path)!r}: column `image` is not an image column ({_one_line(e)})") from None
    for row, item in enumerate(raw):
        try:
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            with Image.open(source) as image:
                image.verify()
        except Exception as e:
            raise ConfigError(f"--anchor-images: image {row} of dataset {str(path)!r} is not readable "
                              f"({_one_line(e)})") from None
    return n


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def load_images(path: str | Path, limit: int | None = None) -> list:
    """PIL images (RGB) from a folder (sorted by name) or a saved `datasets` dataset (column `image`).

    Raises:
        ConfigError: an image cannot be decoded (named in the message).
    """
    from PIL import Image

    path = Path(path).expanduser()
    if _is_dataset_dir(path):
        dataset = _dataset_split(path)
        try:
            images = list(dataset["image"][:limit] if limit else dataset["image"])
            return [img.convert("RGB") for img in images]
        except Exception as e:
            raise ConfigError(f"dataset {str(path)!r}: an image cannot be decoded ({_one_line(e)})") from None
    out = []
    for f in _image_files(path)[:limit]:
        try:
            with Image.open(f) as image:
                out.append(image.convert("RGB"))
        except Exception as e:
            raise ConfigError(f"{f} is not a readable image ({_one_line(e)})") from None
    return out


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
        sample = dist.sample(generator=generator).float().cpu()
        shift = getattr(vae.config, "shift_factor", None)
        if shift:  # SD3 / FLUX VAEs: (z - shift) * scale, the inverse of `decode_latents`
            sample = sample - shift
        out.append(sample * vae.config.scaling_factor)
    return torch.cat(out)


DEFAULT_RETRIEVAL_URL = "https://knn.laion.ai/knn-service"
DEFAULT_RETRIEVAL_INDEX = "laion5B-L-14"
RETRIEVAL_STATE = "retrieval.json"  # written last, with "complete": true, when the folder is filled
MIN_RETRIEVED_SIDE = 128  # smaller images are thumbnails or icons, useless as anchors
MAX_DOWNLOAD_BYTES = 32 << 20
_SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}


def validate_image_bytes(data: bytes, min_side: int = MIN_RETRIEVED_SIDE) -> tuple[bytes, str]:
    """Check downloaded bytes are a whole image of at least `min_side` px; returns (bytes to store, suffix).

    `verify()` checks the structure, a full decode catches truncation. Formats the loader does not list
    (GIF, TIFF, ...) are re-encoded as PNG.

    Raises:
        ValueError: not an image (e.g. an HTML error page), truncated, or too small.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            fmt = image.format
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
            converted = None
            if fmt not in _SUFFIX_OF_FORMAT:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "PNG")
                converted = buffer.getvalue()
    except Exception as e:
        raise ValueError(f"not a readable image ({_one_line(e)})") from None
    if min(size) < min_side:
        raise ValueError(f"{size[0]}x{size[1]} px is smaller than {min_side} px")
    return (data, _SUFFIX_OF_FORMAT[fmt]) if converted is None else (converted, ".png")


def _download(url: str, timeout: float) -> bytes:
    """Bytes at an http(s) URL, at most MAX_DOWNLOAD_BYTES (an index's URL must not read local files)."""
    import urllib.parse
    import urllib.request

    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "ablation-anchor-retrieval"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def _read_retrieval_state(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RETRIEVAL_STATE).read_text())
    except (OSError, ValueError):
        return None


def _kept_images(out_dir: Path, min_side: int) -> dict[int, Path]:
    """Valid images already in `out_dir` by result number; deletes invalid ones and killed writers' temporaries.

    Folders filled by older versions saved error pages as .jpg: those go here.
    """
    kept: dict[int, Path] = {}
    if not out_dir.is_dir():
        return kept
    for f in sorted(out_dir.iterdir()):
        if f.name.startswith(".") and ".tmp-" in f.name:
            f.unlink(missing_ok=True)
            continue
        if f.suffix.lower() not in IMAGE_SUFFIXES or not f.stem.isdigit():
            continue
        try:
            validate_image_bytes(f.read_bytes(), min_side)
        except (OSError, ValueError) as e:
            logger.info("removing invalid retrieved image %s: %s", f, e)
            f.unlink(missing_ok=True)
            continue
        kept[int(f.stem)] = f
    return kept


def retrieve_images(query: str, count: int, out_dir: str | Path, *, url: str = DEFAULT_RETRIEVAL_URL,
                    index: str = DEFAULT_RETRIEVAL_INDEX, overwrite: bool = False,
                    min_side: int = MIN_RETRIEVED_SIDE, timeout: float = 10.0) -> Path:
    """Download up to `count` images for `query` from a CLIP retrieval service into `out_dir`, resumably.

    Each download is checked (`validate_image_bytes`) and written atomically as `<result number>.<ext>`.
    `retrieval.json` records the query, endpoint and index, and `"complete": true` once the folder is
    filled: a complete folder for the same query, endpoint, index and at least `count` images is
    reused without a query; a partial one (a killed run) keeps its valid images and is topped up; one
    for another query, endpoint or index, or any folder with `overwrite`, is emptied first.
    Call it on the main process only.

    Args:
        query: text query (the anchor concept).
        count: images wanted.
        out_dir: destination folder.
        url: clip-retrieval service (`ClipClient(url=...)`).
        index: index name on that service (`indice_name`).
        overwrite: discard what `out_dir` holds and download again.
        min_side: smallest accepted image side in pixels.
        timeout: seconds per download.

    Returns:
        `out_dir`.

    Raises:
        ConfigError: clip-retrieval missing, or the service cannot be queried.
        RuntimeError: no result could be downloaded.
    """
    out_dir = Path(out_dir)
    identity = {"query": query, "url": url, "index": index}
    state = _read_retrieval_state(out_dir)
    stale = state is not None and any(state.get(k) != v for k, v in identity.items())
    if (overwrite or stale) and out_dir.exists():
        logger.info("emptying %s (%s)", out_dir, "--overwrite" if overwrite else "another query, endpoint or index")
        shutil.rmtree(out_dir)
        state = None
    kept = _kept_images(out_dir, min_side)
    complete = state is not None and state.get("complete") and count <= state.get("requested", 0)
    if complete and len(kept) >= min(count, state.get("saved", count)):
        logger.info("reusing %d retrieved images in %s", len(kept), out_dir)
        return out_dir
    try:
        from clip_retrieval.clip_client import ClipClient
    except ImportError:
        raise ConfigError(f"--retrieval needs clip-retrieval: {RETRIEVAL_INSTALL}") from None
    try:
        client = ClipClient(url=url, indice_name=index, num_images=4 * count)
        results = list(client.query(text=query))
    except Exception as e:
        raise ConfigError(f"--retrieval: querying {url} (index {index!r}) failed: {_one_line(e)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RETRIEVAL_STATE, json.dumps({**identity, "requested": count, "complete": False}))
    saved = len(kept)
    for i, result in enumerate(tqdm(results, desc=f"retrieving {query!r}")):
        if saved >= count:
            break
        if i in kept:
            continue
        try:
            data, suffix = validate_image_bytes(_download(result["url"], timeout), min_side)
        except Exception as e:  # dead links, error pages and thumbnails are common in LAION; skip them
            logger.debug("skipping %s: %s", result.get("url"), _one_line(e))
            continue
        atomic_write_bytes(out_dir / f"{i:06d}{suffix}", data)
        saved += 1
    if not saved:
        raise RuntimeError(f"clip-retrieval returned no downloadable images for {query!r} ({url}, {index})")
    if saved < count:
        logger.warning("retrieved %d of %d images for %r (the other results were dead links or not images)",
                       saved, count, query)
    atomic_write_text(out_dir / RETRIEVAL_STATE, json.dumps({**identity, "requested": count, "complete": True,
                                                             "saved": saved}, indent=1))
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
