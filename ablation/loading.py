"""Loading an ablated model: classify a delta path, check it against the base, apply it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ablation.delta import (
    DELTA_FILENAME,
    DeltaNotFoundError,
    apply_delta,
    check_fingerprint,
    check_safetensors_file,
    load_delta,
    pipeline_config_hash,
    read_metadata,
)
from ablation.lora_convert import LORA_WEIGHT_NAME

logger = logging.getLogger("ablation.checkpoint")


def resolve_delta(path: str | Path, *, validate: bool = True) -> tuple[str, Path]:
    """Classify what a delta path points at: ("delta", file), ("lora", dir) or ("pipeline", dir).

    A run's output directory resolves to its `delta.safetensors`, else its `lora/`, else its `pipeline/`.
    With `validate` (default) a delta or LoRA file's safetensors header is checked (cheap, no tensors
    read), so CLIs can call this before loading any model.

    Raises:
        DeltaNotFoundError: the path does not exist or holds none of these (a ConfigError and a
            FileNotFoundError).
        DeltaFileError: the delta / LoRA file is truncated, random or not safetensors.
    """
    path = Path(path).expanduser()
    kind, found = _classify(path)
    if validate and kind == "delta":
        check_safetensors_file(found)
    elif validate and kind == "lora":
        check_safetensors_file(found / LORA_WEIGHT_NAME, what="LoRA file")
    return kind, found


def _classify(path: Path) -> tuple[str, Path]:
    if path.is_file():
        return "delta", path
    if not path.is_dir():
        raise DeltaNotFoundError(f"delta {path} does not exist; pass a delta.safetensors, a run's output folder, "
                                 f"a LoRA folder or an exported pipeline folder")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / DELTA_FILENAME).is_file():
        return "delta", path / DELTA_FILENAME
    if (path / LORA_WEIGHT_NAME).is_file():
        return "lora", path
    if (path / "lora" / LORA_WEIGHT_NAME).is_file():
        return "lora", path / "lora"
    if (path / "pipeline" / "model_index.json").is_file():
        return "pipeline", path / "pipeline"
    raise DeltaNotFoundError(f"{path} has no {DELTA_FILENAME}, {LORA_WEIGHT_NAME}, lora/ or pipeline/")


def _load_base(base_model, torch_dtype, pipeline_cls, **kwargs):
    if not isinstance(base_model, str | Path):
        return base_model  # already a pipeline object
    from ablation.models import dtype_kwarg, load_pipeline, resolve_model

    if pipeline_cls is None:
        return load_pipeline(str(base_model), torch_dtype=torch_dtype, **kwargs)
    kwargs.setdefault("use_safetensors", True)
    return pipeline_cls.from_pretrained(resolve_model(str(base_model)), **dtype_kwarg(torch_dtype or torch.float32),
                                        **kwargs)


def check_base(pipe, metadata: Mapping[str, str], source: str | Path, *, keys: Iterable[str] | None = None,
               force: bool = False) -> None:
    """Check that a delta fits the base model `pipe` before it is applied.

    A different UNet config is a warning (expected for an inpainting variant of the same family). When
    `keys` (the delta's or LoRA's tensor names) are given and the metadata records a base-weights
    fingerprint, other base weights (same architecture, e.g. another fine-tune or seed) are refused.

    Raises:
        BaseMismatchError: the fingerprint differs and `force` is False.
    """
    expected = metadata.get("base_config_hash")
    actual = pipeline_config_hash(pipe)
    if expected and expected != actual:
        logger.warning("%s was trained on base model %r whose UNet config differs from this pipeline's "
                       "(hash %s... vs %s...); the ablation may not transfer (expected for an inpainting variant "
                       "of the same family)", source, metadata.get("base_model", "?"), expected[:12], actual[:12])
    if keys is not None:
        check_fingerprint(pipe, metadata, keys, source, force=force)


def _lora_keys(lora_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(lora_dir / LORA_WEIGHT_NAME), framework="pt") as f:
        return list(f.keys())  # noqa: SIM118


def load_ablated_pipeline(
    base_model,
    delta_path: str | Path,
    *,
    torch_dtype=None,
    pipeline_cls=None,
    strict: bool | None = None,
    force: bool = False,
    **kwargs,
):
    """Load a base pipeline with an ablation applied.

    Args:
        base_model: `toy`, a diffusers directory, a single-file checkpoint, a hub id, or an already loaded
            pipeline object.
        delta_path: a `delta.safetensors`, a run's output directory (its delta, else `lora/`, else
            `pipeline/`), a LoRA directory (applied with `load_lora_weights`, adapters kept unfused), or a
            complete pipeline directory (loaded directly; `base_model` is then ignored).
        torch_dtype: dtype to load in (default float32).
        pipeline_cls: pipeline class, e.g. `StableDiffusionInpaintPipeline` to use the delta of a
            text-to-image run for inpainting with the same family (attention weights share names and
            shapes; only `conv_in` differs).
        strict: passed to `apply_delta`. None: strict unless the UNet input channels differ from 4
            (inpainting, upscaling), where a `full-weight` delta's `conv_in` is skipped with a warning.
        force: apply even when the delta records other base weights than `base_model`'s (warning instead
            of BaseMismatchError).
        **kwargs: forwarded to `from_pretrained`.

    Returns:
        The pipeline.

    Raises:
        DeltaNotFoundError / DeltaFileError: a missing or unreadable delta (before the base is loaded).
        BaseMismatchError: the delta was trained on other base weights (without `force`).
    """
    kind, path = resolve_delta(delta_path)
    if kind == "pipeline":
        return _load_base(path, torch_dtype, pipeline_cls, **kwargs)
    metadata = read_metadata(path)
    tensors = load_delta(path)[0] if kind == "delta" else None  # read (and validated) before the base loads
    pipe = _load_base(base_model, torch_dtype, pipeline_cls, **kwargs)
    keys = list(tensors) if tensors is not None else _lora_keys(path)
    check_base(pipe, metadata, path, keys=keys, force=force)
    if kind == "lora":
        pipe.load_lora_weights(str(path))
        return pipe
    if strict is None:
        unet = getattr(pipe, "unet", None)  # SD3 / FLUX have a transformer: always strict
        strict = unet is None or getattr(unet.config, "in_channels", 4) == 4
    apply_delta(pipe, tensors, strict=strict)
    return pipe
