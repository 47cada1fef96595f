"""Anchor data: cache key and invalidation, negative prompts, the copy filter, image checks, retrieval."""

import hashlib
import io
import json
import logging
import sys
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ablation import data
from ablation.config import ConfigError
from ablation.sampling import anchors as anchor_sampling
from ablation.testing import tiny_components, tiny_pipeline

PROMPTS = ("a photo of a cat", "a cat on a sofa")


def settings(key: str, **overrides) -> anchor_sampling.SamplerSettings:
    values = dict(model_key=key, prompts=PROMPTS, scheduler="ddim", steps=2, guidance=3.0, resolution=32, count=2,
                  seed=7)
    values.update(overrides)
    return anchor_sampling.SamplerSettings(**values)


def key(pipe, revision=None) -> str:
    return data.anchor_model_key("tiny", "tiny", pipe, revision)


# --------------------------------------------------------------------------------------------------
# cache key
# --------------------------------------------------------------------------------------------------


def test_model_key_is_stable_across_instances_and_a_save_load(model_dir):
    reference = key(tiny_pipeline("sd1"))
    assert key(tiny_pipeline("sd1")) == reference
    # The saved copy has another path and freshly written files: the same weights, the same key.
    assert key(StableDiffusionPipeline.from_pretrained(model_dir)) == reference
    assert key(tiny_pipeline("sd1"), revision="v2") != reference


def test_model_key_changes_with_text_encoder_vae_scheduler_and_unet():
    reference = key(tiny_pipeline("sd1"))

    pipe = tiny_pipeline("sd1")
    with torch.no_grad():  # one entry of one token row ("van"): a sampled checksum would miss it
        pipe.text_encoder.get_input_embeddings().weight[2451, 0] += 1e-3
    assert key(pipe) != reference

    pipe = tiny_pipeline("sd1")
    pipe.text_encoder.config.layer_norm_eps = 1e-6
    assert key(pipe) != reference

    pipe = tiny_pipeline("sd1")
    pipe.vae = tiny_components("sd1", seed=1)["vae"]
    assert key(pipe) != reference

    pipe = tiny_pipeline("sd1")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_end=0.013)
    assert key(pipe) != reference

    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        next(pipe.unet.parameters()).mul_(1.01)
    assert key(pipe) != reference


def test_model_key_covers_both_sdxl_text_encoders():
    reference = key(tiny_pipeline("sdxl"))
    pipe = tiny_pipeline("sdxl")
    with torch.no_grad():
        pipe.text_encoder_2.get_input_embeddings().weight[100, 3] += 1e-3
    assert key(pipe) != reference


def test_settings_key_covers_precision_and_negative_prompt():
    base = settings("k")
    assert settings("k", precision="no").cache_key() == base.cache_key()  # accelerate's "no" is fp32
    keys = {base.cache_key(), settings("k", precision="bf16").cache_key(), settings("k", precision="fp16").cache_key(),
            settings("k", negative_prompt="grumpy cat").cache_key(), settings("k", copy_filter="f").cache_key()}
    assert len(keys) == 5
    with pytest.raises(ValueError, match="precision"):
        settings("k", precision="fp8")


