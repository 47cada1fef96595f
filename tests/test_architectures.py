"""Architecture adapters on the tiny pipelines: choice, prediction, anchors, training steps, LoRA exports."""

import pytest
import torch

from ablation import losses
from ablation.architectures import (
    FluxArchitecture,
    SD3Architecture,
    UNetArchitecture,
    adapter_for,
    pack_latents,
    unpack_latents,
)
from ablation.checkpoint import lora_state_from_pipe
from ablation.config import ConfigError
from ablation.params import setup_trainable
from ablation.testing import tiny_mmdit_pipeline, tiny_pipeline


def _seeded(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def test_adapter_for_picks_by_pipeline_class():
    assert type(adapter_for(tiny_pipeline("sd1"))) is UNetArchitecture
    assert type(adapter_for(tiny_pipeline("sdxl"))) is UNetArchitecture
    sd3 = adapter_for(tiny_mmdit_pipeline("sd3"))
    assert type(sd3) is SD3Architecture and sd3.max_sequence_length == 16  # capped by the tiny T5 tokenizer
    assert adapter_for(tiny_mmdit_pipeline("sd3", t5=False)).max_sequence_length == 256  # the pipeline's default
    dev, schnell = adapter_for(tiny_mmdit_pipeline("flux")), adapter_for(tiny_mmdit_pipeline("flux-schnell"))
    assert type(dev) is FluxArchitecture and dev.guidance_embeds and not schnell.guidance_embeds
    assert adapter_for(tiny_mmdit_pipeline("flux"), guidance=2.0).guidance == 2.0
    with pytest.raises(ConfigError, match="not a supported"):
        adapter_for(tiny_pipeline("inpaint"))
    # tiny VAEs down-sample 2x; SD3 patches 1x1 here, FLUX packs 2x2
    assert adapter_for(tiny_pipeline("sd1")).resolution_multiple(tiny_pipeline("sd1")) == 2
    pipe = tiny_mmdit_pipeline("flux")
    assert adapter_for(pipe).resolution_multiple(pipe) == 4


def test_unet_adapter_reproduces_the_ddpm_batch():
    pipe = tiny_pipeline("sd2")  # v-prediction
    adapter = adapter_for(pipe)
    scheduler = adapter.training_scheduler(pipe)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=g)
    noisy, t, target = adapter.noisy_and_target(scheduler, latents, noise, g)
    g = torch.Generator().manual_seed(2)  # the draw order of Objective.batch: noise, then timesteps
    torch.randn(latents.shape, generator=g)
    t_ref = torch.randint(0, 1000, (3,), generator=g)
    assert t.tolist() == t_ref.tolist()
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, t_ref))
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, t_ref))


def test_unet_predict_passes_sdxl_size_ids():
    from ablation.data import sdxl_time_ids

    pipe = tiny_pipeline("sdxl")
    adapter = adapter_for(pipe)
    cond = adapter.encode_prompts(pipe, ["a cat", "a dog"], "cpu")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = adapter.predict(pipe.unet, x, t, cond)
        ids = sdxl_time_ids(32, 2, "cpu", cond.pooled.dtype)  # 16 latent px x vae factor 2
        ref = pipe.unet(x, t, cond.embeds, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids})[0]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5", "flux", "flux-schnell"])
