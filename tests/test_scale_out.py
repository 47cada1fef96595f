"""The shipped `accelerate` configs for scale-out (docs/scale-out.md): they parse with accelerate's own loader,
name only real launch options and UNet block classes, and the multi-node one really rendezvous two "machines"
(two launchers on 127.0.0.1, machine_rank 0 and 1, gloo on CPU) for a training run whose ranks agree."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

from ablation.testing import tiny_pipeline

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
MULTI_NODE, FSDP = CONFIGS / "multi_node_ddp.yaml", CONFIGS / "fsdp_full.yaml"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path", [MULTI_NODE, FSDP], ids=lambda p: p.name)
def test_config_parses_and_names_only_launch_options(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    launch_options = {a.dest for a in launch_command_parser()._actions}
    unknown = set(config.fsdp_config) - launch_options
    assert not unknown, f"fsdp_config keys that `accelerate launch` does not know: {unknown}"
    assert path.read_text().count("accelerate launch --config_file examples/accelerate/") >= 1  # its command


def test_multi_node_config():
    config = load_config_from_file(str(MULTI_NODE))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 2 and config.machine_rank == 0 and config.main_process_ip
    assert config.num_processes % config.num_machines == 0  # total over the machines


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_fsdp_config_wraps_diffusers_unet_blocks(kind):
    config = load_config_from_file(str(FSDP))
    fsdp = config.fsdp_config
    assert config.distributed_type == DistributedType.FSDP
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_use_orig_params"] is True
    classes = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    present = {type(m).__name__ for m in tiny_pipeline(kind).unet.modules()}
    assert classes <= present, f"{classes - present} are not in the {kind} UNet"


def test_multi_node_launch_two_machines_on_one_host(model_dir, tmp_path):
    out, port = tmp_path / "run", _free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    train = ["ablate.py", "--model", model_dir, "--target", "Grumpy Cat", "--anchor", "Cat", "--resolution", "32",
             "--num-anchor-images", "8", "--anchor-steps", "2", "--max-steps", "2", "--train-batch-size", "2",
             "--learning-rate", "3e-3", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
             "--debug-checksums"]
    procs = []
    for rank in (0, 1):  # one process per "machine"; the shipped file, with this host's address and port
        cmd = [*ACCELERATE, "--config_file", str(MULTI_NODE), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", *train]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((out / "debug" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["step"] == 2
    assert (out / "delta.safetensors").is_file()
    assert sum(o.count("ablation finished") for o, _ in outputs) == 1  # only the main process summarises