def test_cache_hits_when_nothing_changes_and_misses_after_a_change(tmp_path):
    cache = tmp_path / "cache"
    first = data.cached_anchor_latents(tiny_pipeline("sd1"), settings(key(tiny_pipeline("sd1"))), cache)
    assert first.generated and first.latents.shape == (2, 4, 16, 16)
    fresh = tiny_pipeline("sd1")
    again = data.cached_anchor_latents(fresh, settings(key(fresh)), cache)
    assert not again.generated and torch.equal(again.latents, first.latents)

    changed = tiny_pipeline("sd1")
    with torch.no_grad():
        changed.text_encoder.get_input_embeddings().weight.mul_(1.5)
    regenerated = data.cached_anchor_latents(changed, settings(key(changed)), cache)
    assert regenerated.generated and not torch.allclose(regenerated.latents, first.latents)

    bf16 = data.cached_anchor_latents(fresh, settings(key(fresh), precision="bf16"), cache,
                                      autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16.generated and not torch.equal(bf16.latents, first.latents)
    saved = json.loads((cache / settings(key(fresh), precision="bf16").cache_key() / data.SETTINGS_FILE).read_text())
    assert saved["precision"] == "bf16"


def test_trajectory_states_are_the_samplers_states_at_their_timesteps():
    pipe = tiny_pipeline("sd1")
    columns = anchor_sampling.generate_latents(pipe, settings(key(pipe), steps=4, count=1, trajectory=True), [0], 1,
                                    disable_progress=True)
    states = torch.from_numpy(np.stack(columns["trajectory"]))[0]
    assert states.shape == (4, 4, 16, 16)
    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler.set_timesteps(4)
    assert columns["trajectory_t"][0] == [float(t) for t in sampler.timesteps]
    # the first state is the seed's initial noise
    noise = torch.randn(states[0].shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(states[0], noise * sampler.init_noise_sigma)
    # One DDIM step (guidance 3) from each state at its timestep gives the next state, and the last the output.
    cond, uncond = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    chain = [*states, torch.from_numpy(columns["latents"][0])]
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            z = chain[i][None]
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
            step = sampler.step(eps_u + 3.0 * (eps_c - eps_u), t, z).prev_sample
            assert torch.allclose(step, chain[i + 1][None], atol=1e-5), i
    from ablation.sampling.anchors import recording_states

    with recording_states(sampler, []):
        assert "step" in vars(sampler)
    assert "step" not in vars(sampler)  # the recorder is gone: the class's method again


def test_trajectory_is_cached_and_keys_of_plain_anchors_are_unchanged(tmp_path):
    plain = settings("k")
    old_key = hashlib.sha256(json.dumps({k: v for k, v in plain.__dict__.items() if k != "trajectory"},
                                        sort_keys=True, default=list).encode()).hexdigest()[:24]
    assert plain.cache_key() == old_key  # caches written before the option keep their names
    assert settings("k", trajectory=True).cache_key() != old_key
    pipe = tiny_pipeline("sd1")
    first = data.cached_anchor_latents(pipe, settings(key(pipe), steps=3, trajectory=True), tmp_path)
    assert first.generated and first.trajectory.shape == (2, 3, 4, 16, 16) and first.trajectory_t.shape == (2, 3)
    again = data.cached_anchor_latents(pipe, settings(key(pipe), steps=3, trajectory=True), tmp_path)
    assert not again.generated and torch.equal(again.trajectory, first.trajectory)
    assert torch.equal(again.latents, first.latents)


# --------------------------------------------------------------------------------------------------
# negative prompt (nudity anchors)
# --------------------------------------------------------------------------------------------------


def test_negative_prompt_reaches_the_pipeline():
    pipe = tiny_pipeline("sd1")
    plain = anchor_sampling.generate_latents(pipe, settings("k"), [0, 1], batch_size=2)
    negative = anchor_sampling.generate_latents(pipe, settings("k", negative_prompt="nudity"), [0, 1], batch_size=2)
    plain_latents, negative_latents = np.stack(plain["latents"]), np.stack(negative["latents"])
    assert np.abs(plain_latents - negative_latents).max() > 1e-4

    direct = pipe(prompt=[PROMPTS[1]], negative_prompt=["nudity"], num_inference_steps=2, guidance_scale=3.0,
                  height=32, width=32, generator=[torch.Generator().manual_seed(7 + 1)], output_type="latent")
    np.testing.assert_allclose(negative_latents[1], direct.images[0].numpy(), rtol=0, atol=1e-5)
    assert negative["seed"] == [7, 8] and negative["index"] == [0, 1]


# --------------------------------------------------------------------------------------------------
# copy filter (memorization anchors)
# --------------------------------------------------------------------------------------------------


def _solid(rgb, size=32) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def _mean_colour(images) -> torch.Tensor:
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images]))


def test_filter_copies_thresholds_image_cosine():
    images = [_solid((255, 0, 0)), _solid((0, 0, 255)), _solid((200, 0, 200))]
    # cosines to pure red: 1, 0, 0.707
    assert data.filter_copies(images, _solid((250, 0, 0), 8), _mean_colour, 0.9).tolist() == [False, True, True]
    assert data.filter_copies(images, _solid((250, 0, 0), 8), _mean_colour, 0.5).tolist() == [False, True, False]


