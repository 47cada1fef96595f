"""Evaluation metrics as pure functions on features and images (no models are loaded here).

Feature arguments are 2-D float tensors `[N, D]` (numpy arrays are accepted too). CLIP-based
metrics expect L2-normalised rows, as `ClipJudge` returns them, so that a dot product is a cosine.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# The reference implementation scales the clipped cosine by 2.5 (as in Hessel et al.'s CLIPScore
# with w = 2.5); torchmetrics uses 100 instead, so numbers are not comparable across the two.
CLIP_SCORE_WEIGHT = 2.5


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(torch.float64).cpu()


def _rows(x: ArrayLike) -> torch.Tensor:
    t = _as_tensor(x)
    return t.unsqueeze(0) if t.ndim == 1 else t


def clip_scores(image_features: ArrayLike, text_features: ArrayLike) -> torch.Tensor:
    """Per-image CLIP score, `w * max(cos(image_i, text_i), 0)` with `w = 2.5`.

    Args:
        image_features: `[N, D]` normalised image embeddings.
        text_features: `[N, D]` normalised embeddings of each image's text, or one `[D]` text for all.

    Returns:
        `[N]` float64 scores in `[0, 2.5]`.
    """
    img, txt = _rows(image_features), _rows(text_features)
    cos = (img * txt).sum(-1)  # broadcasting: one text row serves every image
    return CLIP_SCORE_WEIGHT * cos.clamp(min=0)


def clip_score(image_features: ArrayLike, text_features: ArrayLike) -> float:
    """Mean CLIP score `(1/N) sum_i 2.5 * max(cos(image_i, text_i), 0)` (see `clip_scores`)."""
    return float(clip_scores(image_features, text_features).mean())


def clip_accuracy(image_features: ArrayLike, concept_text: ArrayLike, versus_text: ArrayLike) -> float:
    """Fraction of images that CLIP assigns to the concept rather than to the other text.

    `acc = (1/N) sum_i [cos(image_i, concept) > cos(image_i, versus)]`. For a target concept the
    other text is its anchor ("grumpy cat" vs "cat"): ablation should drive it from about 1 to about 0.

    Args:
        image_features: `[N, D]` normalised image embeddings.
        concept_text: `[D]` normalised embedding of the concept's text.
        versus_text: `[D]` normalised embedding of the competing text (usually the anchor's).

    Returns:
        A fraction in `[0, 1]`.
    """
    img = _rows(image_features)
    a, b = _as_tensor(concept_text).reshape(-1), _as_tensor(versus_text).reshape(-1)
    return float(((img @ a) > (img @ b)).double().mean())


def family_accuracy(image_features: ArrayLike, class_texts: ArrayLike, true_index: int) -> float:
    """Fraction of images whose most similar class text is the prompted one.

    `acc = (1/N) sum_i [argmax_k cos(image_i, class_k) == true_index]`: a zero-shot classifier over
    all the classes of a family (target, anchor, surrounding), used for the toy world.

    Args:
        image_features: `[N, D]` normalised image embeddings.
        class_texts: `[K, D]` normalised embeddings of the class texts.
        true_index: row of `class_texts` that the images were prompted with.

    Returns:
        A fraction in `[0, 1]`.
    """
    sims = _rows(image_features) @ _rows(class_texts).T
    return float((sims.argmax(-1) == true_index).double().mean())


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel `k(x, y) = (x . y / d + 1) ** 3` for all pairs of rows, `d` the feature size."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between two samples under `polynomial_kernel` (Binkowski et al., eq. 2).

    `MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn)`.
    """
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sum_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * kxy.mean())


def kid(
    features_a: ArrayLike, features_b: ArrayLike, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance on any features: mean and std of unbiased MMD^2 over random subsets.

    Binkowski et al., "Demystifying MMD GANs" (ICLR 2018): draw `num_subsets` subsets of
    `min(subset_size, len(a), len(b))` rows from each set without replacement, compute
    `mmd2_unbiased` on each, report mean and standard deviation. Written here rather than taken from
    torchmetrics because its KID is tied to torch-fidelity's Inception network (weights download,
    torchvision); we evaluate on CLIP image features, which the judge computes anyway. Samples of one
    distribution give about 0; it can be slightly negative because the estimator is unbiased, and
    two identical sets (an ablation that changed nothing, same seeds) give a small negative value,
    since a sample paired with itself is more similar than two independent draws.

    Args:
        features_a: `[N, D]` features of one image set (e.g. the base model's).
        features_b: `[M, D]` features of the other (e.g. the ablated model's, same prompts and seeds).
        num_subsets: number of random subsets.
        subset_size: rows per subset (1000 in the paper that defined KID).
        seed: seed of the subset sampling, so that the number is reproducible.

    Returns:
        `(mean, std)` of MMD^2 over the subsets.

    Raises:
        ValueError: fewer than two rows in either set, or feature sizes differ.
    """
    a, b = _rows(features_a), _rows(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        ia = torch.randperm(a.shape[0], generator=gen)[:size]
        ib = torch.randperm(b.shape[0], generator=gen)[:size]
        values.append(mmd2_unbiased(a[ia], b[ib]))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False))


def memorization_rate(image_features: ArrayLike, reference_features: ArrayLike, threshold: float = 0.9) -> float:
    """Fraction of samples that copy a memorized image: `(1/N) sum_i [max_r cos(image_i, ref_r) > threshold]`.

    The reference protocol uses SSCD copy-detection descriptors with threshold 0.5; by default we use
    CLIP image-image cosine (the judge is loaded anyway), for which near-duplicates score above
    about 0.9. Pass SSCD descriptors and 0.5 to reproduce the paper exactly.

    Args:
        image_features: `[N, D]` normalised embeddings of the generated images.
        reference_features: `[D]` or `[R, D]` normalised embeddings of the memorized image(s).
        threshold: similarity above which a sample counts as a copy.

    Returns:
        A fraction in `[0, 1]`.
    """
    sims = _rows(image_features) @ _rows(reference_features).T
    return float((sims.max(-1).values > threshold).double().mean())


def _to_float_image(x) -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] -> float64 array in [0, 1]."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio `10 * log10(data_range^2 / MSE(a, b))` in dB.

    Args:
        a: image as a PIL image, uint8 array (scaled to [0, 1]) or float array in [0, 1].
        b: the other image, same size.
        data_range: peak value of the float scale (1.0).

    Returns:
        PSNR in dB; `inf` for identical images.

    Raises:
        ValueError: the shapes differ.
    """
    x, y = _to_float_image(a), _to_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))
