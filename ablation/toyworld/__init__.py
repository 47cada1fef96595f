"""The embedded toy world: a procedural renderer of the paper's concepts and the small
Stable-Diffusion-shaped model, toy CLIP judge and x4 upscaler trained on it (shipped as safetensors).

`toy` is accepted wherever a model id is; it resolves to `pipeline_dir()`. `toy-sd3` resolves to `sd3_dir()`, a
small SD3-shaped MMDiT trained on the same world (scripts/train_toy_mmdit.py).
"""

from __future__ import annotations

from pathlib import Path

from ablation.toyworld.catalog import Catalog, Concept, Family, catalog

WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["Catalog", "Concept", "Family", "catalog", "clip_dir", "pipeline_dir", "sd3_dir", "upscaler_dir",
           "WEIGHTS_DIR"]


def _existing(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not (path / "model_index.json").exists() and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the toy-world weights {path} are missing; reinstall the package from a full checkout, "
            f"or train them with `python scripts/train_toyworld.py` (docs/toyworld.md)"
        )
    return path


def pipeline_dir() -> Path:
    """Directory of the toy `StableDiffusionPipeline` (loadable with `from_pretrained`, offline)."""
    return _existing("pipeline")


def sd3_dir() -> Path:
    """Directory of the toy MMDiT `StableDiffusion3Pipeline` (`toy-sd3`; its VAE and text tower are links to
    the UNet toy model's files)."""
    return _existing("sd3")


def clip_dir() -> Path:
    """Directory of the toy `CLIPModel` + `CLIPProcessor`, the judge of the toy world."""
    return _existing("clip")


def upscaler_dir() -> Path:
    """Directory of the toy x4 `StableDiffusionUpscalePipeline` (16 -> 64 px)."""
    return _existing("upscaler")
