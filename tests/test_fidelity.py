"""The official recipe's options restored in issue 9 (docs/paper-parity.md): each checked with numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ablation import augment, losses
from ablation.concepts import common_words, resolve_concept, style_variants
from ablation.config import PAPER_COMMON, PAPER_DEFAULTS, ConceptSpec, TrainConfig, learning_rate, load_yaml
from ablation.data import PromptEmbeddings
from ablation.objective import Objective
from ablation.training_data import TrainingData, add_prefixed_prompts

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# --- resize augmentation and loss mask --------------------------------------------------------------


def _official_mask_cells(top: int, scale: int, size: int) -> int:
    """Rows (= columns) the reference's mask keeps for a pasted image (utils.py `preprocess`)."""
    mask = torch.zeros(size // 8)
    mask[top // 8 + 1:(top + scale) // 8 - 1] = 1
    return int(mask.sum())


def test_official_mask_is_empty_at_small_scales_and_ours_is_not(monkeypatch):
    # 64 px, a 21 px paste at the top left: the reference keeps no cell (0/0 -> NaN in its masked mean)
    assert _official_mask_cells(0, 21, 64) == 0
    monkeypatch.setattr(augment, "sample_scales", lambda b, r, g: torch.full((b,), 21))
    latents = torch.randn(4, 4, 8, 8)
    out = augment.augment_latents(latents, torch.zeros(4, 8, 8), 64, 8, torch.Generator().manual_seed(0))
    assert (out.mask.flatten(1).sum(1) > 0).all()
    assert (out.zoom == augment.FAR).all()  # 21 < 0.6 * 64: "a far away" / "very small"
    loss = losses.masked_mse(torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), out.mask)
    assert torch.isfinite(loss)


def test_paste_places_the_resized_latent_in_the_blank_canvas(monkeypatch):
    monkeypatch.setattr(augment, "sample_scales", lambda b, r, g: torch.full((b,), 32))  # half size: 4x4 cells
    latents = torch.randn(2, 4, 8, 8)
    blank = torch.full((4, 8, 8), 7.0)
    out = augment.augment_latents(latents, blank, 64, 8, torch.Generator().manual_seed(1))
    for i in range(2):
        inside = out.mask[i, 0] > 0
        assert int(inside.sum()) == 4  # 4x4 pasted, shrunk by one cell each side -> 2x2, as the reference
        pasted = (out.latents[i] != 7.0).all(0)
        assert int(pasted.sum()) == 16  # the 4x4 paste; everything else is the canvas
        rows, cols = pasted.nonzero(as_tuple=True)
        expected = F.interpolate(latents[i:i + 1], size=(4, 4), mode="bilinear", antialias=True)[0]
        got = out.latents[i][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.allclose(got, expected, atol=1e-6)
    assert (out.zoom == augment.FAR).all()  # 32 < 38.4


def test_enlarged_crop_keeps_the_whole_mask_and_says_zoomed_in(monkeypatch):
    monkeypatch.setattr(augment, "sample_scales", lambda b, r, g: torch.full((b,), 80))
    out = augment.augment_latents(torch.randn(3, 4, 8, 8), torch.zeros(4, 8, 8), 64, 8, torch.Generator())
    assert out.mask.sum() == 3 * 64
    assert (out.zoom == augment.CLOSE).all()
    assert augment.prefix_column(out.zoom, out.prefix).ge(2).all()


def test_scales_follow_the_reference_distribution():
    scales = augment.sample_scales(20000, 512, torch.Generator().manual_seed(0))
    small = scales <= 512
    assert abs(float(small.float().mean()) - 0.66) < 0.02
    assert int(scales[small].min()) >= 512 // 3 and int(scales[~small].min()) >= int(1.2 * 512)
    assert int(scales.max()) < int(1.4 * 512)


def test_masked_mse_by_hand():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    pred[0, :, 0, 0] = 3.0  # squared error 4 in the one masked cell of sample 0
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    mask[1] = 1
    # sample 0: mean over its 4 masked elements = 4; sample 1: all ones error = 1 -> (4 + 1) / 2
    assert losses.masked_mse(pred, target, mask).item() == pytest.approx(2.5)
    assert losses.masked_mse(pred, target).item() == pytest.approx(F.mse_loss(pred, target).item())


def test_prefixed_prompt_rows():
    data = TrainingData(torch.zeros(2, 4, 8, 8), torch.tensor([0, 0]), torch.tensor([[1], [1]]),
                        ["a cat", "a grumpy cat"])
    add_prefixed_prompts(data)
    assert data.prompts[2:] == ["a far away a grumpy cat", "very small a grumpy cat", "zoomed in a grumpy cat",
                                "close up a grumpy cat"]
    assert data.prefix_rows[1].tolist() == [2, 3, 4, 5] and data.prefix_rows[0].tolist() == [-1] * 4


# --- learning rate, flips, defaults, aliases ---------------------------------------------------------


def test_learning_rate_doubles_with_prior_preservation_when_scaled():
    cfg = TrainConfig(target=["x"], anchor=["y"], learning_rate=2e-6, scale_lr=True, train_batch_size=4,
                      prior_preservation=True)
    assert learning_rate(cfg, num_processes=2) == pytest.approx(2e-6 * 4 * 2 * 2)
    assert learning_rate(dataclasses.replace(cfg, prior_preservation=False), 2) == pytest.approx(2e-6 * 4 * 2)
    # unscaled rates (the toy defaults) are used as given, as the official code only doubles inside scale_lr
    assert learning_rate(dataclasses.replace(cfg, scale_lr=False), 2) == pytest.approx(2e-6)


def test_paper_defaults_match_the_official_commands():
    assert all(d["hflip"] for d in PAPER_DEFAULTS.values())
    assert PAPER_DEFAULTS["instance"]["augment"] and PAPER_DEFAULTS["memorization"]["augment"]
    assert not PAPER_DEFAULTS["style"]["augment"]  # --noaug in the official style command
    assert PAPER_COMMON["teacher"] == "same"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*_sd14.yaml")), ids=lambda p: p.stem)
def test_paper_recipes_use_the_official_setting(path):
    data = load_yaml(path)
    assert data["hflip"] is True and data["teacher"] == "same"
    assert data["augment"] is (data["concepts"][0]["concept_type"] != "style")
    assert "Paper setting, as the official code" in path.read_text()


def test_official_flag_names_are_aliases():
    cfg = TrainConfig(target=["x"], anchor=["y"], params="full-weight", variant="noise-based")
    assert (cfg.params, cfg.variant) == ("full", "image-based")


# --- batch composition -------------------------------------------------------------------------------


def _objective(**overrides) -> Objective:
    from diffusers import DDPMScheduler

    n = 16
    latents = torch.arange(n, dtype=torch.float32)[:, None, None, None] + torch.randn(n, 4, 8, 8) * 0.01
    latents[:, :, :, 0] += 100.0  # an asymmetric column, so flips are visible
    prompts = ["a cat", "a cat on a sofa", "a grumpy cat", "a grumpy cat on a sofa"]
    data = TrainingData(latents, torch.arange(n) % 2, (2 + torch.arange(n) % 2)[:, None], prompts,
                        embeddings=PromptEmbeddings(torch.arange(4.0)[:, None, None].expand(4, 3, 5)))
    options = dict(train_batch_size=8, hflip=False, prior_preservation=True, augment=False, resolution=64)
    cfg = TrainConfig(target=["grumpy cat"], anchor=["cat"], **{**options, **overrides})
    return Objective(cfg, None, data, DDPMScheduler(num_train_timesteps=1000), None, torch.device("cpu"), 0)


def test_prior_half_draws_other_anchors_with_its_own_noise():
    objective = _objective()
    batch = objective.batch(3)
    assert batch.prior is not None
    assert not torch.equal(batch.prior.noisy, batch.noisy)
    assert not torch.equal(batch.prior.timesteps, batch.timesteps)
    # the prior half is conditioned on anchor prompts (embedding rows 0/1), the ablation half on targets (2/3)
    assert set(batch.prior.anchor_cond.embeds[:, 0, 0].tolist()) <= {0.0, 1.0}
    assert set(batch.target_cond.embeds[:, 0, 0].tolist()) <= {2.0, 3.0}
    again = objective.batch(3)  # a pure function of (seed, step, rank): resumable
    assert torch.equal(again.prior.noisy, batch.prior.noisy) and torch.equal(again.noisy, batch.noisy)


def test_hflip_flips_about_half_the_latents():
    flipped = 0
    for step in range(8):
        objective = _objective(hflip=True)
        g = torch.Generator().manual_seed(step)
        _, latents, _ = objective._draw_latents(8, g)
        flipped += int((latents[:, 0, 0, -1] > 50).sum())  # the bright column moved to the right edge
    assert 16 <= flipped <= 48  # of 64: p = 0.5


def test_no_flip_without_hflip():
    objective = _objective(hflip=False)
    _, latents, _ = objective._draw_latents(64, torch.Generator().manual_seed(0))
    assert (latents[:, 0, 0, 0] > 50).all()


def test_anchor_trajectory_batches_are_sampler_states_at_their_timesteps():
    objective = _objective(hflip=True, variant="model-based", anchor_trajectory=True)
    n, steps = len(objective.data.latents), 3
    # state s of latent i holds 1000 * i + 10 * s (+ the bright column), timestep 900 - 300 * s
    states = torch.arange(n, dtype=torch.float32)[:, None] * 1000 + torch.arange(steps)[None, :] * 10
    objective.data.trajectory = states[:, :, None, None, None].expand(n, steps, 4, 8, 8).clone()
    objective.data.trajectory[..., 0] += 0.5  # an asymmetric column, so flips are visible
    objective.data.trajectory_t = (900.0 - 300 * torch.arange(steps, dtype=torch.float32)).expand(n, steps).clone()
    batch = objective.batch(5)
    value = batch.noisy[:, 0, 0, 1]
    latent, state = (value // 1000).long(), ((value % 1000) / 10).round().long()
    assert torch.equal(batch.timesteps, 900.0 - 300 * state)  # each state at its own timestep
    assert len(set(state.tolist())) > 1  # states of several sampler steps
    flipped = batch.noisy[:, 0, 0, -1] > batch.noisy[:, 0, 0, 0]
    assert 0 < int(flipped.sum()) < len(flipped)
    # the prompts follow the drawn latent: the anchor prompt of latent i is row i % 2
    assert torch.equal(batch.anchor_cond.embeds[:, 0, 0], (latent % 2).float())
    assert torch.equal(objective.batch(5).noisy, batch.noisy)  # resumable: a pure function of the step


# --- prompts -----------------------------------------------------------------------------------------


def test_style_target_prompts_use_the_three_official_templates():
    concept = resolve_concept(ConceptSpec("Van Gogh", "painting", "style"), toy=False)
    variants = concept.variants()[0]
    anchor = concept.anchor_prompts[0]
    assert variants == style_variants(anchor, "Van Gogh")
    assert variants[0] == f"{anchor}, in the style of Van Gogh"
    assert variants[1] == variants[2] == f"in Van Gogh's style, {anchor}"


def test_embedding_group_warns_about_common_words():
    from ablation.params import target_token_ids
    from ablation.tokenizer_util import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert common_words(tokenizer, target_token_ids(tokenizer, "Van Gogh", "painting")) == ["van"]
    assert common_words(tokenizer, target_token_ids(tokenizer, "Grumpy Cat", "cat")) == []
    assert sorted(common_words(tokenizer, target_token_ids(tokenizer, "R2D2", "robot"))) == ["2", "d", "r"]


def test_embedding_group_leaves_out_words_the_anchor_prompts_use():
    from ablation.params import target_token_ids
    from ablation.tokenizer_util import clip_tokenizer
    from ablation.toyworld import catalog

    tokenizer = clip_tokenizer()
    words = lambda ids: sorted(tokenizer.convert_ids_to_tokens(ids))  # noqa: E731
    for fam, own in (("memorized_lighthouse", ["iconic</w>"]), ("memorized_balloon", ["famous</w>", "paris</w>"])):
        family = catalog().families[fam]
        everything = target_token_ids(tokenizer, family.target, family.anchor)
        assert len(everything) > len(own)  # "the", "at", "red", ... as well
        assert words(target_token_ids(tokenizer, family.target, family.anchor, family.train_prompts)) == own
    # nothing of its own left: the plain difference, not nothing
    assert target_token_ids(tokenizer, "grumpy cat", "cat", ["a grumpy cat"]) == target_token_ids(
        tokenizer, "grumpy cat", "cat")
