"""Resumable state of a run: checkpoints that hold only the trained tensors plus accelerate's optimizer/RNG state.

A checkpoint is complete once its state file (written last) exists; `list_checkpoints` ignores the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ablation.config import ConfigError
from ablation.io import atomic_write_text

STATE_FILE = "ablation_state.json"  # written last into a checkpoint: marks it complete
TRAINED_FILE = "trained.safetensors"
ADVERSARY_KEY = "robust.adversary"  # not a component's tensor: no trained name starts with "robust."


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a state file) under `output_dir/checkpoints`, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def read_checkpoint_state(path: Path) -> dict:
    """The ablation state of a checkpoint: step, config hash, number of processes."""
    state_file = Path(path) / STATE_FILE
    if not state_file.exists():
        raise ConfigError(f"{path} is not a complete ablation checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def _trained_state(trainable) -> dict[str, torch.Tensor]:
    return {f"{comp}.{name}": p.detach().float().cpu().contiguous()
            for comp, params in trainable.parameters.items() for name, p in params.items()}


def weights_checksum(trainable) -> str:
    """sha256 of the trained tensors (identical on every rank after a DDP step)."""
    h = hashlib.sha256()
    for key, tensor in sorted(_trained_state(trainable).items()):
        h.update(key.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def tensor_checksum(tensor: torch.Tensor | None) -> str | None:
    """sha256 of one tensor's float32 values (None for None): the persistent --robust adversary in debug output."""
    if tensor is None:
        return None
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def register_state_hooks(accelerator, trainable, objective=None) -> None:
    """Checkpoints hold only the trained tensors (not whole models), plus accelerate's optimizer/RNG state, and the
    persistent adversary of `--robust-adversary persistent` (`objective.adversary`) when there is one."""
    def save_hook(models, weights, output_dir):
        weights.clear()  # accelerate would otherwise save every prepared model in full
        if accelerator.is_main_process:
            state = _trained_state(trainable)
            adversary = getattr(objective, "adversary", None)
            if adversary is not None:
                state[ADVERSARY_KEY] = adversary.detach().float().cpu().contiguous()
            save_file(state, os.path.join(output_dir, TRAINED_FILE))

    def load_hook(models, input_dir):
        models.clear()
        state = load_file(os.path.join(input_dir, TRAINED_FILE))
        with torch.no_grad():
            for comp, params in trainable.parameters.items():
                for name, p in params.items():
                    p.copy_(state[f"{comp}.{name}"])
        if objective is not None and ADVERSARY_KEY in state:
            objective.adversary = state[ADVERSARY_KEY].to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, plan, step: int) -> Path:
    """`accelerator.save_state` into `checkpoints/checkpoint-<step>`, then rotate old ones (every process calls).

    Old checkpoints are removed only once the new one is complete, so a failed save (a full disk) leaves the
    last good checkpoint in place; the incomplete new folder is removed.
    """
    cfg = plan.config
    path = plan.output_dir / "checkpoints" / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(path))
        if accelerator.is_main_process:  # written last: a checkpoint without it is incomplete
            state = {"step": step, "config_hash": plan.config_hash, "num_processes": accelerator.num_processes}
            atomic_write_text(path / STATE_FILE, json.dumps(state))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and cfg.checkpoints_total_limit:
        existing = list_checkpoints(plan.output_dir)
        for old in existing[:max(0, len(existing) - cfg.checkpoints_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    return path
