"""Single-file checkpoints: the LDM / A1111 layout (tiny SD 1.x / 2.x / XL pipelines) and Stability's SD3 layout
(tiny SD3 / SD3.5-like pipelines, with and without T5), written and read back offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ablation import checkpoint as ckpt
from ablation import models
from ablation.cli import main as cli_main
from ablation.config import ConfigError, build_config
from ablation.single_file import SingleFileError, load_single_file, model_type, pipeline_class, save_single_file
from ablation.testing import tiny_mmdit_components, tiny_mmdit_pipeline, tiny_pipeline


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


# --------------------------------------------------------------------------------------------------
# SD3 / SD3.5: Stability's layout
# --------------------------------------------------------------------------------------------------

MMDIT = "model.diffusion_model."
# name -> (T5, dual-attention layers, qk norm, blocks): the tiny default is SD3.5-medium-like (attn2 in block 0,
# RMS qk-norm); `sd3-medium` has neither, three blocks (a middle one neither first nor last) and a VAE shaped like
# SD3's (16 latent channels, 4 levels of 2 resnets, no quant convs)
SD3_VARIANTS = {"sd35-medium": (True, (0,), "rms_norm", 2), "sd35-medium-no-t5": (False, (0,), "rms_norm", 2),
                "sd3-medium": (True, (), None, 3)}


def _sd3(variant: str = "sd35-medium", seed: int = 3, clip_l_width: int = 16) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline of a variant, every transformer weight perturbed (norms start at 1: a mix-up of two
    of them would not change a number). `clip_l_width` below CLIP-G's 16 lets diffusers' own loader tell the two
    CLIPs apart by width, as it does for the published ones (768 / 1280)."""
    t5, dual, qk_norm, layers = SD3_VARIANTS[variant]
    comps = tiny_mmdit_components("sd3", seed, t5)
    if variant == "sd3-medium":
        torch.manual_seed(seed)
        comps["vae"] = AutoencoderKL(
            block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4,
            layers_per_block=2, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
            scaling_factor=1.5305).eval()
    channels = comps["vae"].config.latent_channels
    if clip_l_width != 16:
        cfg = comps["text_encoder"].config.to_dict()
        cfg.update(hidden_size=clip_l_width, intermediate_size=2 * clip_l_width, projection_dim=clip_l_width)
        torch.manual_seed(seed)
        comps["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    torch.manual_seed(seed)
    comps["transformer"] = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=channels, out_channels=channels, num_layers=layers,
        attention_head_dim=4, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8,
        pos_embed_max_size=16, pooled_projection_dim=clip_l_width + 16, dual_attention_layers=dual, qk_norm=qk_norm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in comps["transformer"].state_dict().values():  # parameters and the pos_embed buffer
            value.add_(0.1 * torch.randn(value.shape, generator=gen))
    pipe = StableDiffusion3Pipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _transformer_out(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, cfg.in_channels, 8, 8, generator=gen),
                           encoder_hidden_states=torch.randn(2, 6, cfg.joint_attention_dim, generator=gen),
                           pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen),
                           timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def _vae_out(vae) -> torch.Tensor:
    with torch.no_grad():
        latents = torch.randn(1, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
        return vae.decode(latents).sample


def _text_outs(pipe) -> dict[str, torch.Tensor]:
    """Each text encoder's outputs on one prompt: CLIPs' projected pooled output and penultimate layer (what SD3
    uses), T5's last hidden state."""
    out = {}
    with torch.no_grad():
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3",
                                                                                           "tokenizer_3")):
            if getattr(pipe, enc) is None:
                continue
            ids = getattr(pipe, tok)("a photo of a cat", padding="max_length", truncation=True,
                                     return_tensors="pt").input_ids
            out[f"{tok}.ids"] = ids
            if enc == "text_encoder_3":
                out[enc] = getattr(pipe, enc)(ids).last_hidden_state
            else:
                res = getattr(pipe, enc)(ids, output_hidden_states=True)
                out[enc], out[f"{enc}.penultimate"] = res.text_embeds, res.hidden_states[-2]
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _assert_same_sd3(loaded, pipe) -> None:
    """Same outputs (fp32, max abs diff < 1e-5) of the transformer, the VAE decoder and every text encoder."""
    assert _max_diff(_transformer_out(loaded.transformer), _transformer_out(pipe.transformer)) < 1e-5
    assert _max_diff(_vae_out(loaded.vae), _vae_out(pipe.vae)) < 1e-5
    want, got = _text_outs(pipe), _text_outs(loaded)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and _max_diff(got[name], value) < 1e-5, name
    public = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (loaded, pipe)]
    assert public[0] == public[1]


