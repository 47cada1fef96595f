"""The shipped toy-world model: loads offline with the standard classes and really draws its concepts."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from ablation.evaluation.clip_judge import ClipJudge
from ablation.models import resolve_model
from ablation.testing import toy_family_accuracy
from ablation.toyworld import WEIGHTS_DIR, clip_dir, pipeline_dir, upscaler_dir

#: the least the issue's five weakest concepts may score together on their held-out rewordings (measured 0.825 after
#: the continuation; about 0.70 before it, by the issue's figures)
REWORDED_MEAN_MIN = 0.8


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(pipeline_dir(), torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge():
    return ClipJudge(clip_dir(), device="cpu")


def test_toy_id_resolves_to_the_shipped_pipeline():
    assert Path(resolve_model("toy")) == pipeline_dir()
    assert (pipeline_dir() / "model_index.json").exists()


def test_weights_fit_the_budget():
    # issue 3: the pipeline and the judge together <= 40 MB (the x4 upscaler is extra, see docs/toyworld.md)
    size = sum(f.stat().st_size for d in ("pipeline", "clip") for f in (WEIGHTS_DIR / d).rglob("*.safetensors"))
    assert size <= 40e6, size


@pytest.mark.parametrize("family", ["grumpy_cat", "van_gogh"])
def test_draws_target_and_anchor_distinctly(pipe, judge, family):
    accuracy = toy_family_accuracy(pipe, judge, family)  # target and anchor, 4 held-out prompts each
    assert all(v >= 0.75 for v in accuracy.values()), (family, accuracy)


def test_draws_prompts_worded_unlike_its_training_captions(pipe):
    """The held-out rewordings (`ablation.toyworld.rewording`: frames and words no training caption has) of the
    concepts the issue found weakest still draw them, by the classifier: 8 rewordings x 1 image each. Before the
    UNet's continuation on reworded captions the issue measured nemo 0.53, fish 0.66, snoopy 0.72, angelfish 0.78,
    painting 0.78 (fish in a glass bowl came out as robots); docs/toyworld.md has the measurement on all concepts."""
    from ablation.toyworld.classifier import load_classifier
    from ablation.toyworld.rewording import heldout_reworded_prompts

    judge = load_classifier()
    scores = {}
    for concept in ("nemo", "fish", "snoopy", "angelfish", "painting"):
        prompts = list(heldout_reworded_prompts(concept))
        generators = [torch.Generator().manual_seed(10**9 + i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=20, guidance_scale=6.0, generator=generators).images
        scores[concept] = judge.accuracy(images, concept)
    assert sum(scores.values()) / len(scores) >= REWORDED_MEAN_MIN and min(scores.values()) >= 0.5, scores


def test_upscaler_loads_and_upscales_x4():
    up = StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir(), torch_dtype=torch.float32)
    up.set_progress_bar_config(disable=True)
    out = up("a photo of a cat", image=Image.new("RGB", (16, 16), (200, 120, 40)), num_inference_steps=3,
             generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (64, 64)


def test_upscaler_beats_bicubic_by_1db_on_heldout_renders(tmp_path):
    """Issue 13's bar for the toy x4 upscaler, on the 32 held-out renders of `toy_heldout_pairs` (every family,
    held-out captions and seeds), with the toy upscaler's *default* settings (one DDIM step without guidance: the
    UNet's estimate from pure noise, i.e. its posterior mean): it beats bicubic interpolation by >= 1 dB; and
    `ablate upscale --model toy` with no sampling flags uses those settings (it lost to bicubic at 50 steps, 6)."""
    from ablation.cli import main
    from ablation.sampling.upscale import load_upscaler, toy_heldout_pairs, upscale_defaults, upscaler_psnr

    up = load_upscaler("toy", device="cpu")
    assert up.scheduler.config.timestep_spacing == "trailing"  # one step starts at t = 999, not at t = 0
    assert upscale_defaults(up) == (1, 1.0)
    captions, pairs = toy_heldout_pairs(32)
    score = upscaler_psnr(up, pairs, captions, batch_size=16)
    assert score.psnr_bicubic == pytest.approx(21.40, abs=0.01)  # the benchmark itself has not moved
    assert score.gain >= 1.0, (score.psnr_upscaler, score.psnr_bicubic)
    args = ["upscale", "--out", str(tmp_path / "up")]
    for i, (low, high) in enumerate(pairs[:8]):
        low.save(tmp_path / f"low{i}.png")
        high.save(tmp_path / f"high{i}.png")
        args += ["--image", str(tmp_path / f"low{i}.png"), "--reference", str(tmp_path / f"high{i}.png"),
                 "--prompt", captions[i]]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "up" / "manifest.json").read_text())
    assert (manifest["settings"]["steps"], manifest["settings"]["guidance"]) == (1, 1.0)
    assert manifest["psnr"]["gain"] > 0.5, manifest["psnr"]


def test_plain_from_pretrained_gives_float32_everywhere():
    # weights are stored in fp16; a load without a dtype must still give one dtype (the text encoder
    # in fp16 beside an fp32 UNet fails at the first step on CPU)
    from transformers import CLIPModel

    plain = StableDiffusionPipeline.from_pretrained(pipeline_dir())
    assert {m.dtype for m in (plain.unet, plain.vae, plain.text_encoder)} == {torch.float32}
    assert CLIPModel.from_pretrained(clip_dir()).dtype == torch.float32


def test_shipped_weights_store_each_file_once():
    """The upscaler and the judge reuse the pipeline's text tower, the toy MMDiT (`sd3`) the pipeline's text tower
    and VAE, and every folder the package's tokenizer files (relative links), so no two regular files of the shipped
    weights are byte-identical; every link resolves in the package."""
    import hashlib

    from ablation.toyworld import WEIGHTS_DIR

    package = WEIGHTS_DIR.parents[1]
    seen: dict[str, str] = {}
    links = 0
    for path in sorted(WEIGHTS_DIR.rglob("*")):
        if any(p.is_symlink() for p in path.parents if WEIGHTS_DIR in p.parents):
            continue  # inside a linked folder (sd3/text_encoder_2 -> text_encoder): counted as that folder
        if path.is_symlink():
            links += 1
            target = path.resolve()
            assert target.exists() and package in target.parents, path
            continue
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest not in seen, f"{path} duplicates {seen[digest]}"
            seen[digest] = str(path)
    assert links >= 11
    # the judge's text tower is the pipeline's text-encoder file (the first shard of its CLIPModel checkpoint)
    judge = WEIGHTS_DIR / "clip"
    assert not (judge / "model.safetensors").exists()
    shard = judge / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and shard.resolve() == (WEIGHTS_DIR / "pipeline/text_encoder/model.safetensors").resolve()
