"""The toy world's second judge: a small CNN that names which of the 31 toy concepts an image shows.

The toy CLIP judges an image against a handful of texts of one family; this classifier is trained on
the renderer's ground truth (and on the toy VAE's reconstructions of renders, since the toy model draws
through that VAE) and judges every image against *every* concept of the world at once, so it can see
an ablation turn a robot into a cat. It shares nothing with the toy CLIP or the diffusion model.

    from ablation.toyworld.classifier import load_classifier
    judge = load_classifier()
    judge.predict(images)          # ['grumpy cat', 'c-3po', ...]
    judge.probs(images)            # [N, 31] softmax, columns in judge.classes order

Weights: `weights/classifier/model.safetensors` (fp16) + `config.json`, written by
`scripts/train_toy_classifier.py`; docs/toyworld.md gives its held-out accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ablation.toyworld import WEIGHTS_DIR

CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
#: the classifier sees every image at this size (the toy world's native resolution)
IMAGE_SIZE = 64


class ToyConceptNet(nn.Module):
    """2x average pooling -> four conv/BN/ReLU layers (two 2x max pools) -> mean and max pooling -> linear.

    Args:
        num_classes: number of concepts.
        widths: channels of the four conv layers.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            # 64 -> 32 px first: every concept is drawn to survive an 8x autoencoder (palette, big
            # shapes), and it makes training ten times cheaper on a CPU
            nn.AvgPool2d(2),
            *block(3, w0), nn.MaxPool2d(2),         # 16
            *block(w0, w1), nn.MaxPool2d(2),        # 8
            *block(w1, w2), *block(w2, w3),
        )
        self.head = nn.Linear(w3 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[N, num_classes]` for images `[N, 3, 64, 64]` in [-1, 1]."""
        h = self.features(x)
        # mean and max pooling: a concept may fill the frame (a painting) or be a small object
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        return self.head(pooled)


def to_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or uint8 HxWx3 arrays -> `[N, 3, 64, 64]` float in [-1, 1] (resized when needed)."""
    arrays = []
    for im in images:
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class ToyClassifier:
    """A loaded classifier: `predict` (concept names) and `probs` (softmax over `classes`).

    Args:
        model: the network (eval mode).
        classes: concept names in logit order.
        device: where to run.
        batch_size: images per forward pass.
    """

    def __init__(self, model: ToyConceptNet, classes: Sequence[str], device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        self.model = model.eval().to(device)
        self.classes = list(classes)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.index = {c: i for i, c in enumerate(self.classes)}

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`[N, C]` float32 logits on the CPU."""
        out = [self.model(to_tensor(images[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def probs(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`[N, C]` class probabilities (columns in `classes` order)."""
        return self.logits(images).softmax(-1)

    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> list[str]:
        """The most probable concept of each image."""
        return [self.classes[i] for i in self.logits(images).argmax(-1).tolist()]

    def accuracy(self, images: Sequence[Image.Image | np.ndarray], concept: str) -> float:
        """Fraction of images judged to be `concept` (31-way argmax)."""
        if concept not in self.index:
            raise KeyError(f"{concept!r} is not a toy-world concept; known: {', '.join(self.classes)}")
        if not images:
            return float("nan")
        return float(np.mean([p == concept for p in self.predict(images)]))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ToyClassifier:
    """Load the shipped classifier (or one written by `scripts/train_toy_classifier.py` to `path`).

    Raises:
        FileNotFoundError: the weights are missing (train them with `scripts/train_toy_classifier.py`).
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_DIR
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"toy classifier weights missing in {folder}; "
                                f"train them with `python scripts/train_toy_classifier.py` (docs/toyworld.md)")
    config = json.loads(config_file.read_text())
    model = ToyConceptNet(len(config["classes"]), tuple(config["widths"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights_file).items()}
    model.load_state_dict(state)
    return ToyClassifier(model, config["classes"], device=device)
