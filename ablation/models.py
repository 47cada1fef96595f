"""Resolving model ids ("toy", a local directory or a hub id) and loading pipelines."""

from __future__ import annotations

from pathlib import Path

TOY_MODEL_ID = "toy"


def is_toy(model: str) -> bool:
    """True for the embedded toy-world model id (or its directory)."""
    if model == TOY_MODEL_ID:
        return True
    from ablation.toyworld import WEIGHTS_DIR

    try:
        return Path(model).resolve() == (WEIGHTS_DIR / "pipeline").resolve()
    except OSError:
        return False


def resolve_model(model: str) -> str:
    """Map a model id to what `from_pretrained` takes, failing early on a missing local path.

    Args:
        model: `toy`, a local diffusers directory, or a hub id such as `CompVis/stable-diffusion-v1-4`.

    Returns:
        A local directory path or the hub id unchanged.

    Raises:
        FileNotFoundError: the id looks like a local path (absolute, `./`, `~`) but does not exist, or a
            local directory has no `model_index.json`.
    """
    if not model or not model.strip():
        raise ValueError("--model is empty; pass `toy`, a local diffusers directory or a hub id")
    if model == TOY_MODEL_ID:
        from ablation.toyworld import pipeline_dir

        return str(pipeline_dir())
    path = Path(model).expanduser()
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} has no model_index.json; pass a diffusers pipeline directory "
                                    f"(saved with `save_pretrained`) or a hub id")
        return str(path)
    if looks_local:
        raise FileNotFoundError(f"model path {model!r} does not exist; pass `toy`, an existing diffusers directory "
                                f"or a hub id like `CompVis/stable-diffusion-v1-4`")
    return model


def load_pipeline(model: str, torch_dtype=None, **kwargs):
    """Load any diffusers pipeline by id (see `resolve_model`), safetensors only, no remote code."""
    import torch
    from diffusers import DiffusionPipeline

    kwargs.setdefault("use_safetensors", True)
    pipe = DiffusionPipeline.from_pretrained(resolve_model(model), torch_dtype=torch_dtype or torch.float32,
                                             **kwargs)
    return pipe
