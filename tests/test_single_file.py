"""Single-file checkpoints (LDM / A1111 layout): written from a tiny SD 1.x pipeline, read back offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ablation import checkpoint as ckpt
from ablation import models
from ablation.cli import main as cli_main
from ablation.config import ConfigError
from ablation.single_file import SingleFileError, load_single_file, save_single_file
from ablation.testing import tiny_pipeline


def _perturbed(seed: int = 1):
    pipe = tiny_pipeline("sd1")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return pipe


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    pipe = _perturbed()
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_single_file(pipe, path, {"base_model": "tiny"})
    return pipe, path


def test_single_file_has_the_original_layout(single_file):
    _, path = single_file
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    # names as in CompVis/A1111 checkpoints (and what diffusers' type detection looks for)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.norm_out.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys, key
    assert vae_q.ndim == 4  # LDM's VAE attention is 1x1 convolutions
    assert not any(k.startswith(("unet.", "vae.", "down_blocks")) for k in keys)
    assert meta["base_model"] == "tiny" and "unet" in json.loads(meta["ablation_diffusers_configs"])


def test_single_file_round_trip_offline(single_file, model_dir):
    pipe, path = single_file
    loaded = models.load_pipeline(str(path))  # configs embedded in the file: no config folder, no hub
    assert type(loaded) is StableDiffusionPipeline
    _assert_same_weights(loaded, pipe)
    np.testing.assert_array_equal(_image(loaded), _image(pipe))
    # plain diffusers reads it with a config folder of the family (the tiny base saved with save_pretrained)
    plain = StableDiffusionPipeline.from_single_file(str(path), config=model_dir, local_files_only=True)
    _assert_same_weights(plain, pipe)
    unet_cfg, vae_cfg = models.read_model_configs(str(path))
    assert unet_cfg["cross_attention_dim"] == 32 and vae_cfg["latent_channels"] == 4


def test_foreign_single_file_needs_a_config_folder(single_file, model_dir, tmp_path):
    pipe, path = single_file
    bare = tmp_path / "downloaded.safetensors"  # as from a model site: weights only, no diffusers configs
    save_file(load_file(str(path)), str(bare))
    with pytest.raises(SingleFileError, match="not available offline.*--model-config DIR"):
        load_single_file(bare)
    with pytest.raises(ConfigError, match="--model-config"):
        models.read_model_configs(str(bare))
    _assert_same_weights(models.load_pipeline(str(bare), model_config=model_dir), pipe)
    with pytest.raises(SingleFileError, match="no model_index.json"):
        load_single_file(bare, config=tmp_path)


def test_files_that_are_not_models(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ConfigError, match="not a Stable Diffusion single-file checkpoint.*encoder.weight"):
        models.resolve_model(str(other))
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(lora))
    with pytest.raises(ConfigError, match="is a LoRA file, not a model"):
        models.resolve_model(str(lora))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 3)
    with pytest.raises(ConfigError, match="not a valid single-file checkpoint"):
        models.resolve_model(str(broken))


@pytest.mark.parametrize(("kind", "text_key"), [
    ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),  # OpenCLIP, fused q/k/v
    ("sdxl", "conditioner.embedders.1.model.text_projection"),
])
def test_sd2_and_sdxl_layouts_round_trip(kind, text_key, tmp_path, model_dirs):
    pipe = tiny_pipeline(kind, seed=2)
    path = save_single_file(pipe, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert text_key in keys and "model.diffusion_model.input_blocks.0.0.weight" in keys
    if kind == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    loaded = models.load_pipeline(str(path))
    assert type(loaded) is type(pipe)
    _assert_same_weights(loaded, pipe)
    # diffusers itself reads it, given a config folder of the family
    plain = type(pipe).from_single_file(str(path), config=model_dirs[kind], local_files_only=True)
    _assert_same_weights(plain, pipe)


def test_export_single_file_from_a_run(model_dir, tmp_path):
    trained = _perturbed()
    names = [n for n, _ in trained.unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    base = tiny_pipeline("sd1")
    meta = ckpt.make_metadata(base_model=model_dir, base_config_hash=ckpt.pipeline_config_hash(base), concepts=[],
                              params="cross-attn", lora_rank=0, steps=1, learning_rate=1e-5, variant="model-based",
                              base_fingerprint=ckpt.base_weights_fingerprint(base, {"unet": names}))
    run = tmp_path / "my-run"
    ckpt.save_delta(run / "delta.safetensors", ckpt.trained_tensors(trained, {"unet": names}), meta)
    assert cli_main(["export", "--run", str(run), "--format", "single-file"]) == 0
    written = run / "single-file" / "my-run.safetensors"
    assert json.loads((run / "single-file" / "ablation.json").read_text())["base_model"] == model_dir
    _assert_same_weights(models.load_pipeline(str(written)), trained)
    # the trainer's path: export_outputs with the new kind
    ckpt.export_outputs(trained, tmp_path / "other", ["single-file"], None, meta)
    _assert_same_weights(models.load_pipeline(str(tmp_path / "other" / "single-file" / "other.safetensors")), trained)
