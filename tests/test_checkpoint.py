"""Deltas and exports round-trip exactly on tiny pipelines (ablation.checkpoint, `ablate apply/export`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from ablation import checkpoint as ckpt
from ablation import delta as delta_mod
from ablation.cli import main as cli_main
from ablation.testing import delta_metadata as _meta
from ablation.testing import parameter_names as _names
from ablation.testing import perturb as _perturb
from ablation.testing import tiny_pipeline
from ablation.testing import unet_output as _unet_out


def _image(pipe) -> np.ndarray:
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture
def trained():
    """A tiny sd1 pipeline with perturbed cross-attention weights, and its delta tensors."""
    pipe = tiny_pipeline("sd1")
    names = _names(pipe.unet)
    _perturb(pipe.unet, names)
    return pipe, ckpt.trained_tensors(pipe, {"unet": names})


@pytest.fixture
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "sd1"
    tiny_pipeline("sd1").save_pretrained(path)
    return path


def test_config_hash_is_stable_across_save_and_load(base_dir):
    pipe = tiny_pipeline("sd1")
    loaded = StableDiffusionPipeline.from_pretrained(base_dir)
    assert ckpt.pipeline_config_hash(pipe) == ckpt.pipeline_config_hash(loaded)
    assert ckpt.config_hash({"a": 1, "_x": 2}) == ckpt.config_hash({"a": 1})
    assert ckpt.pipeline_config_hash(pipe) != ckpt.pipeline_config_hash(tiny_pipeline("sd2"))


def test_delta_round_trip_and_metadata(trained, tmp_path):
    pipe, tensors = trained
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    assert len(tensors) == 2 * sum(n.endswith("attn2") for n, _ in pipe.unet.named_modules())  # to_k, to_v
    meta = _meta(pipe)
    ckpt.save_delta(tmp_path / "delta.safetensors", tensors, meta)
    loaded, meta2 = ckpt.load_delta(tmp_path / "delta.safetensors")
    assert meta2 == meta and meta2["format"] == "ablation-delta/1"
    assert json.loads(meta2["concepts"]) == [{"anchor": "cat", "target": "grumpy cat"}]
    fresh = tiny_pipeline("sd1")
    assert not torch.allclose(_unet_out(fresh), _unet_out(pipe))
    ckpt.apply_delta(fresh, loaded)
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="str"):
        ckpt.save_delta(tmp_path / "bad.safetensors", tensors, {"steps": 3})


def test_atomic_writes_leave_nothing_on_failure(trained, tmp_path, monkeypatch):
    pipe, tensors = trained
    target = tmp_path / "delta.safetensors"
    ckpt.save_delta(target, tensors, _meta(pipe))
    before = target.read_bytes()

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(delta_mod, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_delta(target, tensors, _meta(pipe))
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]
    monkeypatch.undo()

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "keep").write_text("old")

    def bad_save(self, path, **kwargs):
        (Path(path) / "model_index.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", bad_save)
    with pytest.raises(OSError):
        ckpt.export_outputs(pipe, tmp_path, ["pipeline"], None, _meta(pipe))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors", "pipeline"]
    assert [p.name for p in (tmp_path / "pipeline").iterdir()] == ["keep"]


def test_apply_rejects_another_architecture(trained):
    _, tensors = trained
    sd2 = tiny_pipeline("sd2")
    with pytest.raises(ValueError, match="shape mismatch.*attn2.to_k"):
        ckpt.apply_delta(sd2, tensors)
    with pytest.raises(ValueError, match="no tensor of the delta fits"):
        ckpt.apply_delta(sd2, tensors, strict=False)
    with pytest.raises(ValueError, match="not in the model.*vae_x"):
        ckpt.apply_delta(tiny_pipeline("sd1"), {"vae_x.weight": torch.zeros(1)})


def test_full_delta_on_inpaint_pipeline_skips_conv_in(tmp_path, caplog):
    pipe = tiny_pipeline("sd1")
    names = [n for n, _ in pipe.unet.named_parameters()]
    _perturb(pipe.unet, names)
    tensors = ckpt.trained_tensors(pipe, {"unet": names})
    inpaint = tiny_pipeline("inpaint")
    with pytest.raises(ValueError, match="conv_in"):
        ckpt.apply_delta(inpaint, tensors)
    conv_in = inpaint.unet.conv_in.weight.clone()
    with caplog.at_level(logging.WARNING, logger="ablation.checkpoint"):
        ckpt.save_delta(tmp_path / "delta.safetensors", tensors, _meta(pipe, params="full"))
        out = ckpt.load_ablated_pipeline(inpaint, tmp_path)
    assert "conv_in" in caplog.text and "differs" in caplog.text  # skipped key + other-config warning
    assert torch.equal(out.unet.conv_in.weight, conv_in)
    key = next(n for n in names if n.endswith("attn2.to_k.weight"))
    assert torch.equal(out.unet.get_parameter(key), pipe.unet.get_parameter(key))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_embedding_rows_delta(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    rows = [320, 49406, 7]
    with torch.no_grad():
        for comp in encoders:
            getattr(pipe, comp).get_input_embeddings().weight[rows] += 1.0
    # the transformers-4 name (`text_model.` level) resolves on either CLIP class
    name = "text_model.embeddings.token_embedding.weight"
    tensors = ckpt.trained_tensors(pipe, {comp: [name] for comp in encoders}, embedding_rows=rows)
    assert len(tensors) == 2 * len(encoders) and all(k.endswith(("::rows", "::index")) for k in tensors)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert tensors["text_encoder.embeddings.token_embedding.weight::rows"].shape == (3, width)
    ckpt.save_delta(tmp_path / "d.safetensors", tensors, _meta(pipe, params="embedding"))
    fresh = tiny_pipeline(kind)
    ckpt.apply_delta(fresh, ckpt.load_delta(tmp_path / "d.safetensors")[0])
    for comp in encoders:
        assert torch.equal(getattr(fresh, comp).get_input_embeddings().weight,
                           getattr(pipe, comp).get_input_embeddings().weight)


def test_pipeline_export_reloads_identically(trained, tmp_path):
    pipe, _ = trained
    ckpt.export_outputs(pipe, tmp_path, ["pipeline"], None, _meta(pipe))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    reloaded.set_progress_bar_config(disable=True)
    assert list((tmp_path / "pipeline" / "unet").glob("*.safetensors"))
    np.testing.assert_array_equal(_image(reloaded), _image(pipe))
    assert json.loads((tmp_path / "pipeline" / "ablation.json").read_text())["params"] == "cross-attn"


def _lora_pipe():
    pipe = tiny_pipeline("sd1")
    pipe.base_names = _names(pipe.unet, (".to_k.weight", ".to_v.weight", ".to_k.bias", ".to_v.bias"))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pipe


def test_lora_run_exports_lora_pipeline_and_merged_delta(base_dir, tmp_path):
    pipe = _lora_pipe()
    expected = _unet_out(pipe)
    ckpt.export_outputs(pipe, tmp_path, ["lora", "pipeline"], ckpt.lora_state_from_pipe(pipe),
                        _meta(pipe, lora_rank=4))
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_unet_out(fresh), expected, atol=1e-5, rtol=0)
    # `ablate apply` merges a LoRA directory into a plain pipeline
    assert cli_main(["apply", "--base", str(base_dir), "--delta", str(tmp_path / "lora"),
                     "--out", str(tmp_path / "fused")]) == 0
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    torch.testing.assert_close(_unet_out(fused), expected, atol=1e-5, rtol=0)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    torch.testing.assert_close(_unet_out(reloaded), expected, atol=1e-5, rtol=0)
    assert any("lora_B" in n for n, _ in pipe.unet.named_parameters())  # the trained pipe is untouched
    # the delta holds merged dense values under base names, given either base or adapter names
    tensors = ckpt.trained_tensors(pipe, {"unet": pipe.base_names})
    assert all(".lora_" not in k and ".base_layer" not in k for k in tensors)
    merged = tiny_pipeline("sd1")
    ckpt.apply_delta(merged, tensors)
    torch.testing.assert_close(_unet_out(merged), expected, atol=1e-5, rtol=0)
    lora_names = [n for n, p in pipe.unet.named_parameters() if "lora_" in n and "attn2" in n]
    tensors = ckpt.trained_tensors(pipe, {"unet": lora_names})
    merged = tiny_pipeline("sd1")
    ckpt.apply_delta(merged, tensors)
    attn2_only = _lora_pipe()
    for n, m in attn2_only.unet.named_modules():
        if "attn1" in n and hasattr(m, "disable_adapters"):
            m.enable_adapters(False)
    torch.testing.assert_close(_unet_out(merged), _unet_out(attn2_only), atol=1e-5, rtol=0)


def test_dense_to_svd_lora(trained, tmp_path, caplog):
    pipe, tensors = trained
    state, err = ckpt.svd_lora_state(tiny_pipeline("sd1"), tensors, rank=32)  # full rank of 16x32 / 32x32
    assert err < 1e-6
    ckpt.save_lora(tiny_pipeline("sd1"), tmp_path / "lora", state)
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe), atol=1e-5, rtol=0)
    _, low_err = ckpt.svd_lora_state(tiny_pipeline("sd1"), tensors, rank=2)
    assert 0.1 < low_err < 1.0  # random perturbations are far from low rank: lossy
    with caplog.at_level(logging.INFO, logger="ablation.checkpoint"):
        ckpt.export_outputs(pipe, tmp_path / "run", ["lora"], None, _meta(pipe), rank=32,
                            base_pipe=tiny_pipeline("sd1"))
    assert "relative reconstruction error" in caplog.text
    again = tiny_pipeline("sd1")
    again.load_lora_weights(tmp_path / "run" / "lora")
    torch.testing.assert_close(_unet_out(again), _unet_out(pipe), atol=1e-5, rtol=0)


def test_load_ablated_pipeline_from_every_kind_of_path(trained, base_dir, tmp_path, caplog):
    pipe, tensors = trained
    run = tmp_path / "run"
    ckpt.save_delta(run / "delta.safetensors", tensors, _meta(pipe, base_model=str(base_dir)))
    expected = _unet_out(pipe)
    for path in (run, run / "delta.safetensors"):
        torch.testing.assert_close(_unet_out(ckpt.load_ablated_pipeline(str(base_dir), path)), expected,
                                   atol=1e-6, rtol=0)
    ckpt.export_outputs(pipe, tmp_path / "exp", ["pipeline"], None, _meta(pipe))
    loaded = ckpt.load_ablated_pipeline("ignored", tmp_path / "exp" / "pipeline")
    torch.testing.assert_close(_unet_out(loaded), expected, atol=1e-6, rtol=0)
    with caplog.at_level(logging.WARNING, logger="ablation.checkpoint"):
        ckpt.save_delta(run / "delta.safetensors", tensors, _meta(pipe, base_config_hash="0" * 64))
        ckpt.load_ablated_pipeline(str(base_dir), run)
    assert "differs" in caplog.text
    with pytest.raises(FileNotFoundError):
        ckpt.load_ablated_pipeline(str(base_dir), tmp_path / "missing")


def test_cli_apply_and_export(trained, base_dir, tmp_path, capsys):
    pipe, tensors = trained
    run = tmp_path / "run"
    ckpt.save_delta(run / "delta.safetensors", tensors, _meta(pipe, base_model=str(base_dir)))
    out = tmp_path / "applied"
    assert cli_main(["apply", "--delta", str(run), "--out", str(out)]) == 0
    torch.testing.assert_close(_unet_out(StableDiffusionPipeline.from_pretrained(out)), _unet_out(pipe),
                               atol=1e-6, rtol=0)
    assert cli_main(["apply", "--base", str(base_dir), "--delta", str(run), "--out", str(out)]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli_main(["apply", "--base", str(base_dir), "--delta", str(run), "--out", str(out), "--overwrite"]) == 0
    assert cli_main(["apply", "--delta", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2

    assert cli_main(["export", "--run", str(run), "--format", "lora", "--rank", "32"]) == 0
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(run / "lora")
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe), atol=1e-5, rtol=0)
    assert cli_main(["export", "--run", str(run), "--format", "pipeline", "--base", str(base_dir)]) == 0
    assert (run / "pipeline" / "model_index.json").is_file()
    assert cli_main(["export", "--run", str(run), "--format", "pipeline"]) == 2  # exists, no --overwrite
    assert cli_main(["export", "--run", str(tmp_path / "none"), "--format", "lora"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])


def test_svd_lora_of_sdxl_text_encoders(tmp_path):
    pipe = tiny_pipeline("sdxl")
    names = {c: _names(getattr(pipe, c), ("q_proj.weight",)) for c in ("text_encoder", "text_encoder_2")}
    for comp, comp_names in names.items():
        _perturb(getattr(pipe, comp), comp_names)
    state, err = ckpt.svd_lora_state(tiny_pipeline("sdxl"), ckpt.trained_tensors(pipe, names), rank=32)
    assert set(state) == {"text_encoder", "text_encoder_2"} and err < 1e-6
    ckpt.save_lora(pipe, tmp_path / "lora", state)
    fresh = tiny_pipeline("sdxl")
    fresh.load_lora_weights(tmp_path / "lora")
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        for comp in names:
            torch.testing.assert_close(getattr(fresh, comp)(ids)[0], getattr(pipe, comp)(ids)[0], atol=1e-5, rtol=0)


def test_trainer_outputs_agree(base_dir, tmp_path):
    """A real (2-step LoRA) run: its delta, pipeline/ and lora/ all give the same ablated model."""
    from ablation.config import build_config
    from ablation.trainer import train

    config = build_config(None, dict(
        model=str(base_dir), target=["R2D2"], anchor=["robot"], max_steps=2, train_batch_size=1, num_anchor_images=2,
        anchor_steps=2, lora_rank=2, learning_rate=1e-2, export=["pipeline", "lora"], checkpointing_steps=0,
        cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run")))
    result = train(config)
    run = tmp_path / "run"
    assert result.delta_path == run / "delta.safetensors"
    base = StableDiffusionPipeline.from_pretrained(base_dir)
    from_delta = ckpt.load_ablated_pipeline(str(base_dir), run)
    expected = _unet_out(from_delta)
    assert not torch.allclose(expected, _unet_out(base))
    torch.testing.assert_close(_unet_out(StableDiffusionPipeline.from_pretrained(run / "pipeline")), expected,
                               atol=1e-5, rtol=0)
    base.load_lora_weights(run / "lora")
    torch.testing.assert_close(_unet_out(base), expected, atol=1e-5, rtol=0)
    assert ckpt.read_metadata(run / "lora")["lora_rank"] == "2"
