"""The benchmark's random models (`scripts/benchmark_train.py`): published shapes, and a pipeline the trainer loads."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("benchmark_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdxl_shapes_are_the_published_ones():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    bench = _bench()
    with torch.device("meta"):  # no memory: parameter counts only
        unet = UNet2DConditionModel(**bench.SDXL_UNET)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**bench.SDXL_TEXT_2))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    assert sum(p.numel() for p in text_2.parameters()) == 694_659_840  # its OpenCLIP bigG text tower


def test_sdxl_builder_writes_a_pipeline_the_trainer_loads(tmp_path):
    from ablation.models import load_pipeline

    bench = _bench()
    tiny_unet = {**bench.SDXL_UNET, "sample_size": 8, "block_out_channels": [32, 64, 64], "attention_head_dim": 8,
                 "transformer_layers_per_block": [1, 1, 1], "cross_attention_dim": 64 + 32,
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
    tiny_vae = {**bench.SDXL_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}
    text = {**bench.SDXL_TEXT, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "projection_dim": 64}
    text_2 = {**bench.SDXL_TEXT_2, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "projection_dim": 32}
    bench.build_sdxl(tmp_path / "sdxl", unet=tiny_unet, vae=tiny_vae, text=text, text_2=text_2)
    pipe = load_pipeline(str(tmp_path / "sdxl"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.dtype == torch.float32
    image = pipe("a robot", num_inference_steps=1, height=64, width=64, output_type="latent").images
    assert image.shape == (1, 4, 8, 8)