def test_predict_is_the_pipelines_velocity(kind):
    """One Euler step from sigma 1 to 0 moves the latents by -v: the adapter's v is the pipeline's."""
    pipe = tiny_mmdit_pipeline("sd3", t5=False) if kind == "sd3-no-t5" else tiny_mmdit_pipeline(kind)
    adapter = adapter_for(pipe)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    given = pack_latents(x) if kind.startswith("flux") else x
    # guidance 1.0 turns SD3's classifier-free guidance off; FLUX-dev embeds 3.5, the adapter's default
    guidance = 1.0 if kind.startswith("sd3") else 3.5
    out = pipe(prompt=["a cat", "a dog"], num_inference_steps=1, guidance_scale=guidance, height=16, width=16,
               latents=given.clone(), output_type="latent", max_sequence_length=adapter.max_sequence_length).images
    cond = adapter.encode_prompts(pipe, ["a cat", "a dog"], "cpu")
    with torch.no_grad():
        v = adapter.predict(adapter.denoiser(pipe), x, torch.tensor([1000.0, 1000.0]), cond)
    assert v.shape == x.shape
    torch.testing.assert_close(pack_latents(v) if kind.startswith("flux") else v, given - out, rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip():
    x = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 4, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 3 * 4, 16)
    assert torch.equal(unpack_latents(packed, 6, 8), x)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_anchor_latents_are_seeded_and_unpacked(kind):
    pipe = tiny_mmdit_pipeline(kind)
    adapter = adapter_for(pipe)
    pipe.scheduler = adapter.anchor_sampler(pipe, "euler")
    kwargs = dict(steps=2, guidance=3.5, resolution=16)
    a = adapter.sample_latents(pipe, ["a cat", "a cat"], generators=_seeded(2), **kwargs)
    b = adapter.sample_latents(pipe, ["a cat"], generators=_seeded(1, offset=1), **kwargs)
    assert a.shape == (2, 4, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a[1:], b)  # image k depends on its own seed only
    assert not torch.allclose(a[0], a[1])
    with pytest.raises(ConfigError, match="flow-matching Euler"):
        adapter.anchor_sampler(pipe, "ddim")


def test_flux_refuses_a_negative_prompt():
    pipe = tiny_mmdit_pipeline("flux")
    with pytest.raises(ConfigError, match="negative prompt"):
        adapter_for(pipe).sample_latents(pipe, ["a cat"], steps=1, guidance=3.5, resolution=16,
                                         generators=_seeded(1), negative_prompt="a grumpy cat")


def test_flow_noisy_and_target():
    pipe = tiny_mmdit_pipeline("flux")
    adapter = adapter_for(pipe)
    scheduler = adapter.training_scheduler(pipe)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    noisy, t, target = adapter.noisy_and_target(scheduler, latents, noise, torch.Generator().manual_seed(5))
    sigmas = losses.sample_flow_sigmas(scheduler, 4, torch.Generator().manual_seed(5), image_seq_len=16)
    torch.testing.assert_close(t, sigmas * 1000)
    torch.testing.assert_close(noisy, (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise)
    torch.testing.assert_close(target, noise - latents)


# --------------------------------------------------------------------------------------------------
# training steps: model-based and noise-based, dense and LoRA, teacher = adapters off
# --------------------------------------------------------------------------------------------------


def _fixed_batch(pipe, adapter):
    pipe.scheduler = adapter.anchor_sampler(pipe, "euler")
    with torch.no_grad():
        latents = adapter.sample_latents(pipe, ["a cat"] * 4, steps=2, guidance=3.5, resolution=16,
                                         generators=_seeded(4))
        anchor = adapter.encode_prompts(pipe, ["a cat"] * 4, "cpu")
        target = adapter.encode_prompts(pipe, ["a grumpy cat"] * 4, "cpu")
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(latents.shape, generator=g)
    noisy, t, velocity = adapter.noisy_and_target(adapter.training_scheduler(pipe), latents, noise, g)
    return noisy, t, velocity, anchor, target


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("variant", ["model-based", "noise-based"])
@pytest.mark.parametrize("lora", [False, True])
def test_training_steps_reduce_the_loss(kind, variant, lora):
    pipe = tiny_mmdit_pipeline(kind)
    adapter = adapter_for(pipe)
    noisy, t, velocity, anchor, target = _fixed_batch(pipe, adapter)
    model = adapter.denoiser(pipe)
    with torch.no_grad():
        frozen_teacher = adapter.predict(model, noisy, t, anchor)
    trainable = setup_trainable(pipe, "cross-attn", lora_rank=2 if lora else 0, lora_alpha=2)
    assert trainable.lora == lora

    def teacher():
        if not lora:  # dense: the pretrained prediction, computed once above
            return frozen_teacher
        model.disable_adapters()  # LoRA: the same weights with the adapters off, no second copy
        try:
            with torch.no_grad():
                return adapter.predict(model, noisy, t, anchor)
        finally:
            model.enable_adapters()

    def loss():
        student = adapter.predict(model, noisy, t, target)
        if variant == "model-based":
            return losses.model_based_loss(student, teacher())
        return losses.noise_based_loss(student, velocity)

    optimizer = torch.optim.Adam(trainable.flat(), lr=1e-2)
    first = loss()
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        last = loss()
    # Model-based: the target-prompt velocity can reach the anchor's (here -31% to -77%). Noise-based: the
    # text K/V of a random tiny model explain little of eps - z0 (-0.2% to -6% in 8 steps).
    bound = 0.8 if variant == "model-based" else 0.999
    assert last.item() < bound * first.item(), (first.item(), last.item())
    if lora:
        torch.testing.assert_close(teacher(), frozen_teacher)  # adapters off = the pretrained model


# --------------------------------------------------------------------------------------------------
# exports: LoRA saved with the pipeline class, loaded back with load_lora_weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_export_round_trip(kind, tmp_path):
    pipe = tiny_mmdit_pipeline(kind)
    adapter = adapter_for(pipe)
    trainable = setup_trainable(pipe, "text-kv+embedders", lora_rank=2, lora_alpha=4)
    with torch.no_grad():  # stand-in for training: every adapter non-zero
        for p in trainable.flat():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 700.0])
    cond = adapter.encode_prompts(pipe, ["a grumpy cat", "a cat"], "cpu")
    with torch.no_grad():
        trained = adapter.predict(pipe.transformer, x, t, cond)
        base = adapter.predict(tiny_mmdit_pipeline(kind).transformer, x, t, cond)
    assert (trained - base).abs().max() > 1e-2  # the adapters change the output

    state = lora_state_from_pipe(pipe)["transformer"]
    type(pipe).save_lora_weights(str(tmp_path), transformer_lora_layers=state["state_dict"],
                                 transformer_lora_adapter_metadata=state["config"])
    fresh = tiny_mmdit_pipeline(kind)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = adapter.predict(fresh.transformer, x, t, cond)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)


