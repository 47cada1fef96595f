"""A real 2-process DDP run on CPU (gloo) through `accelerate launch`: both ranks end with identical weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`, from this interpreter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [
    ["--gradient-accumulation-steps", "2", "--prior-preservation"],
    ["--lora-rank", "2", "--teacher", "frozen"],
    ["--params", "embedding"],
    ["--robust", "--robust-steps", "1"],
], ids=["dense", "lora-frozen-teacher", "embedding", "robust"])
def test_two_processes_agree(model_dir, tmp_path, extra):
    out = tmp_path / "run"
    # `--cpu --num_processes 2` silently runs one process; --multi_gpu with ACCELERATE_USE_CPU gives gloo DDP.
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "ablate.py", "--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
           "--num-anchor-images", "8", "--anchor-steps", "2", "--max-steps", "3", "--train-batch-size", "2",
           "--learning-rate", "3e-3", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
           "--debug-checksums", *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / "debug" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]  # two processes really ran
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["step"] == 3
    if "--robust" in extra:  # each rank moved the persistent adversary on its own batch; the mean is kept
        assert ranks[0]["adversary"] is not None and ranks[0]["adversary"] == ranks[1]["adversary"]
    assert (out / "delta.safetensors").exists()
    assert proc.stdout.count("ablation finished") == 1  # the summary comes from the main process only
