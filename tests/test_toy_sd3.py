"""The shipped toy MMDiT (`toy-sd3`): a standard StableDiffusion3Pipeline folder, its shared parts stored once,
and it draws the toy world's concepts."""

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from ablation.evaluation.clip_judge import ClipJudge
from ablation.models import is_toy, load_pipeline, resolve_model
from ablation.testing import toy_family_accuracy
from ablation.toyworld import WEIGHTS_DIR, clip_dir, pipeline_dir, sd3_dir


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline("toy-sd3")
    p.set_progress_bar_config(disable=True)
    return p


def test_id_resolves_and_counts_as_the_toy_world():
    assert Path(resolve_model("toy-sd3")) == sd3_dir()
    assert is_toy("toy-sd3") and is_toy(str(sd3_dir()))


def test_plain_diffusers_load_without_t5(pipe):
    # what a diffusers user writes for SD3 without T5; load_pipeline does the same from model_index.json
    p = StableDiffusion3Pipeline.from_pretrained(sd3_dir(), text_encoder_3=None, tokenizer_3=None)
    assert type(pipe) is StableDiffusion3Pipeline and pipe.text_encoder_3 is None
    assert p.transformer.dtype == torch.float32 and p.text_encoder.dtype == torch.float32
    # both CLIP towers are the UNet toy model's text encoder (plus an identity projection)
    toy = load_pipeline("toy").text_encoder
    for enc in (p.text_encoder, p.text_encoder_2):
        assert torch.equal(enc.get_input_embeddings().weight, toy.get_input_embeddings().weight)
        assert torch.equal(enc.text_projection.weight, torch.eye(64))


def test_shared_parts_are_stored_once():
    links = {
        "text_encoder/model-00001-of-00002.safetensors": pipeline_dir() / "text_encoder" / "model.safetensors",
        "vae/diffusion_pytorch_model.safetensors": pipeline_dir() / "vae" / "diffusion_pytorch_model.safetensors",
        "text_encoder_2": sd3_dir() / "text_encoder",
        "tokenizer_2": sd3_dir() / "tokenizer",
        "tokenizer": pipeline_dir() / "tokenizer",
    }
    for name, target in links.items():
        path = sd3_dir() / name
        assert path.is_symlink() and not os.path.isabs(os.readlink(path)), name  # relative: survives a move
        assert path.resolve() == target.resolve(), name
    own = sum(f.stat().st_size for f in sd3_dir().rglob("*") if f.is_file() and not f.is_symlink()
              and not any(p.is_symlink() for p in f.relative_to(sd3_dir()).parents if p != Path(".")))
    assert own < 8e6, own  # the transformer (fp16) and small files; the rest is the UNet toy model's
    assert WEIGHTS_DIR in sd3_dir().parents


@pytest.mark.parametrize("family", ["grumpy_cat", "van_gogh"])
def test_draws_target_and_anchor_distinctly(pipe, family):
    accuracy = toy_family_accuracy(pipe, ClipJudge(clip_dir(), device="cpu"), family)  # target and anchor
    assert all(v >= 0.75 for v in accuracy.values()), (family, accuracy)


@pytest.fixture(scope="module")
def ablation_on_mmdit(tmp_path_factory):
    """The default ablation on the toy MMDiT (`ablate train --model toy-sd3 ...`), judged among all 31 concepts."""
    from ablation.cli import main
    from ablation.evaluation.collateral import measure

    tmp = tmp_path_factory.mktemp("toy_sd3_ablation")
    run = tmp / "run"
    assert main(["train", "--model", "toy-sd3", "--target", "grumpy cat", "--anchor", "cat", "--output-dir", str(run),
                 "--cache-dir", str(tmp / "cache"), "--checkpointing-steps", "0"]) == 0
    return measure(load_pipeline("toy-sd3"), str(run), concepts=["grumpy cat", "cat", "tabby cat", "robot"],
                   per_concept=6, steps=10)


@pytest.mark.parametrize("judge", ["clip", "classifier"])
def test_default_ablation_on_the_mmdit_removes_the_target_and_keeps_the_rest(ablation_on_mmdit, judge):
    rows = ablation_on_mmdit["concepts"]
    assert rows["grumpy cat"][judge]["base"] >= 0.8 and rows["grumpy cat"][judge]["ablated"] <= 0.2, rows
    for concept in ("cat", "tabby cat", "robot"):  # the anchor, a neighbour, another family
        assert rows[concept][judge]["changed"] <= 1 / 6, (concept, rows[concept])
