"""ablation: remove concepts from text-to-image diffusion models (Kumari et al., ICCV 2023)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AblationResult", "__version__", "ablate", "evaluate", "load_ablated_pipeline"]


def __getattr__(name: str):
    # Lazy so that `import ablation` (e.g. for --help) does not import torch and diffusers.
    if name == "load_ablated_pipeline":
        from ablation.checkpoint import load_ablated_pipeline

        return load_ablated_pipeline
    if name in ("ablate", "evaluate", "AblationResult"):
        from ablation import api

        return getattr(api, name)
    raise AttributeError(f"module 'ablation' has no attribute {name!r}")
