"""Metric functions on known inputs (pure tensors, no models)."""

import math

import numpy as np
import pytest
import torch

from ablation.evaluation import metrics


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_clip_score_matches_hand_computation():
    img = _unit([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])
    txt = _unit([1.0, 1.0])[0]
    # cosines: 1/sqrt2, 1/sqrt2, -1/sqrt2 -> clipped at 0
    expected = 2.5 * (2 / math.sqrt(2) + 0.0) / 3
    assert metrics.clip_score(img, txt) == pytest.approx(expected)
    per_image = metrics.clip_scores(img, _unit([1.0, 0.0], [1.0, 0.0], [1.0, 0.0]))
    assert per_image.tolist() == pytest.approx([2.5, 0.0, 0.0])


def test_clip_accuracy_on_crafted_embeddings():
    concept, anchor = _unit([1.0, 0.0, 0.0])[0], _unit([0.0, 1.0, 0.0])[0]
    images = _unit([0.9, 0.1, 0.0], [0.8, 0.3, 0.1], [0.2, 0.9, 0.0], [0.0, 0.0, 1.0])
    # closer to concept: rows 0, 1; row 3 is a tie (0 vs 0) and counts as not the concept
    assert metrics.clip_accuracy(images, concept, anchor) == pytest.approx(0.5)
    assert metrics.clip_accuracy(images, anchor, concept) == pytest.approx(0.25)


def test_family_accuracy_is_argmax_over_classes():
    classes = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    images = _unit([0.9, 0.1, 0.2], [0.1, 0.2, 0.9], [0.6, 0.5, 0.0])
    assert metrics.family_accuracy(images, classes, 0) == pytest.approx(2 / 3)
    assert metrics.family_accuracy(images, classes, 2) == pytest.approx(1 / 3)
    assert metrics.family_accuracy(images.numpy(), classes.numpy(), 1) == 0.0


def test_mmd_unbiased_matches_explicit_sum():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_kid_near_zero_for_same_distribution_and_positive_for_different():
    gen = torch.Generator().manual_seed(1)
    norm = torch.nn.functional.normalize  # CLIP features are unit vectors
    a, b = norm(torch.randn(200, 16, generator=gen), dim=-1), norm(torch.randn(200, 16, generator=gen), dim=-1)
    shifted = norm(torch.randn(200, 16, generator=gen) + 0.5, dim=-1)
    same_mean, same_std = metrics.kid(a, a.clone(), num_subsets=20, subset_size=100)
    fresh_mean, _ = metrics.kid(a, b, num_subsets=20, subset_size=100)
    shifted_mean, _ = metrics.kid(a, shifted, num_subsets=20, subset_size=100)
    # identical sets: slightly negative (a sample paired with itself), small next to a real shift
    assert abs(same_mean) < 0.1 * shifted_mean and same_std >= 0
    assert abs(fresh_mean) < 0.1 * shifted_mean
    assert shifted_mean > 0.02
    # reproducible in the seed; subset size capped by the sample count
    assert metrics.kid(a, shifted, num_subsets=20, subset_size=100)[0] == shifted_mean
    # 7 rows in the smaller set: every subset takes all 7 of them, so every subset of b is b itself and
    # the std comes from a's subsets only; with 7 of 7 rows of both sets, all subsets are identical
    small_mean, small_std = metrics.kid(a[:10], b[:7], num_subsets=3, subset_size=1000)
    assert math.isfinite(small_mean) and small_std > 0
    same_mean, same_std = metrics.kid(a[:7], b[:7], num_subsets=3, subset_size=1000)
    assert same_std < 1e-12 and same_mean == pytest.approx(metrics.mmd2_unbiased(a[:7].double(), b[:7].double()))
    with pytest.raises(ValueError):
        metrics.kid(a[:1], b)
    with pytest.raises(ValueError):
        metrics.kid(a, b[:, :3])


def test_memorization_rate_thresholds_max_similarity():
    ref = _unit([1.0, 0.0])
    images = _unit([1.0, 0.01], [1.0, 1.0], [0.0, 1.0], [1.0, 0.05])
    assert metrics.memorization_rate(images, ref, threshold=0.9) == pytest.approx(0.5)
    assert metrics.memorization_rate(images, ref[0], threshold=0.5) == pytest.approx(0.75)
    two_refs = _unit([1.0, 0.0], [0.0, 1.0])
    assert metrics.memorization_rate(images, two_refs, threshold=0.9) == pytest.approx(0.75)


def test_psnr():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert metrics.psnr(a, b) == math.inf
    b[0, 0, 0] = 255  # MSE = 1/48 on the [0, 1] scale
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(48))
    assert metrics.psnr(a.astype(np.float32), b.astype(np.float32) / 255) == pytest.approx(10 * math.log10(48))
    with pytest.raises(ValueError):
        metrics.psnr(a, a[:2])
