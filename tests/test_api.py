"""The Python API (`ablation.ablate`, `ablation.evaluate`) on the tiny in-memory pipeline."""

import doctest

import pytest
import torch

import ablation
from ablation.config import ConfigError
from ablation.testing import tiny_pipeline

#: small-run options shared by the tests (32 px, 8 anchors in 2 sampling steps)
SMALL = dict(resolution=32, num_anchor_images=8, anchor_steps=2, anchor_scheduler="ddim", train_batch_size=4,
             prior_preservation=False)

# The notebook path of README's "API" section, on the tiny pipeline instead of a hub model.
NOTEBOOK = """
>>> import ablation, torch
>>> result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", params="embedding", learning_rate=1e-2,
...                          max_steps=3, cache_dir=cache, **SMALL)
>>> result.pipeline is pipe                       # trained in place, not reloaded
True
>>> result.metrics["steps"], result.delta_path.name
(3, 'delta.safetensors')
>>> sorted(k.split("::")[-1] for k in result.delta)   # only the target's token rows were trained
['index', 'rows']
>>> g = lambda: torch.Generator().manual_seed(0)
>>> same = pipe("a photo of a cat", num_inference_steps=2, generator=g(), output_type="np").images
>>> bool((same == before_cat).all())              # an unrelated prompt is untouched
True
>>> saved = result.save(tmp / "saved")
>>> sorted(p.name for p in saved.iterdir())
['README.md', 'config.yaml', 'delta.safetensors']
"""


def _images(pipe, prompt: str):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_notebook_example(tmp_path):
    pipe = tiny_pipeline("sd1")
    globs = {"pipe": pipe, "cache": str(tmp_path / "cache"), "SMALL": SMALL, "tmp": tmp_path,
             "before_cat": _images(pipe, "a photo of a cat")}
    test = doctest.DocTestParser().get_doctest(NOTEBOOK, globs, "notebook", "test_api.py", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_dense_run_changes_the_given_pipeline_and_matches_its_delta(tmp_path):
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_target = _images(pipe, "a photo of a grumpy cat")
    result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", max_steps=4, learning_rate=3e-3,
                             teacher="same", output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), **SMALL)
    assert result.run_dir == tmp_path / "run" and (result.run_dir / "config.yaml").is_file()
    assert result.config.params == "cross-attn" and result.config.max_steps == 4  # resolved, like config.yaml
    assert result.metrics["final_loss"] < result.metrics["initial_loss"]
    assert not pipe.unet.training  # ready for inference
    after = pipe.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert {k.removeprefix("unet.") for k in result.delta} == changed  # the delta is exactly what changed
    for key, value in result.delta.items():
        torch.testing.assert_close(after[key.removeprefix("unet.")], value)
    assert not (_images(pipe, "a photo of a grumpy cat") == before_target).all()
    # in-memory pipeline: the delta names it so, and the toy defaults were not used
    assert result.config.model == "in-memory"


def test_lora_run_attaches_adapters(tmp_path):
    pipe = tiny_pipeline("sd1")
    result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", lora_rank=2, max_steps=2, learning_rate=3e-3,
                             cache_dir=str(tmp_path / "c"), **SMALL)
    lora_b = [v for k, v in pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # attached and trained
    assert result.run_dir.name.startswith("ablation-") and not (result.run_dir / "checkpoints").exists()


def test_model_id_is_loaded_once(model_dir, tmp_path):
    result = ablation.ablate(model_dir, target="Grumpy Cat", anchor="Cat", max_steps=1, learning_rate=1e-3,
                             cache_dir=str(tmp_path / "c"), **SMALL)
    assert result.pipeline is not None and result.delta_path.is_file()
    assert result.config.model == model_dir


@pytest.mark.parametrize("options, message", [
    ({"max_step": 3}, "max_step"),           # a typo fails like an unknown YAML key
    ({"params": "everything"}, "--params"),
    ({"learning_rate": -1.0}, "--learning-rate"),
])
def test_bad_options_fail_before_training(tmp_path, options, message):
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", output_dir=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())


def test_not_a_pipeline_is_a_config_error():
    with pytest.raises(ConfigError, match="pipeline or a model id"):
        ablation.ablate(object(), target="Grumpy Cat", anchor="Cat")


def _tiny_clip(path) -> str:
    """A tiny random CLIP judge: the report's numbers are not meaningful, its shape is."""
    from ablation.testing import tiny_clip

    return tiny_clip(path)


def test_evaluate_returns_the_report_and_refreshes_the_card(model_dir, tmp_path):
    pipe = tiny_pipeline("sd1")
    result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", params="embedding", learning_rate=1e-2,
                             max_steps=2, model=model_dir, output_dir=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "c"), **SMALL)
    assert "## Evaluation\n\nNot evaluated yet" in result.save(result.run_dir).joinpath("README.md").read_text()
    report = ablation.evaluate(result, num_samples=1, steps=2, height=32, width=32, device="cpu",
                               clip_model=_tiny_clip(tmp_path / "clip"), kid_subsets=2)
    assert report["base_model"] == model_dir  # recorded by the run
    assert (result.run_dir / "eval" / "report.json").is_file()
    target_rows = [r for r in report["comparison"]["run"] if r["role"] == "target" and r["metric"] == "clip_accuracy"]
    assert len(target_rows) == 1 and target_rows[0]["concept"] == "grumpy cat"
    card = (result.run_dir / "README.md").read_text()
    row = target_rows[0]
    assert f"| grumpy_cat | grumpy cat | target | {row['base']:.2f} → {row['ablated']:.2f} |" in card
    assert "Not evaluated yet" not in card and "eval/report.md" in card
    assert all(f"(eval/{g})" in card for g in report["files"]["grids"])
    with pytest.raises(ConfigError, match="unknown_setting"):
        ablation.evaluate(result, unknown_setting=1)


def test_sd3_pipeline_in_memory(tmp_path):
    from ablation.testing import tiny_mmdit_pipeline

    pipe = tiny_mmdit_pipeline("sd3")
    result = ablation.ablate(pipe, target="Grumpy Cat", anchor="Cat", resolution=16, num_anchor_images=4,
                             anchor_steps=2, max_steps=3, train_batch_size=2, learning_rate=1e-2,
                             prior_preservation=False, cache_dir=str(tmp_path / "c"))
    assert result.config.lora_rank == 16 and result.config.anchor_scheduler == "euler"  # the MMDiT defaults
    assert not pipe.transformer.training
    lora_b = [v for k, v in pipe.transformer.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    assert result.metrics["final_loss"] < result.metrics["initial_loss"]


def test_save_copies_every_export(model_dir, tmp_path):
    result = ablation.ablate(tiny_pipeline("sd1"), target="Grumpy Cat", anchor="Cat", lora_rank=2, max_steps=1,
                             model=model_dir, export=["lora", "single-file"], output_dir=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "c"), **SMALL)
    saved = result.save(tmp_path / "saved")
    assert {"lora", "single-file"} <= {p.name for p in saved.iterdir()}  # single-file/ was left behind before
    files = sorted(p.name for p in (saved / "single-file").iterdir())
    assert files == sorted(p.name for p in (result.run_dir / "single-file").iterdir()) and files
