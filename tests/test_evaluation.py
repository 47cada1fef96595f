"""Evaluation programs end to end on tiny pipelines and a tiny random CLIP judge (CPU, no downloads)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ablation.checkpoint import make_metadata, pipeline_config_hash, save_delta
from ablation.cli import main
from ablation.evaluation.clip_judge import ClipJudge
from ablation.evaluation.evaluate import EvalSettings, evaluate
from ablation.evaluation.prompts import adhoc_task, load_prompts, paper_task, paper_task_names, toy_task
from ablation.evaluation.swap import ablated
from ablation.sampling.generate import SamplingSettings, jobs_for, set_scheduler
from ablation.sampling.inpaint import box_mask, inpaint, inpaint_pipeline
from ablation.testing import tiny_clip, tiny_pipeline
from ablation.toyworld import catalog

FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def _tiny_clip(path):
    return tiny_clip(path)


def _perturbed_delta(pipe, scale=0.5, include_conv_in=False):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"unet.{n}": p.detach() + scale * torch.randn(p.shape, generator=gen)
               for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    if include_conv_in:
        tensors["unet.conv_in.weight"] = pipe.unet.conv_in.weight.detach() + 0.1
    return tensors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Saved tiny sd1 / inpaint / upscale pipelines, a tiny CLIP, and a run dir with a perturbed delta."""
    root = tmp_path_factory.mktemp("world")
    pipes = {}
    for kind in ("sd1", "inpaint", "upscale"):
        pipes[kind] = tiny_pipeline(kind)
        pipes[kind].save_pretrained(root / kind)
    run = root / "run_zorp"
    meta = make_metadata(base_model=str(root / "sd1"), base_config_hash=pipeline_config_hash(pipes["sd1"]),
                         concepts=[{"target": "zorp", "anchor": "cat", "concept_type": "instance"}],
                         params="cross-attn", lora_rank=0, steps=1, learning_rate=1e-5, variant="model-based")
    save_delta(run / "delta.safetensors", _perturbed_delta(pipes["sd1"]), meta)
    return {"root": root, "clip": _tiny_clip(root / "clip"), "run": run, "pipes": pipes,
            **{k: str(root / k) for k in pipes}}


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ------------------------------------------------------------------ prompts


def test_prompt_sets_cover_paper_and_toy_families():
    for name in paper_task_names():
        task = paper_task(name)
        assert set(task.prompts) == set(task.classes) and set(task.judge_texts) == set(task.classes)
        assert all(task.prompts[c] for c in task.classes)
    gc = paper_task("Grumpy Cat")
    assert gc.anchor == "cat" and "persian cat" in gc.surrounding and gc.versus("cat") == "grumpy cat"
    assert paper_task("van gogh").prompts["monet"][0].endswith(", in the style of monet")
    for family in catalog().families.values():
        task = toy_task(family.name)
        assert task.prompts[task.anchor] == family.heldout_prompts
        assert all(task.prompts[c] for c in task.classes)
    assert load_prompts("grumpy_cat:cat", toy=True) == list(catalog().families["grumpy_cat"].heldout_prompts)
    assert load_prompts("toy/snoopy:beagle")[0] == catalog().families["snoopy"].prompts_for("beagle", "heldout")[0]
    assert load_prompts("paper/r2d2:bb8")[0] == "a photo of a bb8"


def test_select_tasks_from_run_config(tmp_path):
    from ablation.config import TrainConfig
    from ablation.evaluation.selection import select_tasks

    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(concepts=[{"target": "Grumpy Cat", "anchor": "cat", "concept_type": "instance"}])
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (toy,) = select_tasks("toy", [str(run)])
    assert toy.source == "toyworld" and toy.surrounding == catalog().families["grumpy_cat"].surrounding
    (paper,) = select_tasks("CompVis/stable-diffusion-v1-4", [str(run)])
    assert paper.source == "paper" and "persian cat" in paper.surrounding
    flags = TrainConfig(target=["zorp"], anchor=["dog"]).to_dict()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(flags))
    (adhoc,) = select_tasks("toy", [], config=str(tmp_path / "recipe.yaml"))
    assert adhoc.source == "config" and adhoc.classes == ("zorp", "dog")
    assert all("zorp" in p for p in adhoc.prompts["zorp"]) and len(adhoc.prompts["dog"]) == 8
    with pytest.raises(ValueError, match="nothing to evaluate"):
        select_tasks("toy", [])


