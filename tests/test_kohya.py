"""Kohya-layout LoRA files (AUTOMATIC1111 / ComfyUI) reproduce the diffusers LoRA they were written from."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from ablation import checkpoint as ckpt
from ablation.testing import tiny_pipeline
from ablation.testing import unet_output as _unet_out

ATTN_PROJ = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")


def _meta(pipe) -> dict[str, str]:
    return ckpt.make_metadata(base_model="toy", base_config_hash=ckpt.pipeline_config_hash(pipe), concepts=[],
                              params="attn", lora_rank=4, steps=1, learning_rate=1e-5, variant="model-based")


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_kohya_file_of_a_lora_run(tmp_path):
    pipe = tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v"]))  # scale 2, not 1
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    expected = _unet_out(pipe)
    run = tmp_path / "grumpy-cat"
    ckpt.export_outputs(pipe, run, ["lora"], ckpt.lora_state_from_pipe(pipe), _meta(pipe))
    kohya = run / "lora" / "grumpy-cat_kohya.safetensors"
    tensors, meta = _read(kohya)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(tensors)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert tensors[f"{name}.lora_down.weight"].shape[0] == 4 and float(tensors[f"{name}.alpha"]) == 8.0
    assert meta["ss_network_module"] == "networks.lora" and meta.get("format") == "pt"
    # back through diffusers' kohya reader: the same UNet output as the trained adapters and the diffusers file
    from_kohya = tiny_pipeline("sd1")
    from_kohya.load_lora_weights(str(kohya))
    torch.testing.assert_close(_unet_out(from_kohya), expected, atol=1e-5, rtol=0)
    from_dir = tiny_pipeline("sd1")
    from_dir.load_lora_weights(str(run / "lora"))  # still picks pytorch_lora_weights.safetensors
    torch.testing.assert_close(_unet_out(from_dir), _unet_out(from_kohya), atol=1e-6, rtol=0)
    assert not torch.allclose(_unet_out(tiny_pipeline("sd1")), expected, atol=1e-3)
    with pytest.raises(ckpt.DeltaFileError, match="is a LoRA weights file, not a delta"):
        ckpt.load_delta(kohya)  # e.g. `ablate apply --delta RUN/lora/x_kohya.safetensors`


def test_kohya_file_of_a_dense_run_by_svd(tmp_path):
    """UNet and text-encoder updates; diffusers reads a kohya text-encoder LoRA only with all four projections."""
    pipe = tiny_pipeline("sd1")
    names = {"unet": [n for n, _ in pipe.unet.named_parameters() if n.endswith(("to_k.weight", "to_v.weight"))],
             "text_encoder": [n for n, _ in pipe.text_encoder.named_parameters() if n.endswith(ATTN_PROJ)]}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for comp, comp_names in names.items():
            params = dict(getattr(pipe, comp).named_parameters())
            for n in comp_names:
                params[n].add_(0.1 * torch.randn(params[n].shape, generator=gen))
    tensors = ckpt.trained_tensors(pipe, names)
    state, err = ckpt.svd_lora_state(tiny_pipeline("sd1"), tensors, rank=32)
    assert err < 1e-6
    ckpt.save_lora(pipe, tmp_path / "run" / "lora", state, _meta(pipe))
    kohya, _ = _read(tmp_path / "run" / "lora" / "run_kohya.safetensors")  # named after the run folder
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya  # SD 1.x spelling
    assert float(kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 32.0  # SVD: scale 1
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(str(tmp_path / "run" / "lora" / "run_kohya.safetensors"))
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe), atol=1e-5, rtol=0)


def test_kohya_prefixes_and_scales():
    state = {"unet": {"state_dict": {"a.to_k.lora_A.weight": torch.ones(2, 3),
                                     "a.to_k.lora_B.weight": torch.ones(3, 2)},
                      "config": {"r": 2, "lora_alpha": 2, "alpha_pattern": {"a.to_k": 6}}},
             "text_encoder_2": {"state_dict": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 3),
                                               "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(3, 4)},
                                "config": {"r": 4, "lora_alpha": 4, "use_rslora": True}}}
    kohya = ckpt.kohya_state_dict(state)
    assert float(kohya["lora_unet_a_to_k.alpha"]) == 6.0  # alpha_pattern: scale 3 at rank 2
    # rsLoRA scales by alpha / sqrt(r) = 2: kohya's alpha / rank must be 2 too
    assert float(kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 8.0
    sdxl = ckpt.kohya_state_dict({"text_encoder": state["text_encoder_2"]}, text_encoders=2)
    assert all(k.startswith("lora_te1_") for k in sdxl)
    with pytest.raises(ValueError, match="only plain LoRA"):
        ckpt.kohya_state_dict({"unet": {"state_dict": {"x.lora_magnitude_vector": torch.ones(1)}, "config": {}}})


def test_adapters_without_a_peft_config_are_refused():
    """Adapters injected by hand (no `peft_config`) used to go through an untested fallback; now a clear error."""
    from peft import inject_adapter_in_model

    pipe = tiny_pipeline("sd1")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k"]), pipe.unet)
    pipe.unet.__dict__.pop("peft_config", None)
    with pytest.raises(ValueError, match="no peft config named 'default'.*add_adapter"):
        ckpt.lora_state_from_pipe(pipe)


@pytest.mark.parametrize(("kind", "v2", "version"), [("sd1", "False", "sd_v1"), ("sd2", "True", "sd_v2_v"),
                                                     ("sdxl", "False", "sdxl_base_v1-0")])
def test_kohya_file_names_its_base_model_as_kohya_does(kind, v2, version, tmp_path):
    """A1111 files a LoRA by `ss_v2` / `ss_base_model_version` and hides other versions' LoRAs by default."""
    pipe = tiny_pipeline(kind)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]))
    ckpt.export_outputs(pipe, tmp_path / "run", ["lora"], ckpt.lora_state_from_pipe(pipe), _meta(pipe))
    _, meta = _read(tmp_path / "run" / "lora" / "run_kohya.safetensors")
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == (v2, version)


def test_kohya_base_model_of_sd2_base_and_mmdit_pipelines():
    from diffusers import DDIMScheduler

    from ablation.lora_convert import kohya_base_metadata
    from ablation.testing import tiny_mmdit_pipeline

    pipe = tiny_pipeline("sd2")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")  # 2.x base, 512 px
    assert kohya_base_metadata(pipe) == {"ss_v2": "True", "ss_base_model_version": "sd_v2"}
    for kind, version in (("sd3", "sd3"), ("flux", "flux1")):
        assert kohya_base_metadata(tiny_mmdit_pipeline(kind))["ss_base_model_version"] == version