@pytest.mark.parametrize("variant", list(SD3_VARIANTS))
def test_sd3_single_file_has_stabilitys_layout(variant, tmp_path):
    pipe = _sd3(variant)
    path = save_single_file(pipe, tmp_path / "sd3.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.startswith(MMDIT)}
    t5, dual, qk_norm, layers = SD3_VARIANTS[variant]
    last = layers - 1
    for key in ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight",
                "context_embedder.weight", "joint_blocks.0.x_block.attn.qkv.weight",
                "joint_blocks.0.context_block.attn.qkv.bias", "joint_blocks.0.context_block.attn.proj.weight",
                "joint_blocks.0.context_block.mlp.fc2.weight", f"joint_blocks.{last}.x_block.adaLN_modulation.1.weight",
                f"joint_blocks.{last}.context_block.adaLN_modulation.1.bias", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.weight"):
        assert MMDIT + key in keys, key
    # the last block's text stream only feeds the image attention: no output projection, no feed-forward
    assert not any(k.startswith(f"{MMDIT}joint_blocks.{last}.context_block.{p}") for k in keys for p in ("mlp.",
                                                                                                       "attn.proj"))
    assert (MMDIT + "joint_blocks.0.x_block.attn2.qkv.weight" in keys) == bool(dual)
    assert (MMDIT + "joint_blocks.0.context_block.attn.ln_k.weight" in keys) == (qk_norm is not None)
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "text_encoders.clip_g.transformer.text_projection.weight" in keys
    assert ("text_encoders.t5xxl.transformer.shared.weight" in keys) == t5
    assert not any(k.startswith(("transformer.", "transformer_blocks", "text_encoder.")) for k in keys)
    # exactly the inverse of diffusers' converter: it uses every MMDiT key and gives back the state dict
    left = dict(tensors)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(left)
    assert not left, sorted(left)[:3]
    state = pipe.transformer.state_dict()
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert model_type(path) == "sd3" and pipeline_class(model_type(path)) is StableDiffusion3Pipeline


@pytest.mark.parametrize("variant", list(SD3_VARIANTS))
def test_sd3_round_trip_offline(variant, tmp_path):
    pipe = _sd3(variant)
    path = save_single_file(pipe, tmp_path / "sd3.safetensors", {"base_model": "tiny-sd3"})
    loaded = models.load_pipeline(str(path))  # configs (and the T5 tokenizer) embedded in the file
    assert type(loaded) is StableDiffusion3Pipeline
    assert (loaded.text_encoder_3 is None) == (pipe.text_encoder_3 is None)
    as_json = json.dumps(dict(pipe.transformer.config))  # tuples come back as lists
    assert json.dumps(dict(loaded.transformer.config)) == as_json
    _assert_same_sd3(loaded, pipe)
    image = {"prompt": "a photo of a cat", "num_inference_steps": 2, "height": 16, "width": 16, "output_type": "np"}
    np.testing.assert_allclose(loaded(**image, generator=torch.Generator().manual_seed(0)).images,
                               pipe(**image, generator=torch.Generator().manual_seed(0)).images, atol=1e-5)


@pytest.mark.parametrize("variant", ["sd35-medium", "sd3-medium"])
def test_plain_diffusers_reads_the_sd3_file(variant, tmp_path):
    """`StableDiffusion3Pipeline.from_single_file` alone, with a config folder that holds no weights: every
    weight it has came from the file. CLIP-L is narrower than CLIP-G (diffusers tells them apart by width) and
    its projection the identity (what diffusers' SD3 loader puts there, as SD3 does not project CLIP-L)."""
    pipe = _sd3(variant, clip_l_width=8)
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(8))
    path = save_single_file(pipe, tmp_path / "sd3.safetensors")
    config = tmp_path / "config"
    pipe.save_pretrained(config)
    for weights in config.glob("*/*.safetensors"):
        weights.unlink()
    plain = StableDiffusion3Pipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    assert not any(p.is_meta for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                   for p in getattr(plain, name).parameters())
    _assert_same_sd3(plain, pipe)