def test_filter_copies_decodes_latents_with_the_vae():
    pipe, seen = tiny_pipeline("sd1"), []

    def embed(images):
        seen.extend(im.size for im in images)
        return _mean_colour(images)

    keep = data.filter_copies(torch.randn(3, 4, 4, 4), _solid((9, 9, 9), 5), embed, vae=pipe.vae)
    assert keep.dtype == torch.bool and keep.shape == (3,)
    assert seen == [(5, 5)] + [(8, 8)] * 3  # reference first, then the decoded anchors (4x4 latents x 4)


class FlagFirst:
    """Fake embedder: the 7x7 reference is e0; the first `copies` anchors it sees copy it, the rest are e1."""

    def __init__(self, copies: int):
        self.copies, self.seen = copies, 0

    def __call__(self, images):
        rows = []
        for im in images:
            if im.size == (7, 7):
                rows.append([1.0, 0.0])
            else:
                rows.append([1.0, 0.0] if self.seen < self.copies else [0.0, 1.0])
                self.seen += 1
        return torch.tensor(rows)


def test_copy_filter_resamples_copies_with_fresh_seeds(tmp_path):
    pipe = tiny_pipeline("sd1")
    base = settings("k", count=4)
    copy_filter = data.CopyFilter(_solid((1, 2, 3), 7), FlagFirst(copies=2), embedder="fake", max_rounds=2)
    anchors = data.cached_anchor_latents(pipe, base, tmp_path, copy_filter=copy_filter)
    assert anchors.generated and len(anchors.latents) == 4
    assert anchors.prompt_index.tolist() == [0, 1, 0, 1]  # a replacement keeps its slot's prompt
    # slots 0 and 1 were copies: resampled in round 1 with seed + 1 * count + k; slots 2, 3 kept seed + k
    replaced = anchor_sampling.generate_latents(pipe, base, [0, 1], 4, seeds=[7 + 4, 7 + 4 + 1])
    kept = anchor_sampling.generate_latents(pipe, base, [2, 3], 4)
    expected = torch.from_numpy(np.stack(replaced["latents"] + kept["latents"]))
    torch.testing.assert_close(anchors.latents, expected, rtol=0, atol=1e-5)
    # the filter is part of the key: the unfiltered set is another cache entry
    assert not (tmp_path / base.cache_key()).exists()


def test_copy_filter_warns_when_it_cannot_fill_and_fails_when_nothing_is_left(tmp_path, caplog):
    pipe = tiny_pipeline("sd1")
    short = data.CopyFilter(_solid((1, 2, 3), 7), FlagFirst(copies=3), embedder="fake-3", max_rounds=1)
    with caplog.at_level(logging.WARNING, logger="ablation.data"):
        anchors = data.cached_anchor_latents(pipe, settings("k"), tmp_path, copy_filter=short)
    assert len(anchors.latents) == 1 and anchors.prompt_index.tolist() == [1]
    assert any("1 of 2 anchor images" in r.getMessage() for r in caplog.records)

    never = data.CopyFilter(_solid((1, 2, 3), 7), FlagFirst(copies=10**6), embedder="always", max_rounds=1)
    with pytest.raises(RuntimeError, match="every one copied the reference"):
        data.cached_anchor_latents(pipe, settings("k"), tmp_path, copy_filter=never)


def test_load_reference_image(tmp_path):
    (tmp_path / "m.png").write_bytes(_png((20, 10)))
    assert data.load_reference_image(tmp_path / "m.png").size == (20, 10)
    (tmp_path / "bad.png").write_bytes(HTML)
    for name in ("bad.png", "missing.png"):
        with pytest.raises(ConfigError, match=f"memorized image .*{name}.* is not a readable image") as e:
            data.load_reference_image(tmp_path / name)
        assert "\n" not in str(e.value)