def test_conditioning_rows_keep_the_shared_text_ids():
    from ablation.architectures import Conditioning

    ids = torch.zeros(3, 3)
    cond = Conditioning(torch.arange(2 * 3 * 2.0).reshape(2, 3, 2), torch.tensor([[1.0], [2.0]]), ids)
    picked = cond.select(torch.tensor([1, 1, 0]))
    assert picked.pooled.flatten().tolist() == [2.0, 2.0, 1.0] and picked.text_ids is ids
    both = Conditioning.cat(cond, picked)
    assert both.embeds.shape == (5, 3, 2) and both.text_ids is ids
    half = cond.to("cpu", torch.bfloat16)
    assert half.embeds.dtype == torch.bfloat16 and half.text_ids.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# families before loading (planning)
# --------------------------------------------------------------------------------------------------


def test_transformer_configs_family_and_geometry(tmp_path, model_dir):
    import json

    from ablation.architectures import native_geometry, pipeline_family, read_transformer_configs, training_adapter

    tiny_mmdit_pipeline("flux-schnell").save_pretrained(tmp_path / "schnell")
    transformer, vae, family = read_transformer_configs(str(tmp_path / "schnell"))
    assert family == "flux-schnell" and vae["latent_channels"] == 4 and transformer["in_channels"] == 16
    assert pipeline_family(tiny_mmdit_pipeline("flux-schnell")) == "flux-schnell"
    assert pipeline_family(tiny_mmdit_pipeline("sd3")) == "sd3"
    assert read_transformer_configs(model_dir) is None  # a UNet model
    # the published geometry: SD3.5 sample_size 128, patch 2; FLUX the pipeline's 128 latent px, 2x2 packing
    assert native_geometry("sd3", {"sample_size": 128, "patch_size": 2}, 8) == (1024, 16)
    assert native_geometry("flux", transformer, 8) == (1024, 16)
    assert native_geometry("unet", {"sample_size": 64}, 8) == (512, 8)
    index = json.loads((tmp_path / "schnell" / "model_index.json").read_text())
    (tmp_path / "schnell" / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    with pytest.raises(ConfigError, match="FluxKontextPipeline"):
        read_transformer_configs(str(tmp_path / "schnell"))
    # FLUX has no classifier-free guidance: no negative prompt for its anchors; any UNet pipeline trains as SD
    assert not training_adapter(tiny_mmdit_pipeline("flux")).negative_prompts
    assert type(training_adapter(tiny_pipeline("inpaint"))) is UNetArchitecture
