"""The memory plan: exact parameter parts, a symbolic step that matches a real one, and the CLI's --plan and
--max-memory (refused in one line naming the options that fit, before anything is written)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ablation.memory import GB, LiveBytes, PlanSettings, plan_memory
from ablation.params import group_parameter_names
from ablation.published import config_folder
from ablation.testing import tiny_pipeline
from ablation.train_cli import main

SETTINGS = PlanSettings(params="cross-attn", lora_rank=0, batch_size=2, prior_preservation=True, resolution=32,
                        mixed_precision="no", anchor_batch_size=2, offload=False)


def test_live_bytes_follows_allocations_and_frees():
    weight = torch.nn.Linear(256, 256).requires_grad_(False)  # else autograd keeps x for the weight's gradient
    with LiveBytes(weight) as tracker:
        x = torch.ones(64, 256)
        y = weight(x)  # the weight's transpose is a view: nothing new
        del x
        z = y * 2
    assert tracker.peak == 2 * 64 * 256 * 4 == tracker.live  # x + y, then y + z once x is gone
    del y, z


def test_parameter_parts_are_exact(model_dirs):
    unet = tiny_pipeline("sd1").unet
    trained = sum(p.numel() for n, p in unet.named_parameters() if n in set(group_parameter_names(unet, "cross-attn")))
    total = sum(p.numel() for p in unet.parameters())
    plan = plan_memory(model_dirs["sd1"], SETTINGS, "unet")
    assert plan.train["trained tensors (fp32)"] == 4 * trained == plan.train["teacher copy (fp32)"]
    assert plan.train["optimizer states (AdamW, fp32)"] == 8 * trained
    assert plan.train["frozen denoiser weights"] == 4 * (total - trained)
    eight_bit = plan_memory(model_dirs["sd1"], dataclasses.replace(SETTINGS, use_8bit_adam=True), "unet")
    assert eight_bit.train["optimizer states (8-bit Adam)"] == 2 * trained
    bf16 = plan_memory(model_dirs["sd1"], dataclasses.replace(SETTINGS, mixed_precision="bf16", offload=True), "unet")
    assert bf16.train["frozen denoiser weights"] == 2 * (total - trained) and "text encoders" not in bf16.train
    assert bf16.train["trained tensors (fp32)"] == 4 * trained  # trained tensors stay fp32


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("rank", [0, 4])
def test_symbolic_step_matches_a_real_step_on_the_cpu(model_dirs, rank, checkpointing):
    """The plan's activations come from a step run on the meta device; the same step on real tensors (random
    weights, CPU kernels) holds within 10% of it."""
    settings = dataclasses.replace(SETTINGS, lora_rank=rank, gradient_checkpointing=checkpointing, resolution=64,
                                   teacher="same" if rank else "frozen")
    planned = plan_memory(model_dirs["sd1"], settings, "unet")
    real = plan_memory(model_dirs["sd1"], settings, "unet", device="cpu")
    assert planned.train == pytest.approx(real.train, rel=0.1)
    key = "activations (gradient checkpointing)" if checkpointing else "activations"
    assert planned.train[key] > 0


def test_checkpointing_and_lora_shrink_the_plan_of_a_published_model(tmp_path):
    """SD 1.5's published configs at 512 px in bf16 (meta device only: nothing of its 1 B parameters is made)."""
    folder = config_folder("sd15", tmp_path / "sd15")
    base = PlanSettings(params="cross-attn", lora_rank=0, batch_size=1, prior_preservation=True, resolution=512,
                        mixed_precision="bf16")
    dense = plan_memory(folder, base, "unet")
    assert dense.train["trained tensors (fp32)"] == 4 * 19_169_280 // 2 * 2  # SD 1.x cross-attn K/V (README)
    ckpt = plan_memory(folder, dataclasses.replace(base, gradient_checkpointing=True), "unet")
    assert ckpt.train["activations (gradient checkpointing)"] < 0.5 * dense.train["activations"]
    lora = plan_memory(folder, dataclasses.replace(base, lora_rank=16), "unet")
    assert lora.train_total < dense.train_total - 0.2 * GB  # K/V grads, AdamW states and the teacher copy go
    assert lora.peak == lora.anchors_total  # 16 anchors at a time at 512 px then decide the peak


def test_cli_plan_prints_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
                 "--output-dir", str(out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "memory plan" in text and "optimizer states" in text and "peak:" in text
    assert not out.exists()


def test_cli_max_memory_refuses_naming_the_options_that_fit(model_dir, tmp_path, capsys):
    common = ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
              "--params", "full", "--output-dir", str(tmp_path / "run")]
    settings = dataclasses.replace(SETTINGS, params="full", offload=False, prior_preservation=False,
                                   batch_size=4, anchor_batch_size=16)
    peak = {name: plan_memory(model_dir, dataclasses.replace(settings, **options), "unet").peak for name, options in
            {"ckpt": dict(gradient_checkpointing=True), "lora": dict(lora_rank=16),
             "both": dict(lora_rank=16, gradient_checkpointing=True)}.items()}
    assert peak["both"] < min(peak["ckpt"], peak["lora"])  # only the two together fit under this limit
    limit = (peak["both"] + min(peak["ckpt"], peak["lora"])) / 2 / GB
    assert main([*common, "--max-memory", f"{limit:.9f}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the memory plan's peak is")
    assert "add --lora-rank 16 --gradient-checkpointing" in err, err
    assert not (tmp_path / "run").exists()


def test_cli_plan_does_not_mind_a_finished_run_in_the_output_dir(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "delta.safetensors").write_bytes(b"x")  # a previous run's results: --plan reads and writes nothing there
    assert main(["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
                 "--output-dir", str(out), "--plan"]) == 0
    assert "peak:" in capsys.readouterr().out and sorted(p.name for p in out.iterdir()) == ["delta.safetensors"]
