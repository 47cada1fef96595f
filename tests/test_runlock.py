"""One run per output directory: a second run fails at once (exit 2), naming the holder, and writes nothing."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ablation import runlock
from ablation.config import build_config
from ablation.train_cli import main

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys; from ablation.runlock import acquire; lock = acquire(sys.argv[1]); print('locked', flush=True); "
        "sys.stdin.read()")


@pytest.fixture
def holder(tmp_path):
    """Another process holding `tmp_path/out` (as a running `ablate train` does); yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def _argv(model_dir, tmp_path, *extra):
    return ["--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--resolution", "32", "--num-anchor-images", "2",
            "--anchor-steps", "1", "--max-steps", "1", *extra]


def test_a_second_process_fails_at_once_naming_the_holder(model_dir, tmp_path, holder):
    proc = subprocess.run([sys.executable, str(ROOT / "ablate.py"), *_argv(model_dir, tmp_path, "--overwrite")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: output directory") and f"pid {holder.pid} on " in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]  # nothing written
    assert not (tmp_path / "cache").exists()  # failed before any work


def test_in_process_run_is_refused_too(model_dir, tmp_path, holder, capsys):
    assert main(_argv(model_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {holder.pid}" in err


def test_the_lock_is_held_for_the_whole_run_and_dropped_after(model_dir, tmp_path, monkeypatch):
    """While `train` runs, another process cannot take the folder; once it returns (or dies) it can."""
    from ablation import trainer

    seen = {}
    real = trainer._setup_training

    def probe(*args, **kwargs):  # mid-run: a second process tries the folder
        seen["mid"] = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "out")], input="", text=True,
                                     capture_output=True, timeout=120)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_setup_training", probe)
    result = trainer.train(build_config(None, dict(
        model=model_dir, target=["Grumpy Cat"], anchor=["Cat"], output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"), resolution=32, num_anchor_images=2, anchor_steps=1, max_steps=1)))
    assert result.delta_path.is_file()
    assert seen["mid"].returncode != 0 and "is in use by another run" in seen["mid"].stderr
    assert f"pid {os.getpid()} on " in seen["mid"].stderr
    del result
    after = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "out")], input="", text=True,
                           capture_output=True, timeout=120)
    assert after.returncode == 0 and after.stdout.strip() == "locked", after.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    with pytest.raises(runlock.RunLockedError, match=f"pid {holder.pid}"):
        runlock.acquire(tmp_path / "out")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = runlock.acquire(tmp_path / "out")  # the kernel dropped the dead holder's lock
    assert f'"pid": {os.getpid()}' in (tmp_path / "out" / ".lock").read_text()
    lock.release()
