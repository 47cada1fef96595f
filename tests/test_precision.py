"""Mixed precision end to end: frozen weights are loaded in the training dtype (never an fp32 copy first), trained
tensors stay fp32 and start from their exact originals, the delta is bit-exact, and peak memory shows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from ablation.config import build_config
from ablation.merge import layer_delta, tuner_layers
from ablation.testing import tiny_pipeline
from ablation.trainer import train


def _run(model, tmp_path, name, pipe=None, **overrides):
    values = dict(model=model, target=["Grumpy Cat"], anchor=["Cat"], resolution=32, num_anchor_images=4,
                  anchor_steps=2, anchor_scheduler="ddim", max_steps=3, train_batch_size=2, learning_rate=3e-3,
                  prior_preservation=False, checkpointing_steps=0, output_dir=str(tmp_path / name),
                  cache_dir=str(tmp_path / "cache"), teacher="same", mixed_precision="bf16")
    values.update(overrides)
    return train(build_config(None, values), pipe=pipe)


@pytest.mark.parametrize("params", ["cross-attn", "embedding"])
def test_bf16_run_loads_in_bf16_and_trains_from_the_exact_fp32_values(params, model_dirs, tmp_path):
    """Loaded from the folder in bf16, the trained tensors start from their fp32 originals (read tensor by tensor
    from the safetensors files), not from bf16-rounded copies: at a rate of 1e-30 the delta *is* the fp32 base,
    bit for bit, so a delta is as exact as an fp32 run's."""
    result = _run(model_dirs["sd1"], tmp_path, "run", params=params, learning_rate=1e-30)  # steps below an ulp
    unet_dtypes = {p.dtype for n, p in result.pipeline.unet.named_parameters()
                   if ".attn2.to_k." not in n and ".attn2.to_v." not in n}
    assert unet_dtypes == {torch.bfloat16}  # loaded so: frozen weights never were fp32
    base = tiny_pipeline("sd1")
    delta = load_file(result.delta_path)
    assert delta
    for key, value in delta.items():
        if key.endswith("::index"):
            continue
        comp, _, name = key.partition(".")
        original = getattr(base, comp).state_dict()[name.removesuffix("::rows")]
        if key.endswith("::rows"):
            original = original[delta[key.replace("::rows", "::index")]]
        assert value.dtype == torch.float32 and torch.equal(value, original), key
        assert not torch.equal(value, original.to(torch.bfloat16).float()), key  # what a bf16 start would give
    with safe_open(str(result.delta_path), "pt") as f:
        assert f.metadata()["frozen_dtype"] == "bf16"


def test_bf16_lora_delta_merges_onto_the_exact_fp32_weights(model_dirs, tmp_path):
    """A LoRA run in bf16: the delta is W + scale * B @ A with W the fp32 original (read tensor by tensor), not
    the bf16-rounded W the run trained beside; the rounding would be a large part of a small update."""
    result = _run(model_dirs["sd1"], tmp_path, "lora", lora_rank=2, teacher="frozen", max_steps=2)
    delta = load_file(result.delta_path)
    base = tiny_pipeline("sd1").unet.state_dict()  # the fp32 weights the folder holds
    layers = tuner_layers(result.pipeline.unet)
    assert layers and all(layer.get_base_layer().weight.dtype == torch.bfloat16 for layer in layers.values())
    for name, layer in layers.items():
        key = f"{name}.weight"
        expected = base[key] + layer_delta(layer).float()
        torch.testing.assert_close(delta[f"unet.{key}"], expected, atol=1e-7, rtol=0)
        rounded = base[key].to(torch.bfloat16).float() + layer_delta(layer).float()
        assert not torch.equal(delta[f"unet.{key}"], rounded)