def test_torchscript_embedder_loads_a_user_file(tmp_path):
    class MeanPool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(MeanPool()).save(str(path))
    embed = data.load_torchscript_embedder(path)
    red, wide = _solid((255, 0, 0), 50), Image.new("RGB", (100, 50), (0, 255, 0))
    feats = embed([red, wide, red])  # two sizes: two forward passes, original order kept
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(feats[0], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std, rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[1], (torch.tensor([0.0, 1.0, 0.0]) - mean) / std, rtol=0, atol=1e-5)
    assert embed.name.startswith("torchscript:")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="cannot load TorchScript model") as e:
        data.load_torchscript_embedder(junk)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is not a file"):
        data.load_torchscript_embedder(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------------
# --anchor-images checks
# --------------------------------------------------------------------------------------------------


def _png(size=(40, 40), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(size=(160, 140)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 20, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


HTML = b"<!doctype html><html><body>403 Forbidden</body></html>"


def test_check_image_source_names_a_corrupt_file_in_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.jpg").write_bytes(HTML)
    with pytest.raises(ConfigError, match="b.jpg is not a readable image") as e:
        data.check_image_source(str(tmp_path), retrieval=False, count=8)
    assert "\n" not in str(e.value)
    data.check_image_source(str(tmp_path), retrieval=False, count=1)  # only a.png will be used
    with pytest.raises(ConfigError, match="b.jpg is not a readable image"):
        data.load_images(tmp_path)


def test_check_image_source_warns_when_fewer_images_than_requested(tmp_path, caplog):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png())
    with caplog.at_level(logging.WARNING, logger="ablation.data"):
        data.check_image_source(str(tmp_path), retrieval=False, count=128)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "has 2 images, fewer than the 128 requested" in warnings[0]
    assert "\n" not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ablation.data"):
        data.check_image_source(str(tmp_path), retrieval=False, count=2)
    assert not caplog.records


def test_check_image_source_verifies_dataset_rows(tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    rows = [{"bytes": _png(), "path": None}, {"bytes": HTML, "path": None}]
    Dataset.from_dict({"image": rows}, features=Features({"image": ImageFeature()})).save_to_disk(str(tmp_path / "d"))
    data.check_image_source(str(tmp_path / "d"), retrieval=False, count=1)
    with pytest.raises(ConfigError, match="image 1 of dataset"):
        data.check_image_source(str(tmp_path / "d"), retrieval=False, count=2)


# --------------------------------------------------------------------------------------------------
# --retrieval (fake service and downloads, no network)
# --------------------------------------------------------------------------------------------------

PAGES = {
    "http://img/0.png": _png((200, 180)),
    "http://img/1.html": HTML,
    "http://img/2.tiny.png": _png((16, 16)),
    "http://img/3.truncated.jpg": _jpeg()[:400],
    "http://img/5.jpg": _jpeg(),
    "http://img/6.png": _png((256, 256), (1, 2, 3)),
}
RESULTS = ["http://img/0.png", "http://img/1.html", "http://img/2.tiny.png", "http://img/3.truncated.jpg",
           "file:///etc/passwd", "http://img/5.jpg", "http://dead/link", "http://img/6.png"]


@pytest.fixture
def fake_service(monkeypatch):
    """A fake clip-retrieval client and urlopen; records the client's arguments, queries and downloads."""
    record = {"clients": [], "queries": 0, "downloads": [], "fail": False}

    class FakeClipClient:
        def __init__(self, url, indice_name, num_images, **kwargs):
            record["clients"].append({"url": url, "indice_name": indice_name, "num_images": num_images})

        def query(self, text):
            record["queries"] += 1
            if record["fail"]:
                raise ConnectionError("Max retries exceeded\nwith url: /knn-service")
            return [{"url": u, "caption": text, "id": i, "similarity": 0.3} for i, u in enumerate(RESULTS)]

    package = types.ModuleType("clip_retrieval")
    client_module = types.ModuleType("clip_retrieval.clip_client")
    client_module.ClipClient = FakeClipClient
    package.clip_client = client_module
    monkeypatch.setitem(sys.modules, "clip_retrieval", package)
    monkeypatch.setitem(sys.modules, "clip_retrieval.clip_client", client_module)

    def fake_urlopen(request, timeout=None):
        url = request.full_url
        assert url.startswith("http"), f"opened {url}"
        record["downloads"].append(url)
        if url not in PAGES:
            raise urllib.error.URLError("Name or service not known")
        return io.BytesIO(PAGES[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return record


def test_retrieval_keeps_only_valid_images_and_marks_completion(tmp_path, fake_service):
    out = data.retrieve_images("cat", 2, tmp_path / "r", url="http://knn.local/knn", index="my-index")
    assert fake_service["clients"] == [{"url": "http://knn.local/knn", "indice_name": "my-index", "num_images": 8}]
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000005.jpg", data.RETRIEVAL_STATE]
    assert "file:///etc/passwd" not in fake_service["downloads"]
    state = json.loads((out / data.RETRIEVAL_STATE).read_text())
    assert state["complete"] and state["saved"] == 2 and state["index"] == "my-index"
    assert [im.size for im in data.load_images(out)] == [(200, 180), (160, 140)]

    # complete: reused without a query
    data.retrieve_images("cat", 2, out, url="http://knn.local/knn", index="my-index")
    assert fake_service["queries"] == 1


def test_retrieval_resumes_a_partial_folder(tmp_path, fake_service):
    out = tmp_path / "r"
    out.mkdir()
    (out / "000000.png").write_bytes(PAGES["http://img/0.png"])
    (out / "000001.jpg").write_bytes(HTML)  # an error page saved by an older version
    (out / ".000002.png.tmp-123-abcd").write_bytes(b"half")  # a killed writer's temporary
    data.retrieve_images("cat", 3, out)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000005.jpg", "000007.png", data.RETRIEVAL_STATE]
    assert "http://img/0.png" not in fake_service["downloads"]  # kept, not fetched again
    assert fake_service["clients"][0]["url"] == data.DEFAULT_RETRIEVAL_URL
    assert fake_service["clients"][0]["indice_name"] == data.DEFAULT_RETRIEVAL_INDEX

    # more images than a complete folder holds: topped up (nothing more to get here, so it stays at 3)
    data.retrieve_images("cat", 5, out)
    assert fake_service["queries"] == 2


def test_retrieval_overwrite_and_another_index_start_afresh(tmp_path, fake_service):
    out = data.retrieve_images("cat", 1, tmp_path / "r")
    (out / "000099.png").write_bytes(_png((300, 300)))
    data.retrieve_images("cat", 1, out, overwrite=True)
    assert not (out / "000099.png").exists() and (out / "000000.png").exists()
    assert fake_service["downloads"].count("http://img/0.png") == 2

    (out / "000099.png").write_bytes(_png((300, 300)))
    data.retrieve_images("cat", 1, out, index="other-index")
    assert not (out / "000099.png").exists()
    assert json.loads((out / data.RETRIEVAL_STATE).read_text())["index"] == "other-index"


def test_retrieval_service_failure_is_one_line_and_writes_nothing(tmp_path, fake_service):
    fake_service["fail"] = True
    expected = r"querying http://knn.local \(index 'laion5B-L-14'\) failed: Max retries exceeded with"
    with pytest.raises(ConfigError, match=expected) as e:
        data.retrieve_images("cat", 2, tmp_path / "r", url="http://knn.local")
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


def test_validate_image_bytes():
    assert data.validate_image_bytes(_jpeg())[1] == ".jpg"
    gif = io.BytesIO()
    Image.new("RGB", (150, 150)).save(gif, "GIF")
    stored, suffix = data.validate_image_bytes(gif.getvalue())
    assert suffix == ".png" and Image.open(io.BytesIO(stored)).format == "PNG"
    for bad, reason in [(HTML, "not a readable image"), (_jpeg()[:400], "not a readable image"),
                        (_png((16, 300)), "smaller than 128")]:
        with pytest.raises(ValueError, match=reason):
            data.validate_image_bytes(bad)


def test_target_images_join_the_anchors_paired_with_their_anchor_prompts(model_dir, tmp_path):
    """`--target-images N`: N images of the target prompts follow the anchors, each under the target prompt it was
    sampled with and the anchor prompt that prompt is the variant of; seeds continue after the anchors'."""
    from accelerate import Accelerator

    from ablation.config import build_config
    from ablation.models import load_pipeline
    from ablation.planning import plan_run
    from ablation.training_data import prepare_data

    values = dict(model=model_dir, target=["grumpy cat"], anchor=["cat"], output_dir=str(tmp_path / "run"),
                  cache_dir=str(tmp_path / "cache"), num_anchor_images=3, anchor_steps=2, target_images=2)
    plan = plan_run(build_config(None, values))
    pipe = load_pipeline(model_dir)
    training, generated = prepare_data(plan, pipe, Accelerator(cpu=True))
    plain, _ = prepare_data(plan_run(build_config(None, {**values, "target_images": 0})), pipe, Accelerator(cpu=True))
    assert generated == 5 and training.latents.shape[0] == 5
    assert torch.equal(training.latents[:3], plain.latents)  # the anchors are unchanged (same cache entry)
    assert training.prior_pool.tolist() == [0, 1, 2] and plain.prior_pool is None  # the prior term: anchors only
    concept = plan.concepts[0]
    targets = tuple(row[0] for row in concept.variants())
    cfg = plan.config
    settings = anchor_sampling.SamplerSettings(data.anchor_model_key(model_dir, plan.model_path, pipe, None), targets,
                                               cfg.anchor_scheduler, cfg.anchor_steps, cfg.anchor_guidance,
                                               cfg.resolution, 2, seed=3)
    expected = data.cached_anchor_latents(pipe, settings, tmp_path / "other")
    assert torch.equal(training.latents[3:], expected.latents)
    for i, k in ((3, 0), (4, 1)):
        assert training.prompts[int(training.anchor_rows[i])] == concept.anchor_prompts[k]
        assert training.prompts[int(training.target_rows[i, 0])] == targets[k]
        assert "grumpy cat" in targets[k] and "grumpy" not in concept.anchor_prompts[k]


def test_several_concepts_get_their_own_prior_term_and_an_equal_share_of_the_batch(model_dir, tmp_path):
    """Grumpy cat (its target names its anchor: prior term) with nemo (none): the prior term draws only grumpy cat's
    anchors, explicit options apply to every concept, and the ablation batch takes each concept about equally often
    although nemo has more latents."""
    from accelerate import Accelerator

    from ablation.config import build_config
    from ablation.models import load_pipeline
    from ablation.objective import Objective
    from ablation.planning import plan_run
    from ablation.training_data import prepare_data

    values = dict(model=model_dir, target=["grumpy cat", "nemo"], anchor=["cat", "fish"],
                  output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), num_anchor_images=3,
                  anchor_steps=2)
    plan = plan_run(build_config(None, values))
    assert plan.concept_priors == (True, False) and plan.config.prior_preservation is True
    pipe = load_pipeline(model_dir)
    training, _ = prepare_data(plan, pipe, Accelerator(cpu=True))
    assert training.prior_pool.tolist() == [0, 1, 2]  # grumpy cat's anchors only
    assert training.concept_spans.tolist() == [[0, 3], [3, 3]]
    forced = plan_run(build_config(None, {**values, "prior_preservation": True, "output_dir": str(tmp_path / "b")}))
    assert forced.concept_priors == (True, True) and forced.config_hash != plan.config_hash  # explicit: every concept
    many = plan_run(build_config(None, {**values, "target_images": 9, "output_dir": str(tmp_path / "c")}))
    assert many.concept_target_images == (9, 9)  # an explicit count: every concept
    training.latents = torch.cat([training.latents, training.latents[3:].repeat(3, 1, 1, 1)])  # nemo: 12 latents
    training.concept_spans = torch.tensor([[0, 3], [3, 12]])
    objective = Objective.__new__(Objective)  # only the draw: no model needed
    objective.cfg, objective.data = plan.config, training
    idx = torch.cat([objective._draw_latents(64, torch.Generator().manual_seed(s))[0] for s in range(8)])
    share = float((idx < 3).float().mean())
    assert 0.4 < share < 0.6 and int(idx.max()) < 15  # uniform over latents would give grumpy cat 0.2
