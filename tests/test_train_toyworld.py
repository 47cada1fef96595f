"""scripts/train_toyworld.py: the --oversample weights and a seconds-long continuation from the shipped weights."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_toyworld.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_toyworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_toyworld"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_toyworld", None)


def test_sampling_weights_oversample_named_concepts(script):
    concepts = ["angelfish", "nemo", "cat", "cat", "angelfish", "fish"]
    weights = script.sampling_weights(concepts, {"angelfish": 4, "nemo": 2})
    assert weights.tolist() == [4.0, 2.0, 1.0, 1.0, 4.0, 1.0]
    # angelfish is drawn 8/13 of the time instead of 2/6
    draws = torch.multinomial(weights, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = (torch.isin(draws, torch.tensor([0, 4]))).float().mean().item()
    assert abs(share - 8 / 13) < 0.01
    assert script.sampling_weights(concepts, {}) is None


def test_sampling_weights_rejects_unknown_concept(script):
    with pytest.raises(SystemExit, match="angelfsh"):
        script.sampling_weights(["angelfish"], {"angelfsh": 4})


@pytest.mark.parametrize(("text", "message"), [("angelfish", "concept=factor"), ("angelfish=0", "factor > 0"),
                                                ("angelfish=x", "concept=factor"), ("angelfsh=4", "unknown concept")])
def test_parse_oversample_rejects_bad_input_before_any_work(script, text, message):
    with pytest.raises(SystemExit, match=message):
        script.parse_oversample(text)


def test_parse_oversample(script):
    assert script.parse_oversample("angelfish=4,tabby cat=2.5") == {"angelfish": 4.0, "tabby cat": 2.5}
    assert script.parse_oversample("") == {}


def test_oversampled_continuation_from_shipped_weights(tmp_path):
    work, pack = tmp_path / "work", tmp_path / "pack"
    cmd = [sys.executable, str(SCRIPT), "from-weights", "data", "unet", "pack", "--preset", "smoke", "--workers", "1",
           "--work", str(work), "--pack-dir", str(pack), "--oversample", "angelfish=4,tabby cat=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    progress = json.loads((pack / "progress.json").read_text())
    assert progress["unet"]["step"] == 3  # the smoke preset's 3 steps, counted from the shipped weights
    shipped = load_file(ROOT / "ablation/toyworld/weights/pipeline/unet/diffusion_pytorch_model.safetensors")
    trained = load_file(pack / "unet.safetensors")
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)  # the EMA moved


def test_toy_mmdit_trains_one_zero_token_for_the_pipelines_256(tmp_path):
    """scripts/train_toy_mmdit.py: 1 T5 zero token with its logit raised by log(256) is the same function as the
    256 zero tokens StableDiffusion3Pipeline feeds without T5 (so training can use the cheap form)."""
    spec = importlib.util.spec_from_file_location("train_toy_mmdit", ROOT / "scripts" / "train_toy_mmdit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        pipe = module.skeleton()  # a fresh random transformer on the toy parts
        assert module.check_equivalence(pipe) < 1e-5
        module.ZERO_TOKEN.on = True  # without the raised logit the single token is a different function
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
        full, _, pooled, _ = pipe.encode_prompt(["a cat"], None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=256)
        with torch.no_grad():
            raised = pipe.transformer(x, encoder_hidden_states=full[:, :-255], pooled_projections=pooled,
                                      timestep=t).sample
            module.ZERO_TOKEN.on = False
            plain = pipe.transformer(x, encoder_hidden_states=full[:, :-255], pooled_projections=pooled,
                                     timestep=t).sample
        assert (raised - plain).abs().max() > 1e-3
    finally:
        import diffusers.models.attention_processor as ap

        module.ZERO_TOKEN.on = False
        ap.F = torch.nn.functional  # the script swaps diffusers' functional module for training only


def test_upscaler_continuation_replaces_only_the_upscalers_files(tmp_path):
    """`upscaler` (EMA, the low-noise and high-t shares) and `vae4-decoder` (decoding the UNet's estimates too)
    continue the shipped upscaler; `assemble-upscaler` writes its UNet and VAE files only; the decoder moved, the
    encoder (the UNet's latent space) and the scaling factor did not."""
    import shutil

    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    weights, work = tmp_path / "ablation/toyworld/weights", tmp_path / "work"
    shutil.copytree(ROOT / "ablation/toyworld/weights", weights, symlinks=True)  # its relative links included
    shutil.copytree(ROOT / "ablation/tokenizer", tmp_path / "ablation/tokenizer")
    cmd = [sys.executable, str(SCRIPT), "from-weights", "data", "upscaler", "vae4-decoder", "assemble-upscaler",
           "--preset", "smoke", "--workers", "1", "--work", str(work), "--out", str(weights),
           "--low-noise-share", "0.75", "--high-t-share", "0.3", "--decoder-estimates", "0.5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name = "diffusion_pytorch_model.safetensors"
    shipped_vae = load_file(ROOT / "ablation/toyworld/weights/upscaler/vae" / name)
    vae = load_file(weights / "upscaler/vae" / name)
    assert all(torch.equal(vae[k], shipped_vae[k]) for k in vae if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(vae[k], shipped_vae[k]) for k in vae if k.startswith("decoder."))
    unet = load_file(weights / "upscaler/unet" / name)
    shipped_unet = load_file(ROOT / "ablation/toyworld/weights/upscaler/unet" / name)
    assert any(not torch.equal(unet[k], shipped_unet[k]) for k in unet)
    assert json.loads((work / "vae4" / "progress.json").read_text())["scaling_factor"] == pytest.approx(0.08333)
    for other in ("pipeline/unet", "pipeline/vae"):  # untouched, byte for byte
        assert (weights / other / name).read_bytes() == (ROOT / "ablation/toyworld/weights" / other / name).read_bytes()
    up = StableDiffusionUpscalePipeline.from_pretrained(weights / "upscaler")
    up.set_progress_bar_config(disable=True)
    image = up("a cat", image=Image.new("RGB", (16, 16), (200, 120, 40)), num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
