"""The tiny pipelines: each family builds fast, runs, saves and reloads with identical output."""

import numpy as np
import pytest
import torch
from PIL import Image

from ablation.testing import PIPELINE_CLASSES, TINY_KINDS, tiny_pipeline


def _run(pipe, kind):
    g = torch.Generator().manual_seed(0)
    common = dict(num_inference_steps=2, generator=g, output_type="np")
    if kind in ("sd1", "sd2", "sdxl"):
        return pipe("a cat", height=32, width=32, **common).images
    if kind == "inpaint":
        img, mask = Image.new("RGB", (32, 32), (120, 50, 20)), Image.new("L", (32, 32), 255)
        return pipe("a cat", image=img, mask_image=mask, height=32, width=32, **common).images
    return pipe("a cat", image=Image.new("RGB", (8, 8), (10, 200, 30)), **common).images


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_pipeline_builds_runs_and_round_trips(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    # "Tiny" as a property, not a timing (the 2 CI cores are shared): the text encoder's 49408-token
    # embedding is most of it; every fixture stays far below a real model's hundreds of millions.
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    assert sum(sizes.values()) < 3_000_000, sizes
    assert sizes["unet"] < 500_000, sizes
    images = _run(pipe, kind)
    assert images.shape == (1, 32, 32, 3)  # upscale: 8 px in, x4 out
    pipe.save_pretrained(tmp_path)
    reloaded = PIPELINE_CLASSES[kind].from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(reloaded, kind), images, atol=1e-6)


def test_families_differ_where_they_should():
    sd1, sd2, sdxl = (tiny_pipeline(k) for k in ("sd1", "sd2", "sdxl"))
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.cross_attention_dim != sd1.unet.config.cross_attention_dim
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.text_encoder_2 is not None
    assert tiny_pipeline("inpaint").unet.config.in_channels == 9
    assert tiny_pipeline("upscale").unet.config.in_channels == 7


def test_seeded():
    a, b = tiny_pipeline("sd1", seed=3), tiny_pipeline("sd1", seed=3)
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters(), strict=True):
        assert torch.equal(p, q), n
