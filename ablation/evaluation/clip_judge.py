"""The CLIP judge: normalised image and text embeddings from any `CLIPModel` + `CLIPProcessor`.

Computed directly with `CLIPModel.get_image_features` / `get_text_features` rather than through
torchmetrics' CLIPScore, which fails on transformers 5 with local model directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ablation.config import DEFAULT_CLIP, LARGE_CLIP  # noqa: F401  (re-exported: the judges' ids)


def default_clip_for(model: str) -> str:
    """The judge to use for a generator: the toy CLIP for the toy model, else `DEFAULT_CLIP` (ViT-B/32, the paper's)."""
    from ablation.models import is_toy

    if is_toy(model):
        from ablation.toyworld import clip_dir

        return str(clip_dir())
    return DEFAULT_CLIP


def auto_device() -> torch.device:
    """CUDA when available, else CPU (evaluation never assumes a GPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected embedding;
    # transformers 4 returned the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[0] if isinstance(output, tuple) else output["pooler_output"]
    return pooled


class ClipJudge:
    """Batched, normalised CLIP embeddings of images and texts (text embeddings are memoised).

    Args:
        model: hub id or local directory holding a `CLIPModel` and its `CLIPProcessor`.
        device: where to run; CUDA when available by default.
        batch_size: images or texts per forward pass.
    """

    def __init__(self, model: str | Path = DEFAULT_CLIP, device: str | torch.device | None = None,
                 batch_size: int = 64) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = str(model)
        self.device = torch.device(device) if device is not None else auto_device()
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(self.model_id).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.model_id)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`[N, D]` L2-normalised image embeddings (float32, on the CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.projection_dim)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """`[N, D]` L2-normalised text embeddings (float32, on the CPU)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        max_length = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(missing), self.batch_size):
            batch = missing[i:i + self.batch_size]
            tokens = self.processor(text=batch, padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt")
            feats = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                         attention_mask=tokens["attention_mask"].to(self.device)))
            feats = torch.nn.functional.normalize(feats.float().cpu(), dim=-1)
            self._text_cache.update(zip(batch, feats, strict=True))
        if not texts:
            return torch.zeros(0, self.model.config.projection_dim)
        return torch.stack([self._text_cache[t] for t in texts])