def test_load_prompts_from_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    (tmp_path / "p.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.json")) == ["x", "y"]
    with pytest.raises(KeyError):
        load_prompts("no_such_set")


# ------------------------------------------------------------------ judge and swapping


def test_clip_judge_features_are_normalised_and_batched(world):
    judge = ClipJudge(world["clip"], device="cpu", batch_size=2)
    images = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    feats = judge.image_features(images)
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    texts = judge.text_features(["a cat", "a dog", "a cat"])
    torch.testing.assert_close(texts[0], texts[2])
    torch.testing.assert_close(judge.image_features(images[:1])[0], feats[0], atol=1e-5, rtol=0)


def test_ablated_swaps_in_and_restores_also_on_inpainting_unet(world, tmp_path):
    pipe = tiny_pipeline("sd1")
    before = _state(pipe.unet)
    tensors = _perturbed_delta(pipe, include_conv_in=True)
    save_delta(tmp_path / "delta.safetensors", tensors, {"format": "ablation-delta/1"})
    key = next(k for k in tensors if "attn2.to_k" in k).removeprefix("unet.")
    with ablated(pipe, tmp_path):
        torch.testing.assert_close(pipe.unet.state_dict()[key], tensors["unet." + key])
    _assert_same_state(before, _state(pipe.unet))
    # the sd1 delta on the 9-channel inpainting UNet: attention applies, conv_in (4 vs 9 channels) is skipped
    inp = tiny_pipeline("inpaint")
    before = _state(inp.unet)
    with ablated(inp, tmp_path / "delta.safetensors"):
        torch.testing.assert_close(inp.unet.state_dict()[key], tensors["unet." + key])
        torch.testing.assert_close(inp.unet.conv_in.weight, before["conv_in.weight"])
    _assert_same_state(before, _state(inp.unet))


def test_ablated_accepts_a_pipeline_dir(world, tmp_path):
    other = tiny_pipeline("sd1")
    tensors = _perturbed_delta(other)
    with torch.no_grad():
        for k, v in tensors.items():
            other.unet.get_parameter(k.removeprefix("unet.")).copy_(v)
    other.save_pretrained(tmp_path / "ablated_pipe")
    pipe = tiny_pipeline("sd1")
    before = _state(pipe.unet)
    with ablated(pipe, tmp_path / "ablated_pipe"):
        _assert_same_state(_state(other.unet), _state(pipe.unet))
    _assert_same_state(before, _state(pipe.unet))