def test_bf16_exports_come_from_the_run_without_a_second_load(model_dirs, tmp_path, monkeypatch):
    import ablation.models

    def no_second_load(*args, **kwargs):
        raise AssertionError("the base was loaded again")

    pipe = StableDiffusionPipeline.from_pretrained(model_dirs["sd1"], torch_dtype=torch.bfloat16)
    monkeypatch.setattr(ablation.models, "load_pipeline", no_second_load)
    result = _run(model_dirs["sd1"], tmp_path, "run", pipe=pipe, export=["pipeline"])
    exported = load_file(tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    delta = load_file(result.delta_path)
    for key, value in delta.items():
        assert torch.equal(exported[key.removeprefix("unet.")].float(), value)  # the trained tensors, unrounded
    assert exported["conv_in.weight"].dtype == torch.bfloat16  # frozen weights as the run held them


# -------------------------------------------------------------------------------------------------- peak memory

_PEAK = textwrap.dedent("""
    import json, sys
    import torch
    from ablation.config import build_config
    from ablation.trainer import train
    model, out, precision = sys.argv[1:4]
    config = build_config(None, dict(model=model, target=["Grumpy Cat"], anchor=["Cat"], resolution=32,
        num_anchor_images=2, anchor_steps=1, anchor_scheduler="ddim", max_steps=1, train_batch_size=1,
        prior_preservation=False, checkpointing_steps=0, output_dir=out, cache_dir=out + "-cache", teacher="same",
        mixed_precision=precision))
    train(config)
    # VmHWM, the peak RSS of this process image; getrusage's ru_maxrss would also count the forked parent's pages
    # (Linux keeps the pre-exec maximum), i.e. pytest's own memory
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(json.dumps({"peak_kb": int(status["VmHWM"].split()[0])}))
""")


@pytest.fixture(scope="module")
def big_sd1(tmp_path_factory):
    """An SD1-shaped pipeline with a 1.1 GB (fp32) UNet whose weights dominate memory, saved in bf16 as FLUX.1-dev
    and SDXL's fp16 variant are distributed. (From an fp32 file diffusers maps the file and converts tensor by
    tensor: the fp32 pages are the file's, shared and reclaimable, which peak RSS counts but accelerator memory
    never holds.)"""
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("sd1")
    pipe.unet = UNet2DConditionModel(block_out_channels=(512, 1024), layers_per_block=2, cross_attention_dim=32,
                                     attention_head_dim=8, norm_num_groups=32, sample_size=4,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    path = tmp_path_factory.mktemp("big") / "sd1"
    pipe.to(torch.bfloat16).save_pretrained(path)
    return str(path), sum(p.numel() for p in pipe.unet.parameters()) * 4  # its fp32 size


def test_bf16_run_never_holds_the_fp32_unet(big_sd1, tmp_path):
    """Peak RSS of a whole bf16 run (load, anchors, one step, save) against an fp32 run of the same model: at least
    40% of the UNet's fp32 size lower (it is 50%, less the fp32 K/V and their optimizer states). Loading in fp32 and
    casting afterwards, as runs did before, peaks at the fp32 run's level."""
    path, unet_bytes = big_sd1
    peaks = {}
    for precision in ("no", "bf16"):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # fewer malloc arenas: less noise in the peak
        proc = subprocess.run([sys.executable, "-c", _PEAK, path, str(tmp_path / precision), precision],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[precision] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kb"] * 1024
    assert unet_bytes > 1e9
    assert peaks["no"] - peaks["bf16"] > 0.4 * unet_bytes, (peaks, unet_bytes)


def test_apply_in_bf16_loads_the_base_in_bf16(model_dirs, tmp_path):
    from ablation.cli import main

    result = _run(model_dirs["sd1"], tmp_path, "run")
    out = tmp_path / "applied"
    assert main(["apply", "--base", model_dirs["sd1"], "--delta", str(tmp_path / "run"), "--out", str(out),
                 "--dtype", "bf16"]) == 0
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.bfloat16}
    for key, value in load_file(result.delta_path).items():
        assert torch.equal(unet[key.removeprefix("unet.")], value.to(torch.bfloat16))
