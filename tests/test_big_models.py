"""What lets SD3.5-large and FLUX.1-dev fit 24 GB (issue 21): text encoders offloaded while anchors are sampled
(`--offload-text-encoders`) and the frozen denoiser stored in float8 (`--fp8-base`).

On tiny random pipelines: offloaded sampling gives the same anchors bit for bit, with every prompt encoded before
the denoiser runs; an fp8 run stores every frozen Linear outside the trained group in float8, keeps the trained
group's base as loaded, trains, and its delta re-applies onto the checkpoint; the memory plan counts both exactly
and its symbolic step matches the same step on real tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from ablation.architectures import adapter_for
from ablation.checkpoint import load_ablated_pipeline
from ablation.config import ConfigError, build_config
from ablation.memory import GB, PlanSettings, plan_memory
from ablation.models import store_in_fp8
from ablation.params import group_parameter_names
from ablation.placement import TEXT_ENCODERS
from ablation.sampling.anchors import SamplerSettings, generate_latents
from ablation.testing import tiny_mmdit_pipeline, tiny_pipeline
from ablation.train_cli import main
from ablation.trainer import train


def _pipe(kind):
    return tiny_mmdit_pipeline(kind) if kind in ("sd3", "flux") else tiny_pipeline(kind)


def _calls(pipe) -> list[str]:
    """Names of the components in the order their forward runs (text encoders and the denoiser)."""
    order: list[str] = []
    for name in (*TEXT_ENCODERS, "unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(lambda *_, n=name: order.append(n))
    return order


@pytest.mark.parametrize("kind,negative", [("sd1", None), ("sd1", "blurry"), ("sdxl", None), ("sd3", "blurry"),
                                           ("flux", None)])
def test_offloaded_text_encoders_sample_the_same_anchors(kind, negative):
    pipe = _pipe(kind)
    sampler = "euler" if kind in ("sd3", "flux") else "ddim"
    settings = SamplerSettings("k", ("a photo of a cat", "a cat on a sofa", "a grey cat"), sampler, 2,
                               1.0 if kind == "flux" else 5.0, 16 if kind in ("sd3", "flux") else 32, 5, 0,
                               negative_prompt=negative)
    plain = generate_latents(pipe, settings, list(range(5)), batch_size=2, disable_progress=True)
    order = _calls(pipe)
    offloaded = generate_latents(pipe, settings, list(range(5)), batch_size=2, disable_progress=True,
                                 offload_text_encoders=True)
    for a, b in zip(plain["latents"], offloaded["latents"], strict=True):
        assert (a == b).all()  # bit for bit: the pipeline's own encode_prompt, batch by batch
    assert plain["prompt"] == offloaded["prompt"]
    denoiser = "unet" if "unet" in order else "transformer"
    first = order.index(denoiser)
    assert first > 0 and not any(n in TEXT_ENCODERS for n in order[first:])  # every prompt encoded first
    assert all(getattr(pipe, n).device.type == "cpu" for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fp8_storage_skips_the_trained_group_and_norms(kind):
    transformer = tiny_mmdit_pipeline(kind).transformer.to(torch.bfloat16)
    trained = {n.rsplit(".", 1)[0] for n in group_parameter_names(transformer, "cross-attn")}
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    stored = store_in_fp8(transformer, "cross-attn", torch.bfloat16)
    modules = dict(transformer.named_modules())
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear):
            kept = name in trained or "norm" in name or name == "proj_out"  # diffusers' default exceptions
            assert module.weight.dtype == (torch.bfloat16 if kept else torch.float8_e4m3fn), name
    assert stored == sum(p.numel() for p in transformer.parameters() if p.dtype == torch.float8_e4m3fn) > 0
    assert stored > 0.5 * sum(p.numel() for p in transformer.parameters())
    del x


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fp8_offloaded_lora_run_trains_and_reapplies_on_the_checkpoint(kind, tmp_path):
    folder = tmp_path / kind
    tiny_mmdit_pipeline(kind).save_pretrained(folder)
    values = dict(model=str(folder), target=["Grumpy Cat"], anchor=["Cat"], resolution=16, num_anchor_images=4,
                  anchor_steps=2, max_steps=10, train_batch_size=4, learning_rate=3e-2, prior_preservation=False,
                  checkpointing_steps=0, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                  overwrite=True, lora_rank=4, mixed_precision="bf16", gradient_checkpointing=True, fp8_base=True,
                  offload_text_encoders=True)
    result = train(build_config(None, values))
    assert result.final_loss < 0.9 * result.initial_loss, (result.initial_loss, result.final_loss)
    transformer = result.pipeline.transformer
    dtypes = {n: p.dtype for n, p in transformer.named_parameters()}
    assert any(d == torch.float8_e4m3fn for d in dtypes.values())
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # trained tensors stay fp32
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n)  # the LoRA's base as loaded
    with safe_open(str(result.delta_path), "pt") as f:
        assert all(".attn.add_k_proj." in k or ".attn.add_v_proj." in k for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    # the delta's fingerprint is of the checkpoint's weights: it re-applies onto the base loaded as usual
    reloaded = load_ablated_pipeline(str(folder), result.delta_path)
    base = tiny_mmdit_pipeline(kind)
    adapter = adapter_for(base)
    with torch.no_grad():
        cond = adapter.encode_prompts(base, ["a photo of a grumpy cat"], "cpu")
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        before = adapter.predict(base.transformer, z, torch.tensor([500.0]), cond)
        after = adapter.predict(reloaded.transformer, z, torch.tensor([500.0]), cond)
    assert (after - before).abs().max() > 1e-4


def test_refusals(model_dir, tmp_path, capsys):
    base = dict(model="toy", target=["Grumpy Cat"], anchor=["Cat"])
    with pytest.raises(ConfigError, match="--offload-text-encoders"):
        build_config(None, {**base, "params": "embedding", "offload_text_encoders": True})
    with pytest.raises(ConfigError, match="ablate export --run"):
        build_config(None, {**base, "fp8_base": True, "export": ["pipeline"]})
    # a UNet: one line, exit 2, nothing written
    argv = ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--fp8-base", "--mixed-precision",
            "bf16", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fp8-base is for SD3 / FLUX") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    tiny_mmdit_pipeline("sd3").save_pretrained(folder)
    return str(folder)


SETTINGS = PlanSettings(params="cross-attn", lora_rank=4, batch_size=2, prior_preservation=True, resolution=16,
                        mixed_precision="bf16", anchor_batch_size=2, teacher="same")


def test_plan_counts_fp8_storage_and_offloaded_encoders_exactly(sd3_dir):
    pipe = tiny_mmdit_pipeline("sd3")
    transformer = pipe.transformer.to(torch.bfloat16)
    store_in_fp8(transformer, "cross-attn", torch.bfloat16)
    frozen = sum(p.numel() * p.element_size() for p in transformer.parameters())
    text = 2 * sum(p.numel() for n in TEXT_ENCODERS for p in getattr(pipe, n).parameters())
    vae = 2 * sum(p.numel() for p in pipe.vae.parameters())

    plain = plan_memory(sd3_dir, SETTINGS, "sd3")
    both = plan_memory(sd3_dir, dataclasses.replace(SETTINGS, fp8_base=True, offload_text_encoders=True), "sd3")
    assert both.train["frozen denoiser weights"] == frozen < plain.train["frozen denoiser weights"]
    assert both.anchors["text encoders"] == 0 and plain.anchors["text encoders"] == text
    assert both.encoding == {"text encoders": text, "VAE": vae} and not plain.encoding
    assert both.peak <= max(both.train_total, both.anchors_total, text + vae)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_symbolic_step_matches_a_real_step_on_the_cpu(sd3_dir, checkpointing):
    """float8 weights re-stored by the casting hooks are weights, not activations: the meta step and the real one
    agree within 10%; the layers' upcast copies only add to the activations."""
    settings = dataclasses.replace(SETTINGS, fp8_base=True, gradient_checkpointing=checkpointing, resolution=32)
    planned = plan_memory(sd3_dir, settings, "sd3")
    real = plan_memory(sd3_dir, settings, "sd3", device="cpu")
    assert planned.train == pytest.approx(real.train, rel=0.1)
    key = "activations (gradient checkpointing)" if checkpointing else "activations"
    plain = plan_memory(sd3_dir, dataclasses.replace(settings, fp8_base=False), "sd3")
    assert planned.train[key] >= plain.train[key]  # the upcast copies add, never replace
    assert planned.peak / GB < 1
