"""Checkpoints: a killed-and-resumed run ends where an uninterrupted one does; bad resumes and NaN stop cleanly."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ablation.config import build_config
from ablation.train_cli import main
from ablation.trainer import TrainingError, list_checkpoints, train


def _values(model_dir, tmp_path, out, **overrides):
    values = dict(model=model_dir, target=["Grumpy Cat"], anchor=["Cat"], resolution=32, num_anchor_images=8,
                  anchor_steps=2, max_steps=6, train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=3e-3, prior_preservation=True, checkpointing_steps=3, hflip=True,
                  output_dir=str(tmp_path / out), cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return values


def test_kill_and_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    full = train(build_config(None, _values(model_dir, tmp_path, "full")))
    stopped = train(build_config(None, _values(model_dir, tmp_path, "resumed", stop_after_steps=4)))
    assert stopped.stopped_early and stopped.delta_path is None
    assert not (tmp_path / "resumed" / "delta.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    # steps 4.. are redone from checkpoint-3, as after a kill at step 4
    resumed = train(build_config(None, _values(model_dir, tmp_path, "resumed", resume_from_checkpoint="latest")))
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
    a, b = load_file(full.delta_path), load_file(resumed.delta_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("adversary", ["persistent", "shifted"])
def test_kill_and_resume_keeps_the_persistent_adversary(model_dir, tmp_path, adversary):
    """--robust-adversary persistent / shifted carry a perturbation across steps (shifted also draws its prefix
    tokens from the micro-step's seed): a resumed run must carry both."""
    robust = dict(params="cross-attn", teacher="frozen", robust=True, robust_adversary=adversary,
                  robust_radius=1.0, prior_preservation=False)
    full = train(build_config(None, _values(model_dir, tmp_path, "full", **robust)))
    train(build_config(None, _values(model_dir, tmp_path, "resumed", stop_after_steps=4, **robust)))
    saved = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-3" / "trained.safetensors")
    assert saved["robust.adversary"].abs().sum() > 0  # it moved and was saved
    resumed = train(build_config(None, _values(model_dir, tmp_path, "resumed", resume_from_checkpoint="latest",
                                               **robust)))
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)


def test_resuming_with_another_configuration_is_an_error(model_dir, tmp_path, capsys):
    train(build_config(None, _values(model_dir, tmp_path, "run", max_steps=3)))
    args = ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
            "--num-anchor-images", "8", "--anchor-steps", "2", "--max-steps", "6", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--prior-preservation",
            "--checkpointing-steps", "3", "--hflip", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--resume-from-checkpoint", "latest"]
    assert main(args) == 2
    assert "made with another training configuration" in capsys.readouterr().err


def test_checkpoint_rotation(model_dir, tmp_path):
    train(build_config(None, _values(model_dir, tmp_path, "rot", max_steps=4, checkpointing_steps=1,
                                     checkpoints_total_limit=2, gradient_accumulation_steps=1)))
    assert [p.name for p in list_checkpoints(tmp_path / "rot")] == ["checkpoint-3", "checkpoint-4"]


def test_non_finite_loss_stops_without_a_delta(model_dir, tmp_path):
    values = _values(model_dir, tmp_path, "nan", learning_rate=1e30, max_grad_norm=0, checkpointing_steps=1,
                     gradient_accumulation_steps=1, prior_preservation=False)
    with pytest.raises(TrainingError, match=r"at step \d+.*checkpoint-\d+"):
        train(build_config(None, values))
    assert not (tmp_path / "nan" / "delta.safetensors").exists()
    assert list_checkpoints(tmp_path / "nan")


def test_resuming_with_another_number_of_processes_is_refused_at_plan_time(model_dir, tmp_path, capsys, monkeypatch):
    """`num_processes` in the checkpoint state is compared (faked state: a checkpoint saved by 2 processes)."""
    from ablation import models
    from ablation.config import ConfigError
    from ablation.planning import plan_run
    from ablation.resume import STATE_FILE

    values = _values(model_dir, tmp_path, "run", resume_from_checkpoint="latest")
    plan = plan_run(build_config(None, values))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 3, "config_hash": plan.config_hash, "num_processes": 2}))
    assert plan_run(build_config(None, values), num_processes=2).resume_dir == checkpoint  # same world size: fine
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\) but this run has 1.*--num_processes 2"):
        plan_run(build_config(None, values))

    def forbidden(*args, **kwargs):
        raise AssertionError("refused before loading weights")

    monkeypatch.setattr(models, "load_pipeline", forbidden)
    argv = ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
            "--num-anchor-images", "8", "--anchor-steps", "2", "--max-steps", "6", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--learning-rate", "3e-3", "--prior-preservation",
            "--checkpointing-steps", "3", "--hflip", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--resume-from-checkpoint", "latest"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: checkpoint ") and "saved by 2 process(es)" in line


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    from ablation import resume

    real, calls = resume.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 3:  # the third checkpoint: the disk is full
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", save_file)
    argv = ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
            "--num-anchor-images", "4", "--anchor-steps", "1", "--max-steps", "4", "--train-batch-size", "2",
            "--checkpointing-steps", "1", "--checkpoints-total-limit", "1", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("error: no space left on the device writing ") and "checkpoint-3" in line
    assert line.endswith("(last good checkpoint: " + str(tmp_path / "run" / "checkpoints" / "checkpoint-2") + ")")
    # the rotation (limit 1) did not delete checkpoint-2 before checkpoint-3 was complete; the partial one is gone
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert not (tmp_path / "run" / "delta.safetensors").exists()
    # and the run continues from it once there is space again
    monkeypatch.setattr(resume, "save_file", real)
    assert main(argv + ["--resume-from-checkpoint", "latest"]) == 0
    assert (tmp_path / "run" / "delta.safetensors").is_file()