def test_sd3_file_without_t5_needs_a_folder_with_its_weights(tmp_path):
    """A published-style file without T5 (and without embedded configs) against a config folder that lists T5 but
    holds no weights: one clear error naming the remedy."""
    pipe = _sd3()
    path = save_single_file(pipe, tmp_path / "full.safetensors")
    bare = tmp_path / "sd3_incl_clips.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("text_encoders.t5xxl.")}, str(bare))
    config = tmp_path / "config"
    pipe.save_pretrained(config)
    for weights in config.glob("*/*.safetensors"):
        weights.unlink()
    with pytest.raises(SingleFileError, match="T5EncoderModel.*--model-config DIR"):
        load_single_file(bare, config=config)


def _rewrite(path, tmp_path, change) -> str:
    """A copy of the file with `change(tensors)` applied, its metadata (the configs) kept."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    out = tmp_path / "mutated.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def _unswapped(key):  # a mapping that forgot diffusers' (scale, shift) <-> (shift, scale)
    def change(t):
        t[key] = torch.cat(t[key].chunk(2)[::-1])
    return change


def _k_before_q(key):  # a mapping that fused k, q, v
    def change(t):
        q, k, v = t[key].chunk(3)
        t[key] = torch.cat([k, q, v])
    return change


@pytest.mark.parametrize("change", [
    _unswapped(MMDIT + "final_layer.adaLN_modulation.1.weight"),
    _unswapped(MMDIT + "joint_blocks.1.context_block.adaLN_modulation.1.weight"),
    _k_before_q(MMDIT + "joint_blocks.0.x_block.attn2.qkv.weight"),
    _k_before_q(MMDIT + "joint_blocks.1.context_block.attn.qkv.weight"),
], ids=["final-layer-not-swapped", "last-context-not-swapped", "attn2-qkv-order", "context-qkv-order"])
def test_a_wrong_sd3_mapping_changes_the_output(change, tmp_path):
    """The round-trip check compares numbers: each mapping mistake moves the transformer's output far past 1e-5."""
    pipe = _sd3()
    path = save_single_file(pipe, tmp_path / "sd3.safetensors")
    wrong = load_single_file(_rewrite(path, tmp_path, change))
    assert _max_diff(_transformer_out(wrong.transformer), _transformer_out(pipe.transformer)) > 1e-3


def _header_only(path, shapes: dict[str, tuple[int, ...]]) -> str:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return str(path)


def test_sd3_model_types(tmp_path):
    """diffusers' names for the published sizes (by width, pos_embed and block count); any other size is `sd3`."""
    key = MMDIT + "joint_blocks.0.context_block.adaLN_modulation.1.bias"
    files = {"sd3": {key: (9216,), MMDIT + "pos_embed": (1, 36864, 1)},
             "sd35_medium": {key: (9216,), MMDIT + "pos_embed": (1, 147456, 1)},
             "sd35_large": {key: (2,), MMDIT + "joint_blocks.37.x_block.mlp.fc1.weight": (1, 1)}}
    for kind, shapes in files.items():
        path = _header_only(tmp_path / f"{kind}.safetensors", shapes)
        assert models.resolve_model(path) == path  # not refused as "not a Stable Diffusion checkpoint"
        assert model_type(path) == kind and pipeline_class(kind) is StableDiffusion3Pipeline


def test_flux_has_no_single_file_layout(tmp_path):
    with pytest.raises(SingleFileError, match="FluxPipeline has no single-file layout here"):
        save_single_file(tiny_mmdit_pipeline("flux"), tmp_path / "flux.safetensors")
    assert not (tmp_path / "flux.safetensors").exists()