def test_ablated_loads_and_removes_a_lora_dir(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = tiny_pipeline("sd1")
    trained.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn2.to_k", "attn2.to_v"],
                                        init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(
        trained.unet))
    pipe = tiny_pipeline("sd1")

    def sample(p):
        return p("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    before = sample(pipe)
    with ablated(pipe, tmp_path / "lora"):
        np.testing.assert_allclose(sample(pipe), sample(trained), atol=1e-5)
    np.testing.assert_array_equal(sample(pipe), before)


# ------------------------------------------------------------------ generate


def test_generate_writes_manifest_and_is_independent_of_batch_size(world, tmp_path):
    args = ["generate", "--model", world["sd1"], "--prompt", "a cat", "--prompt", "a dog", "--num-samples", "2",
            "--seed", "7", *FAST]
    assert main([*args, "--batch-size", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--batch-size", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--delta", str(world["run"]), "--out", str(tmp_path / "c")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert {"prompt", "seed", "model", "delta", "settings", "file"} <= set(lines[0])
    assert [x["seed"] for x in lines] == [7, 8, 100007, 100008]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["delta"] == str(world["run"]) and len(manifest["images"]) == 4
    for row in lines:
        a = np.asarray(Image.open(tmp_path / "a" / row["file"]), dtype=np.float32)
        b = np.asarray(Image.open(tmp_path / "b" / row["file"]), dtype=np.float32)
        c = np.asarray(Image.open(tmp_path / "c" / row["file"]), dtype=np.float32)
        assert a.shape == (32, 32, 3)
        assert np.abs(a - b).max() <= 1  # uint8 rounding only
        assert np.abs(a - c).mean() > 1  # the delta changes the images


# ------------------------------------------------------------------ inpaint


def test_inpaint_4_channel_blends_latents_outside_the_mask(world):
    pipe = inpaint_pipeline(tiny_pipeline("sd1"))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 4
    set_scheduler(pipe, "ddim")
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask = box_mask(image.size, "center", 0.25)
    settings = SamplingSettings(steps=3)
    outs = [np.asarray(s.image, dtype=np.float32) / 255
            for s in inpaint(pipe, image, mask, jobs_for(["a cat"], 2), settings)]
    inside = np.asarray(mask) > 0
    far = np.ones_like(inside)
    far[12:52, 12:52] = False  # away from the decoder's reach across the mask border
    diff = np.abs(outs[0] - outs[1])
    # two seeds: the unmasked latents are the input's in both, so only the masked region differs
    assert diff[far].mean() < 0.2 * diff[inside].mean()
    pasted = inpaint(pipe, image, mask, jobs_for(["a cat"], 1), settings, paste_back=True)[0].image
    np.testing.assert_array_equal(np.asarray(pasted)[~inside], np.asarray(image)[~inside])


def test_inpaint_cli_on_4_and_9_channel_models_with_a_text_to_image_delta(world, tmp_path):
    Image.new("RGB", (32, 32), (200, 60, 30)).save(tmp_path / "in.png")
    for kind in ("sd1", "inpaint"):
        out = tmp_path / kind
        assert main(["inpaint", "--model", world[kind], "--delta", str(world["run"]), "--image",
                     str(tmp_path / "in.png"), "--mask-box", "center", "--prompt", "a cat", "--steps", "2",
                     "--num-samples", "2", "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["unet_in_channels"] == (9 if kind == "inpaint" else 4)
        assert len(manifest["images"]) == 2
        assert Image.open(out / manifest["images"][0]["file"]).size == (32, 32)
        assert Image.open(out / "mask.png").size == (32, 32)


# ------------------------------------------------------------------ upscale


def test_upscale_cli_is_4x_and_reports_psnr(world, tmp_path):
    low = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    low.save(tmp_path / "low.png")
    low.resize((32, 32), Image.BICUBIC).save(tmp_path / "high.png")
    out = tmp_path / "up"
    assert main(["upscale", "--model", world["upscale"], "--image", str(tmp_path / "low.png"), "--prompt", "a cat",
                 "--reference", str(tmp_path / "high.png"), "--steps", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert Image.open(out / manifest["images"][0]["file"]).size == (32, 32)
    assert manifest["psnr"]["bicubic"] == float("inf") or manifest["psnr"]["bicubic"] > 40
    assert np.isfinite(manifest["psnr"]["upscaler"])


# ------------------------------------------------------------------ eval


def test_eval_cli_end_to_end_with_cache(world, tmp_path):
    out = tmp_path / "eval"
    controls = tmp_path / "controls.yaml"
    controls.write_text("car: [a photo of a car, a red car]\nhorse: {prompts: [a horse], judge: a horse}\n")
    # base model and concepts come from the delta's metadata; the tiny CLIP judges
    args = ["eval", "--ablated", str(world["run"]), "--clip", world["clip"], "--num-samples", "2", "--batch-size",
            "6", "--kid-subsets", "5", "--out", str(out), "--control-prompts", str(controls), "--control-samples",
            "2", *FAST]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_model"] == world["sd1"] and report["clip_model"] == world["clip"]
    assert [m["name"] for m in report["models"]] == ["base", "run_zorp"]
    assert report["tasks"][0]["target"] == "zorp" and report["tasks"][0]["anchor"] == "cat"
    for name in ("base", "run_zorp"):
        rows = report["results"][name]["zorp"]
        assert set(rows) == {"zorp", "cat"}
        for row in rows.values():
            assert {"clip_accuracy", "family_accuracy", "clip_score", "seeds", "num_images", "role"} <= set(row)
            assert row["num_images"] == 16 and row["generated"] == 16  # 8 prompts of the bundled cat list
    kid = report["results"]["run_zorp"]["zorp"]["zorp"]["kid_vs_base"]
    assert kid is not None and "kid_vs_base" not in report["results"]["base"]["zorp"]["zorp"]
    metrics_seen = {r["metric"] for r in report["comparison"]["run_zorp"]}
    assert metrics_seen == {"clip_accuracy", "family_accuracy", "clip_score", "kid_vs_base"}
    assert report["settings"]["sampling"]["steps"] == 2
    md = (out / "report.md").read_text()
    assert "| concept | role | metric | base | ablated | change |" in md and "run_zorp" in md
    for grid in report["files"]["grids"]:
        assert Image.open(out / grid).width > 0
    if importlib.util.find_spec("matplotlib"):  # the chart is optional (extra `plots`, also in `test`)
        assert (out / "clip_accuracy.png").exists() and report["files"]["chart"] == "clip_accuracy.png"
    else:
        assert not (out / "clip_accuracy.png").exists() and report["files"].get("chart") is None
    # collateral damage on the control prompts: same seeds for base and ablated, CLIP over controls + task
    col = report["collateral"]
    assert col["controls"] == ["car", "horse"] and col["judges"] == ["clip"] and report["classifier"] is None
    assert col["clip_labels"] == ["car", "horse", "zorp", "cat"]
    run = col["runs"]["run_zorp"]
    assert run["num_images"] == 4 and run["concepts"]["car"]["num_images"] == 2
    assert 0.0 <= run["changed_fraction"]["clip"] <= 1.0
    assert col["base"]["changed_fraction"]["clip"] == 0.0  # base against itself
    assert "## Collateral damage" in md and "| car |" in md
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 2 * (32 + 4)  # 2 models x (2 concepts x 16 + 2 controls x 2)
    stamps = {p: p.stat().st_mtime_ns for p in images}
    # second run: everything comes from the cache, the numbers do not change
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(r["generated"] == 0 for m in again["results"].values() for r in m["zorp"].values())
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    assert again["results"] == {k: {t: {c: {**r, "generated": 0} for c, r in v.items()} for t, v in m.items()}
                                for k, m in report["results"].items()}


def test_evaluate_memorization_rate(world, tmp_path):
    pipe = tiny_pipeline("sd1")
    task = adhoc_task("the famous zorp poster", "a poster", "memorization")
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "memorized.png")
    settings = EvalSettings(sampling=SamplingSettings(steps=2, height=32, width=32), samples_per_prompt=2,
                            kid_subsets=3, memorization_threshold=-1.0, grid_prompts=1, control_samples=1)
    report = evaluate(world["sd1"], [str(world["run"])], [task], tmp_path / "out", settings, pipe=pipe,
                      judge=ClipJudge(world["clip"], device="cpu"), memorized_image=str(tmp_path / "memorized.png"))
    target = report["results"]["run_zorp"][task.name][task.target]
    assert target["memorization_rate"] == 1.0  # threshold -1: every sample counts
    assert "memorization_rate" not in report["results"]["run_zorp"][task.name]["a poster"]
    assert report["tasks"][0]["memorized_reference"].endswith("memorized.png")
    # a real (non-toy) base model without --control-prompts: the bundled control set, one image each
    from ablation.evaluation.collateral import load_controls

    assert report["collateral"]["controls"] == [c.name for c in load_controls()]
    assert report["collateral"]["runs"]["run_zorp"]["num_images"] == len(load_controls())


def test_paper_protocol_passes_the_paper_volumes(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "eval" / "paper_protocol.py"
    spec = importlib.util.spec_from_file_location("paper_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    monkeypatch.setattr(module, "eval_main", lambda argv: seen.append(argv) or 0)
    assert module.main(["--ablated", "run", "--steps", "20"]) == 0
    argv = seen[0]
    assert "--paper-volumes" in argv and argv[argv.index("--guidance") + 1] == "6"
    assert argv[-2:] == ["--steps", "20"]  # the caller's flags come last and win


# ------------------------------------------------------------------ judges and collateral damage


def test_paper_judge_is_clip_vit_b32_with_vit_l14_an_option(monkeypatch, tmp_path):
    from ablation.evaluation import evaluate as evaluate_module
    from ablation.evaluation.cli import TOY_EVAL_BATCH, TOY_EVAL_STEPS, eval_main
    from ablation.evaluation.clip_judge import DEFAULT_CLIP, LARGE_CLIP, default_clip_for
    from ablation.toyworld import clip_dir

    # the official evaluate.py of Kumari et al. scores CLIP accuracy and CLIP score with ViT-B/32
    assert DEFAULT_CLIP == "openai/clip-vit-base-patch32" and LARGE_CLIP == "openai/clip-vit-large-patch14"
    assert default_clip_for("CompVis/stable-diffusion-v1-4") == DEFAULT_CLIP
    assert default_clip_for("toy") == str(clip_dir())
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: seen.append((a, k)) or {"comparison": {}})
    base = ["--base", "CompVis/stable-diffusion-v1-4", "--family", "grumpy_cat", "--out", str(tmp_path)]
    assert eval_main(base) == 0
    assert eval_main(base + ["--clip-model", LARGE_CLIP]) == 0
    assert eval_main(base + ["--clip", "some/clip"]) == 0  # the old flag name still works
    assert eval_main(["--family", "grumpy_cat", "--out", str(tmp_path)]) == 0  # toy model
    assert [k["clip_model"] for _, k in seen] == [None, LARGE_CLIP, "some/clip", None]
    settings = [a[4] for a, _ in seen]
    assert (settings[0].sampling.steps, settings[0].batch_size) == (50, 8)  # the paper's sampler steps
    assert (settings[3].sampling.steps, settings[3].batch_size) == (TOY_EVAL_STEPS, TOY_EVAL_BATCH)
    assert all(s.control_samples == 8 for s in settings)
    assert not list(tmp_path.iterdir())  # evaluate was replaced: nothing written


def test_eval_rejects_bad_control_options(tmp_path):
    from ablation.evaluation.cli import eval_main

    bad = tmp_path / "controls.yaml"
    bad.write_text("car: []\n")
    base = ["--family", "grumpy_cat", "--out", str(tmp_path / "out")]
    assert eval_main(base + ["--control-prompts", str(bad)]) == 2
    assert eval_main(base + ["--control-prompts", str(tmp_path / "missing.yaml")]) == 2
    assert eval_main(base + ["--control-samples", "-1"]) == 2
    assert not (tmp_path / "out").exists()


def test_toy_controls_and_summary():
    from ablation.evaluation.collateral import load_controls, summarize, toy_controls

    controls = toy_controls()
    assert len(controls) == 31 == len(catalog().concepts)
    by_name = {c.name: c for c in controls}
    assert by_name["c-3po"].prompts == tuple(catalog().families["r2d2"].prompts_for("c-3po", "heldout"))
    assert [j.seed for j in by_name["cat"].jobs(3, 0)] == [0, 100000, 200000]  # one image per prompt first
    assert "cat" not in {c.name for c in toy_controls(exclude=["cat"])}
    assert {c.name for c in load_controls()} >= {"car", "horse"}
    labels = ["cat", "cat", "robot", "robot"]
    base = {"classifier": ["cat", "cat", "robot", "dog"], "clip": ["cat", "cat", "robot", "robot"]}
    ablated = {"classifier": ["cat", "dog", "cat", "dog"], "clip": ["cat", "cat", "robot", "robot"]}
    s = summarize(labels, base, ablated)
    assert s["judges"] == ["classifier", "clip"] and s["num_images"] == 4
    assert s["changed_fraction"] == {"classifier": 0.5, "clip": 0.0}
    assert s["concepts"]["robot"]["classifier"] == {"base": 0.5, "ablated": 0.0, "change": -0.5, "changed": 0.5}
    assert s["accuracy"]["classifier"] == {"base": 0.75, "ablated": 0.25}


@pytest.fixture(scope="module")
def toy_pipes():
    from ablation.evaluation.collateral import toy_judges
    from ablation.models import load_pipeline

    base, other = load_pipeline("toy"), load_pipeline("toy")
    for pipe in (base, other):
        pipe.set_progress_bar_config(disable=True)
    # the "ablation": the word robot now means cat (its token embedding row is cat's)
    tok = other.tokenizer
    robot, cat = tok("robot").input_ids[1], tok("cat").input_ids[1]
    with torch.no_grad():
        emb = other.text_encoder.get_input_embeddings().weight
        emb[robot] = emb[cat]
    return base, other, toy_judges()


def test_collateral_measure_sees_a_leak_with_both_judges(toy_pipes):
    from ablation.evaluation.collateral import measure

    base, other, judges = toy_pipes
    result = measure(base, other, concepts=["cat", "robot", "monet"], per_concept=4, steps=10, judges=judges)
    assert result["judges"] == ["classifier", "clip"] and result["num_images"] == 12
    for judge in ("classifier", "clip"):
        rows = result["concepts"]
        # the base model draws every concept; both judges recognise it
        assert all(rows[c][judge]["base"] >= 0.75 for c in ("cat", "robot", "monet")), (judge, rows)
        # robots turned into cats; cats and monet paintings did not change
        assert rows["robot"][judge]["ablated"] <= 0.25 and rows["robot"][judge]["changed"] >= 0.75
        assert rows["cat"][judge]["changed"] == 0.0 and rows["monet"][judge]["changed"] == 0.0
        assert result["changed_fraction"][judge] == pytest.approx(rows["robot"][judge]["changed"] / 3)
    same = measure(base, base, concepts=["robot"], per_concept=2, steps=10, judges=judges)
    assert same["changed_fraction"] == {"classifier": 0.0, "clip": 0.0}
    with pytest.raises(KeyError, match="unknown toy concepts"):
        measure(base, other, concepts=["unicorn"], judges=judges)


def test_toy_classifier_names_every_concept_of_held_out_renders(tmp_path):
    from ablation.toyworld.catalog import HELDOUT_SEED_OFFSET
    from ablation.toyworld.classifier import CLASSIFIER_DIR, load_classifier
    from ablation.toyworld.render import render

    assert (CLASSIFIER_DIR / "model.safetensors").stat().st_size < 1.5e6
    judge = load_classifier()
    concepts = list(catalog().concepts)
    assert judge.classes == concepts
    # seeds the classifier's training and held-out split never used
    images = [Image.fromarray(render(c, HELDOUT_SEED_OFFSET + 777_000 + i)) for i, c in enumerate(concepts)]
    assert judge.predict(images) == concepts
    probs = judge.probs(images[:3] + [images[0].resize((128, 128))])  # any size is resized to 64 px
    assert probs.shape == (4, 31) and torch.allclose(probs.sum(-1), torch.ones(4))
    assert int(probs[3].argmax()) == 0 and judge.accuracy(images[:1], concepts[0]) == 1.0
    with pytest.raises(FileNotFoundError, match="train_toy_classifier"):
        load_classifier(tmp_path)


def test_overwrite_leaves_nothing_of_the_previous_run(world, tmp_path):
    """run -> eval -> single-file export -> eval into another folder -> an --overwrite run: only the new run's
    files are left, and its model card says it is not evaluated (it showed the old evaluation before the fix)."""
    run = tmp_path / "run"
    train = ["train", "--model", world["sd1"], "--target", "zorp", "--anchor", "cat", "--resolution", "32",
             "--num-anchor-images", "2", "--anchor-steps", "2", "--max-steps", "2", "--train-batch-size", "2",
             "--checkpointing-steps", "1", "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache")]
    assert main(train) == 0
    evaluate_args = ["eval", "--ablated", str(run), "--clip", world["clip"], "--num-samples", "1", "--batch-size", "4",
                     "--kid-subsets", "2", *FAST]
    assert main(evaluate_args) == 0
    assert main(evaluate_args + ["--out", str(run / "second-eval")]) == 0
    assert main(["export", "--run", str(run), "--format", "single-file"]) == 0
    assert {"eval", "second-eval", "single-file", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert "Not evaluated yet" not in (run / "README.md").read_text()
    (run / "notes.txt").write_text("mine")  # not a result: a user's file stays

    assert main(train + ["--overwrite", "--max-steps", "1", "--checkpointing-steps", "0"]) == 0
    left = sorted(p.name for p in run.iterdir() if p.name != ".lock")
    assert left == ["README.md", "config.yaml", "delta.safetensors", "notes.txt", "timings.json"]
    card = (run / "README.md").read_text()
    assert "Not evaluated yet" in card and "| steps done | 1 |" in card
