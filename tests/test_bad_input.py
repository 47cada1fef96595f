"""Bad input fails with `error: ...` and exit status 2 before any expensive work (no weights are loaded)."""

import importlib.util

import pytest
import yaml

from ablation import models
from ablation.train_cli import main


@pytest.fixture
def inpaint_dir(model_dirs):
    return model_dirs["inpaint"]


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input must be rejected before the model's weights are loaded")

    monkeypatch.setattr(models, "load_pipeline", forbidden)


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err


def _args(model_dir, tmp_path, *extra, target="Grumpy Cat", anchor="Cat"):
    return ["--model", model_dir, "--target", target, "--anchor", anchor, "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


def test_missing_model_path(tmp_path, capsys):
    _fails(capsys, _args(str(tmp_path / "nope"), tmp_path), "does not exist")


def test_target_equal_to_anchor(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, target="cat", anchor="Cat"), "equals its anchor")


def test_empty_strings(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, target="", anchor="Cat"), "empty target or anchor")
    _fails(capsys, _args("", tmp_path), "--model is empty")


def test_unknown_parameter_group_and_concept_type(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--params", "everything"), "invalid choice: 'everything'")
    _fails(capsys, _args(model_dir, tmp_path, "--concept-type", "vibe"), "invalid choice: 'vibe'")


def test_resolution_not_divisible_by_the_vae_factor(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--resolution", "33"), "not divisible by the VAE factor 2")


def test_yaml_with_unknown_keys(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": model_dir, "target": ["A"], "anchor": ["cat"], "max_step": 3}))
    _fails(capsys, ["--config", str(recipe)], "'max_step'")


def test_unknown_flag(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--lora-rnak", "4"), "unknown option 'lora-rnak'")


def test_mismatched_target_and_anchor_counts(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--target", "Snoopy"), "2 --target and 1 --anchor")


def test_non_empty_output_directory(model_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    _fails(capsys, _args(model_dir, tmp_path), "is not empty; pass --overwrite")


def test_missing_checkpoint_and_prompt_sources(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--resume-from-checkpoint", str(tmp_path / "ck")), "does not exist")
    _fails(capsys, _args(model_dir, tmp_path, target="Nessie", anchor="monster"), "no anchor prompts for anchor")
    _fails(capsys, _args(model_dir, tmp_path, "--anchor-prompts", str(tmp_path / "p.txt")), "does not exist")


def test_image_sources(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--variant", "image-based", "--anchor-images", str(tmp_path / "x")),
           "is not a directory")
    if importlib.util.find_spec("clip_retrieval") is None:
        _fails(capsys, _args(model_dir, tmp_path, "--variant", "image-based", "--retrieval"),
               "pip install 'ablation[retrieval]'")


def test_inpainting_model(inpaint_dir, tmp_path, capsys):
    _fails(capsys, _args(inpaint_dir, tmp_path), "9-channel UNet")


def test_fp16_on_cpu(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is available on this machine")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _fails(capsys, _args(model_dir, tmp_path, "--mixed-precision", "fp16"), "use bf16 or no on CPU")
    AcceleratorState._reset_state(True)
