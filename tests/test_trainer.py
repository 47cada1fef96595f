"""Training runs on the tiny pipelines: each family, each group, LoRA, variants, the anchor cache, the CLI."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ablation.checkpoint import DELTA_FILENAME, LORA_WEIGHT_NAME
from ablation.config import build_config
from ablation.params import embedding_weight_name
from ablation.testing import tiny_pipeline
from ablation.train_cli import main
from ablation.trainer import train


def run(model, tmp_path, **overrides):
    """A small run: 32 px, 8 anchors sampled in 2 steps, 6 training steps, no prior preservation."""
    values = dict(model=model, target=["Grumpy Cat"], anchor=["Cat"], resolution=32, num_anchor_images=8,
                  anchor_steps=2, anchor_scheduler="ddim", max_steps=6, train_batch_size=4, learning_rate=3e-3,
                  prior_preservation=False, checkpointing_steps=0, output_dir=str(tmp_path / "run"),
                  cache_dir=str(tmp_path / "cache"), overwrite=True)
    values.update(overrides)
    return train(build_config(None, values))


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_model_based_run_reduces_loss_and_changes_only_cross_attention(kind, model_dirs, tmp_path):
    base = tiny_pipeline(kind).unet.state_dict()
    # `same` teacher: with random tiny weights the frozen teacher's fixed-batch loss starts near 0 (~2e-5),
    # so only the self-teacher gives a loss that training must visibly reduce.
    result = run(model_dirs[kind], tmp_path, teacher="same")
    assert result.steps == 6 and len(result.losses) == 6
    assert result.final_loss < result.initial_loss
    changed = _changed(base, result.pipeline.unet.state_dict())
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    with safe_open(str(result.delta_path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.removeprefix("unet.") for k in keys} >= changed
    assert meta["params"] == "cross-attn" and meta["steps"] == "6" and meta["variant"] == "model-based"
    assert (tmp_path / "run" / "config.yaml").exists()


def test_lora_keeps_base_weights_and_exports_adapters(model_dirs, tmp_path):
    base = tiny_pipeline("sd1").unet.state_dict()
    result = run(model_dirs["sd1"], tmp_path, lora_rank=2, export=["lora"], teacher="frozen", max_steps=3)
    state = {k.replace(".base_layer", ""): v for k, v in result.pipeline.unet.state_dict().items() if "lora_" not in k}
    assert not _changed(base, state)  # the base weights are untouched
    lora = {k: v for k, v in result.pipeline.unet.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at 0: the adapters trained
    assert (tmp_path / "run" / "lora" / LORA_WEIGHT_NAME).exists()


def test_embedding_group_changes_only_target_rows(model_dirs, tmp_path):
    pipe = tiny_pipeline("sd1")
    base_unet, base_te = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    result = run(model_dirs["sd1"], tmp_path, params="embedding", learning_rate=1e-2, max_steps=3)
    trained = result.pipeline
    assert not _changed(base_unet, trained.unet.state_dict())
    name = embedding_weight_name(trained.text_encoder)
    assert _changed(base_te, trained.text_encoder.state_dict()) == {name}
    rows = (trained.text_encoder.state_dict()[name] != base_te[name]).any(1).nonzero().flatten().tolist()
    assert rows == pipe.tokenizer("grumpy", add_special_tokens=False).input_ids
    with safe_open(str(result.delta_path), "pt") as f:
        assert any(k.endswith("::rows") for k in f.keys())  # noqa: SIM118


def test_full_group_with_frozen_teacher_and_prior(model_dirs, tmp_path):
    base = tiny_pipeline("sd1").unet.state_dict()
    result = run(model_dirs["sd1"], tmp_path, params="full", teacher="frozen", prior_preservation=True,
                 learning_rate=1e-4, max_steps=2)
    assert len(_changed(base, result.pipeline.unet.state_dict())) > 20


@pytest.mark.parametrize("source", ["folder", "dataset"])
def test_image_based_run_on_real_images(model_dirs, tmp_path, source):
    images = [Image.new("RGB", (40, 48), (60 * i, 100, 200 - 40 * i)) for i in range(4)]
    folder = tmp_path / "images"
    if source == "folder":
        folder.mkdir()
        for i, image in enumerate(images):
            image.save(folder / f"{i}.png")
    else:
        from datasets import Dataset, Features
        from datasets import Image as ImageFeature

        Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).save_to_disk(str(folder))
    result = run(model_dirs["sd2"], tmp_path, variant="image-based", anchor_images=str(folder), max_steps=2,
                 hflip=True)
    assert result.anchor_images_generated == 0 and result.delta_path.exists()


def test_anchor_cache_is_reused(model_dirs, tmp_path):
    first = run(model_dirs["sd1"], tmp_path, max_steps=1)
    assert first.anchor_images_generated == 8
    second = run(model_dirs["sd1"], tmp_path, max_steps=1, output_dir=str(tmp_path / "second"))
    assert second.anchor_images_generated == 0
    # a different sampler setting is a different cache entry
    third = run(model_dirs["sd1"], tmp_path, max_steps=1, anchor_steps=3, output_dir=str(tmp_path / "third"))
    assert third.anchor_images_generated == 8


def test_cli_prints_where_outputs_are(model_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--model", model_dirs["sd1"], "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
                 "--num-anchor-images", "4", "--anchor-steps", "2", "--max-steps", "2", "--train-batch-size", "2",
                 "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--export", "pipeline"])
    printed = capsys.readouterr().out
    assert code == 0
    assert str(out / DELTA_FILENAME) in printed and str(out / "pipeline") in printed
    assert (out / "pipeline" / "model_index.json").exists()


def test_gradient_checkpointing_gives_the_same_run(model_dirs, tmp_path):
    """Checkpointing recomputes activations in the backward pass: same losses and delta, less memory."""
    plain = run(model_dirs["sd1"], tmp_path / "a", teacher="same", max_steps=3)
    checkpointed = run(model_dirs["sd1"], tmp_path / "b", teacher="same", max_steps=3, gradient_checkpointing=True)
    assert checkpointed.pipeline.unet.is_gradient_checkpointing
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    with safe_open(str(plain.delta_path), "pt") as a, safe_open(str(checkpointed.delta_path), "pt") as b:
        for key in a.keys():  # noqa: SIM118 - safe_open is not iterable
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-6)


def test_8bit_adam_where_bitsandbytes_runs(model_dirs, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    try:  # the CPU build of bitsandbytes may lack the 8-bit optimizer kernels
        p = torch.nn.Parameter(torch.ones(64))
        opt = bnb.optim.AdamW8bit([p], lr=0.1)
        p.grad = torch.ones(64)
        opt.step()
    except Exception as e:  # noqa: BLE001 - any failure means: not runnable here
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run on this machine: {e}")
    result = run(model_dirs["sd1"], tmp_path, teacher="same", max_steps=3, use_8bit_adam=True)
    assert result.final_loss < result.initial_loss


def test_timings_json_accounts_for_the_run(model_dirs, tmp_path):
    import json
    import time

    started = time.time() - 1.5  # as if the process had started 1.5 s before train()
    values = dict(model=model_dirs["sd1"], target=["Grumpy Cat"], anchor=["Cat"], resolution=32, num_anchor_images=8,
                  anchor_steps=2, max_steps=3, train_batch_size=4, prior_preservation=False, checkpointing_steps=0,
                  output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), overwrite=True)
    t0 = time.time()
    result = train(build_config(None, values), started_at=started)
    wall = time.time() - started
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    phases = timings["phase_seconds"]
    assert list(phases) == ["start-up", "load", "anchor data", "setup", "train", "save"]
    assert phases == result.phase_seconds and all(v >= 0 for v in phases.values())
    assert 1.5 <= phases["start-up"] < 1.5 + (time.time() - t0)
    assert abs(timings["total_s"] - wall) < 0.5  # the phases add up to the wait
    assert timings["anchor_images_generated"] == 8 and timings["steps"] == 3
    again = train(build_config(None, values))  # warm cache: no anchors, start-up from train() only
    assert again.anchor_images_generated == 0 and again.phase_seconds["start-up"] < 1.0  # planning only