def test_sd3_run_exports_a_single_file(tmp_path):
    """`ablate train --export single-file` on an SD3 folder: the exported file (LoRA merged) reloads to the trained
    transformer's outputs."""
    from ablation.trainer import train

    base = tmp_path / "sd3"
    tiny_mmdit_pipeline("sd3").save_pretrained(base)
    values = dict(model=str(base), target=["Grumpy Cat"], anchor=["Cat"], resolution=16, num_anchor_images=2,
                  anchor_steps=2, max_steps=2, train_batch_size=2, learning_rate=3e-2, lora_rank=4,
                  prior_preservation=False, checkpointing_steps=0, output_dir=str(tmp_path / "run"),
                  cache_dir=str(tmp_path / "cache"), overwrite=True, export=["single-file"])
    result = train(build_config(None, values))
    written = tmp_path / "run" / "single-file" / "run.safetensors"
    assert written in [p for d in result.exports for p in d.glob("*.safetensors")]
    assert json.loads((tmp_path / "run" / "single-file" / "ablation.json").read_text())["base_model"] == str(base)
    loaded = models.load_pipeline(str(written))
    trained = _transformer_out(result.pipeline.transformer)
    assert _max_diff(trained, _transformer_out(tiny_mmdit_pipeline("sd3").transformer)) > 1e-4  # it did train
    assert _max_diff(_transformer_out(loaded.transformer), trained) < 1e-5


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory) -> dict[str, str]:
    """The tiny SD3 training pipeline (`tiny_mmdit_pipeline`) as single files, with and without T5, plus a copy
    without the embedded configs and a config folder for it: {"t5", "no-t5", "bare", "config"}."""
    from ablation.testing import tiny_mmdit_pipeline

    root = tmp_path_factory.mktemp("sd3_single")
    out = {}
    for name, t5 in (("t5", True), ("no-t5", False)):
        out[name] = str(save_single_file(tiny_mmdit_pipeline("sd3", t5=t5), root / f"{name}.safetensors"))
    out["bare"] = str(root / "bare.safetensors")  # as from a model site: weights only
    save_file(load_file(out["t5"]), out["bare"])
    tiny_mmdit_pipeline("sd3").save_pretrained(root / "config")
    out["config"] = str(root / "config")
    return out


def test_planning_reads_the_family_of_an_sd3_single_file(sd3_files, tmp_path):
    """A file has no model_index.json: the embedded configs (or --model-config) give the SD3 family and with it
    the same defaults as the SD3 folder, and SD3 without T5 keeps its embedding group."""
    from ablation.planning import plan_run

    def plan(model, **overrides):
        values = dict(model=model, target=["Grumpy Cat"], anchor=["Cat"], output_dir=str(tmp_path / "p"))
        return plan_run(build_config(None, {**values, **overrides}))

    folder = plan(sd3_files["config"])
    for model, extra in ((sd3_files["t5"], {}), (sd3_files["bare"], {"model_config": sd3_files["config"]})):
        found = plan(model, **extra)
        assert found.family == folder.family == "sd3"
        assert found.config.resolution == folder.config.resolution == 16  # sample_size 8 x VAE factor 2
        assert (found.config.lora_rank, found.config.anchor_scheduler) == (folder.config.lora_rank, "euler")
    with pytest.raises(ConfigError, match="--model-config"):
        plan(sd3_files["bare"])
    assert plan(sd3_files["no-t5"], params="embedding", lora_rank=0).family == "sd3"
    with pytest.raises(ConfigError, match="--params embedding"):
        plan(sd3_files["t5"], params="embedding", lora_rank=0)


def test_cli_trains_from_an_sd3_single_file(sd3_files, tmp_path, capsys):
    """`ablate train --model <SD3 .safetensors> --export single-file`: the delta re-applies to the file, and the
    exported file reloads to the same transformer."""
    from ablation.checkpoint import load_ablated_pipeline, read_metadata
    from ablation.testing import tiny_mmdit_pipeline

    run = tmp_path / "run"
    code = cli_main(["train", "--model", sd3_files["t5"], "--target", "Grumpy Cat", "--anchor", "Cat",
                     "--resolution", "16", "--num-anchor-images", "2", "--anchor-steps", "2", "--max-steps", "2",
                     "--train-batch-size", "2", "--learning-rate", "3e-2", "--lora-rank", "4",
                     "--no-prior-preservation", "--checkpointing-steps", "0", "--export", "single-file",
                     "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(run / "delta.safetensors")["base_model"] == sd3_files["t5"]
    ablated = load_ablated_pipeline(sd3_files["t5"], str(run))
    trained = _transformer_out(ablated.transformer)
    assert _max_diff(trained, _transformer_out(tiny_mmdit_pipeline("sd3").transformer)) > 1e-4  # it did train
    exported = models.load_pipeline(str(run / "single-file" / "run.safetensors"))
    assert _max_diff(_transformer_out(exported.transformer), trained) < 1e-5
