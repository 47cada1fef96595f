"""Bad input fails with `error: ...` and exit status 2 before any expensive work (no weights are loaded)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablation import models
from ablation.train_cli import main


@pytest.fixture
def inpaint_dir(model_dirs):
    return model_dirs["inpaint"]


_real_load_pipeline = models.load_pipeline


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input must be rejected before the model's weights are loaded")

    monkeypatch.setattr(models, "load_pipeline", forbidden)


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _fails(capsys, argv, match, root: Path | None = None):
    """Exit 2, one line `error: ...` containing `match`, and (given `root`) nothing under `root` written."""
    before = _tree(root) if root is not None else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert len(err.strip().splitlines()) == 1, err
    if root is not None:
        assert _tree(root) == before, "bad input must write nothing"


def _args(model_dir, tmp_path, *extra, target="Grumpy Cat", anchor="Cat"):
    return ["--model", model_dir, "--target", target, "--anchor", anchor, "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


def test_missing_model_path(tmp_path, capsys):
    _fails(capsys, _args(str(tmp_path / "nope"), tmp_path), "does not exist", root=tmp_path)


def test_target_equal_to_anchor(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, target="cat", anchor="Cat"), "equals its anchor", root=tmp_path)


def test_empty_strings(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, target="", anchor="Cat"), "empty target or anchor", root=tmp_path)
    _fails(capsys, _args("", tmp_path), "--model is empty", root=tmp_path)


def test_unknown_parameter_group_and_concept_type(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--params", "everything"), "invalid choice: 'everything'", root=tmp_path)
    _fails(capsys, _args(model_dir, tmp_path, "--concept-type", "vibe"), "invalid choice: 'vibe'", root=tmp_path)


def test_anchor_trajectory_needs_the_model_based_variant_without_augmentation(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--anchor-trajectory", "--variant", "image-based"),
           "needs the model-based variant", root=tmp_path)
    # the paper's instance defaults augment; the fix is named
    _fails(capsys, _args(model_dir, tmp_path, "--anchor-trajectory", "--variant", "model-based"),
           "add --no-augment", root=tmp_path)
    _fails(capsys, _args(model_dir, tmp_path, "--anchor-trajectory", "--variant", "model-based", "--no-augment",
                         "--anchor-steps", "1"), "--anchor-steps >= 2", root=tmp_path)


def test_target_images_need_the_model_based_variant(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--target-images", "8", "--variant", "image-based"),
           "--target-images needs the model-based variant", root=tmp_path)
    _fails(capsys, _args(model_dir, tmp_path, "--target-images", "-1"), "--target-images must be >= 0", root=tmp_path)


def test_prefix_adversary_on_sdxl(model_dirs, tmp_path, capsys):
    _fails(capsys, _args(model_dirs["sdxl"], tmp_path, "--params", "cross-attn", "--robust", "--robust-adversary",
                         "prefix"), "use --robust-adversary persistent", root=tmp_path)


def test_resolution_not_divisible_by_the_vae_factor(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--resolution", "33"), "not divisible by the VAE factor 2", root=tmp_path)


def test_yaml_with_unknown_keys(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": model_dir, "target": ["A"], "anchor": ["cat"], "max_step": 3}))
    _fails(capsys, ["--config", str(recipe)], "'max_step'", root=tmp_path)


def test_unknown_flag(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--lora-rnak", "4"), "unknown option 'lora-rnak'", root=tmp_path)


def test_mismatched_target_and_anchor_counts(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--target", "Snoopy"), "2 --target and 1 --anchor", root=tmp_path)


def test_non_empty_output_directory(model_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    _fails(capsys, _args(model_dir, tmp_path), "is not empty; pass --overwrite", root=tmp_path)


def test_missing_checkpoint_and_prompt_sources(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--resume-from-checkpoint", str(tmp_path / "ck")), "does not exist",
           root=tmp_path)
    _fails(capsys, _args(model_dir, tmp_path, target="Nessie", anchor="monster"), "no anchor prompts for anchor",
           root=tmp_path)
    _fails(capsys, _args(model_dir, tmp_path, "--anchor-prompts", str(tmp_path / "p.txt")), "does not exist",
           root=tmp_path)


def test_image_sources(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--variant", "image-based", "--anchor-images", str(tmp_path / "x")),
           "is not a directory")
    if importlib.util.find_spec("clip_retrieval") is None:
        _fails(capsys, _args(model_dir, tmp_path, "--variant", "image-based", "--retrieval"),
               "pip install 'ablation[retrieval]'")


def test_inpainting_model(inpaint_dir, tmp_path, capsys):
    _fails(capsys, _args(inpaint_dir, tmp_path), "9-channel UNet", root=tmp_path)


def test_fp16_on_cpu(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is available on this machine")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _fails(capsys, _args(model_dir, tmp_path, "--mixed-precision", "fp16"), "use bf16 or no on CPU", root=tmp_path)
    AcceleratorState._reset_state(True)


def test_invalid_yaml(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: [Grumpy Cat\nanchor: cat\n")
    _fails(capsys, ["--config", str(recipe)], "r.yaml is not valid YAML (line", root=tmp_path)
    recipe.write_bytes(b"target: \xff\xfe\n")
    _fails(capsys, ["--config", str(recipe)], "is not UTF-8 text", root=tmp_path)


def test_output_dir_that_is_a_file(model_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    argv = _args(model_dir, tmp_path)
    argv[argv.index("--output-dir") + 1] = str(afile)
    _fails(capsys, argv, "is a file, not a directory", root=tmp_path)


def test_output_dir_that_cannot_be_created(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    argv = _args(model_dir, tmp_path)
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "afile" / "run")
    _fails(capsys, argv, "is a file", root=tmp_path)


@pytest.mark.parametrize("flag, value", [("--learning-rate", "nan"), ("--learning-rate", "inf"),
                                         ("--max-grad-norm", "nan"), ("--prior-weight", "inf"),
                                         ("--anchor-guidance", "-inf"), ("--lora-alpha", "nan"),
                                         ("--adam-weight-decay", "inf")])
def test_non_finite_numbers(model_dir, tmp_path, capsys, flag, value):
    _fails(capsys, _args(model_dir, tmp_path, f"{flag}={value}"), f"{flag} must be a finite number", root=tmp_path)


@pytest.mark.parametrize("flag", ["--preserve-weight", "--preserve-uncond"])
def test_negative_penalty_weights(model_dir, tmp_path, capsys, flag):
    _fails(capsys, _args(model_dir, tmp_path, f"{flag}=-1"), f"{flag} must be >= 0, got -1", root=tmp_path)


def test_non_finite_numbers_in_yaml(tmp_path):
    from ablation.config import ConfigError, build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: [A]\nanchor: [B]\nlearning_rate: .nan\n")
    with pytest.raises(ConfigError, match="--learning-rate must be a finite number"):
        build_config(str(recipe))
    recipe.write_text("target: [A]\nanchor: [B]\nprior_weight: .inf\n")
    with pytest.raises(ConfigError, match="--prior-weight must be a finite number"):
        build_config(str(recipe))


def test_unknown_flag_hint_uses_the_flag_spelling(model_dir, tmp_path, capsys):
    _fails(capsys, _args(model_dir, tmp_path, "--max-stesp", "3"), "did you mean --max-steps?", root=tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: [A]\nanchor: [cat]\nmax_stesp: 3\n")
    _fails(capsys, ["--config", str(recipe)], "did you mean 'max_steps'?", root=tmp_path)  # YAML keeps its key


def test_a_late_check_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    """A check that fails after the weights are loaded (here: the optimizer) leaves no folder and no config.yaml."""
    from ablation import trainer

    monkeypatch.setattr(models, "load_pipeline", _real_load_pipeline)

    def late_check(*args, **kwargs):
        raise trainer.ConfigError("--use-8bit-adam needs a working bitsandbytes (simulated)")

    monkeypatch.setattr(trainer, "_make_optimizer", late_check)
    argv = _args(model_dir, tmp_path, "--resolution", "32", "--num-anchor-images", "2", "--anchor-steps", "1",
                 "--max-steps", "1")
    for existed in (False, True):
        if existed:  # an existing empty folder stays, still without config.yaml
            (tmp_path / "out").mkdir()
        assert main(argv) == 2
        err = capsys.readouterr().err  # the anchor progress bar came before the check
        assert err.splitlines()[-1] == "error: --use-8bit-adam needs a working bitsandbytes (simulated)"
        if existed:
            assert [p.name for p in (tmp_path / "out").iterdir() if p.name != ".lock"] == []
        else:
            assert not (tmp_path / "out").exists()


def test_accelerate_launch_input_error(tmp_path):
    """Under `accelerate launch --quiet` (launcher values given) an input error is one line; the launcher says 1."""
    root = Path(__file__).resolve().parents[1]
    env = {**_clean_env(), "HF_HOME": str(tmp_path / "hf")}  # no accelerate config of the machine
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--quiet", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "ablate.py"),
           "--target", "X", "--anchor", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.stderr.splitlines() == ["error: target 'X' equals its anchor; the anchor must be a different concept"]
    assert proc.returncode == 1  # accelerate's launcher turns every failed child into 1 (README)
    direct = subprocess.run([sys.executable, str(root / "ablate.py"), "--target", "X", "--anchor", "x"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert direct.returncode == 2 and len(direct.stderr.splitlines()) == 1, direct.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the launcher's config


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TQDM_"))}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from ablation.testing import tiny_mmdit_pipeline

    path = tmp_path_factory.mktemp("tiny_flux") / "flux"
    tiny_mmdit_pipeline("flux").save_pretrained(path)
    return str(path)


def test_single_file_export_on_flux(flux_dir, tmp_path, capsys):
    """FLUX has no single-file layout: refused when planning, not after the whole run (the export comes last)."""
    from ablation.config import ConfigError, build_config
    from ablation.planning import plan_run
    from ablation.testing import tiny_mmdit_pipeline

    message = "--export single-file has no FLUX layout (SD 1.x/2.x/XL and SD3 only); use --export lora or pipeline"
    _fails(capsys, _args(flux_dir, tmp_path, "--export", "single-file"), message, root=tmp_path)
    _fails(capsys, _args(flux_dir, tmp_path, "--export", "lora", "single-file", "--plan"), message, root=tmp_path)
    # the Python API with a loaded pipeline (FLUX.1-schnell here) is refused the same way
    values = dict(model=flux_dir, target=["Grumpy Cat"], anchor=["Cat"], output_dir=str(tmp_path / "out"),
                  export=["single-file"])
    with pytest.raises(ConfigError, match="has no FLUX layout"):
        plan_run(build_config(None, values), pipe=tiny_mmdit_pipeline("flux-schnell"))
    assert not (tmp_path / "out").exists()
