"""Exports of an ablated model: a diffusers pipeline folder, a LoRA folder (diffusers + kohya files), one single file.

Every export is written through `ablation.io` (a temporary folder or file moved into place), so a
failed or killed export leaves the previous one intact and never a half-written one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ablation.config import EXPORT_KINDS
from ablation.delta import METADATA_FILENAME, TRAINABLE_COMPONENTS
from ablation.io import atomic_dir
from ablation.lora_convert import (
    KOHYA_SUFFIX,
    kohya_base_metadata,
    kohya_fused_state_dict,
    kohya_state_dict,
    lora_state_from_pipe,
    svd_lora_state,
)
from ablation.merge import components, dense_pipeline

logger = logging.getLogger("ablation.checkpoint")

SINGLE_FILE_DIR = "single-file"


def write_metadata(directory: Path, metadata: Mapping[str, str]) -> None:
    """`ablation.json` beside an export (its delta's metadata)."""
    (Path(directory) / METADATA_FILENAME).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, out_dir: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save a complete diffusers pipeline (safetensors, LoRA merged) atomically, with `ablation.json` metadata."""
    dense = dense_pipeline(pipe)

    def write(tmp: Path) -> None:
        dense.save_pretrained(tmp, safe_serialization=True)
        if metadata:
            write_metadata(tmp, metadata)

    atomic_dir(Path(out_dir), write)


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("._")
    return stem[:80] or "ablation"


def kohya_file_name(out_dir: str | Path) -> str:
    """`<run name>_kohya.safetensors` for a LoRA folder (`RUN/lora` -> the run's folder name)."""
    out_dir = Path(out_dir)
    name = out_dir.parent.name if out_dir.name == "lora" else out_dir.name
    return _file_stem(name) + KOHYA_SUFFIX


def save_lora(pipe, out_dir: str | Path, lora_state: Mapping[str, dict],
              metadata: Mapping[str, str] | None = None, *, kohya: bool = True) -> None:
    """Write a LoRA folder atomically: diffusers' file (`save_lora_weights`), the kohya file, `ablation.json`.

    The kohya-layout file (`<run name>_kohya.safetensors`, see `lora_convert.kohya_state_dict`) is the one
    to copy into AUTOMATIC1111's `models/Lora` or ComfyUI's `models/loras`; `load_lora_weights(DIR)`
    picks diffusers' own `pytorch_lora_weights.safetensors`.

    Args:
        pipe: the pipeline the LoRA applies to (its class saves, its family names the kohya base model).
        out_dir: the LoRA folder.
        lora_state: see `lora_convert`.
        metadata: the delta's metadata (also written as `ablation.json`).
        kohya: also write the kohya file (UNet pipelines; SD3 / FLUX when the LoRA is on the text q/k/v).
    """
    from safetensors.torch import save_file

    pipe_cls = type(pipe)
    kwargs: dict[str, Any] = {}
    for comp, entry in lora_state.items():
        if comp not in TRAINABLE_COMPONENTS:
            raise ValueError(f"cannot save LoRA layers for component {comp!r}")
        kwargs[f"{comp}_lora_layers"] = entry["state_dict"]
        if entry.get("config") is not None:
            kwargs[f"{comp}_lora_adapter_metadata"] = dict(entry["config"])
    text_encoders = 2 if "XL" in pipe_cls.__name__ else 1
    kohya_tensors = None
    if kohya and "transformer" not in lora_state:
        kohya_tensors = kohya_state_dict(lora_state, text_encoders=text_encoders)
    elif kohya:  # SD3 / FLUX: the text K/V group has an exact fused form; other groups keep diffusers' layout
        try:
            kohya_tensors = kohya_fused_state_dict(lora_state, "flux" if "Flux" in pipe_cls.__name__ else "sd3")
        except ValueError as err:
            logger.info("no kohya file for this LoRA: %s", err)
    kohya_meta = {k: v for k, v in (metadata or {}).items() if k != "format"}
    kohya_meta.update({"format": "pt", "ablation_format": "kohya-lora", "ss_network_module": "networks.lora",
                       **kohya_base_metadata(pipe)})

    def write(tmp: Path) -> None:
        pipe_cls.save_lora_weights(str(tmp), **kwargs)
        if kohya_tensors:
            save_file(kohya_tensors, str(tmp / kohya_file_name(out_dir)), metadata=kohya_meta)
        if metadata:
            write_metadata(tmp, metadata)

    atomic_dir(Path(out_dir), write)


def save_single_file_export(pipe, out_dir: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """`out_dir/<run name>.safetensors` (see `single_file.save_single_file`) plus `ablation.json`, atomically."""
    from ablation.single_file import save_single_file

    out_dir = Path(out_dir)
    name = _file_stem(out_dir.parent.name if out_dir.name == SINGLE_FILE_DIR else out_dir.name) + ".safetensors"

    def write(tmp: Path) -> None:
        save_single_file(pipe, tmp / name, metadata)
        if metadata:
            write_metadata(tmp, metadata)

    atomic_dir(out_dir, write)
    return out_dir / name


def export_outputs(
    pipe,
    output_dir: str | Path,
    exports: Sequence[str],
    lora_state: Mapping[str, dict] | None,
    metadata: Mapping[str, str],
    *,
    rank: int = 16,
    base_pipe=None,
) -> None:
    """Write the requested exports of a trained pipeline under `output_dir`.

    Args:
        pipe: the trained pipeline (dense, or with LoRA adapters).
        output_dir: run directory; exports go to `output_dir/pipeline`, `output_dir/lora` and
            `output_dir/single-file/<run name>.safetensors`.
        exports: any of `pipeline` (complete diffusers pipeline with the ablation applied), `lora`
            (folder for `pipe.load_lora_weights`, plus the kohya file for A1111/ComfyUI) and `single-file`
            (one .safetensors in the original LDM / A1111 layout).
        lora_state: the trained adapters (`lora_state_from_pipe`). When None and the pipeline carries no
            adapters (a dense run), the dense delta of every Linear weight is approximated by truncated
            SVD at `rank` -- lossy below full rank; the relative reconstruction error is logged.
        metadata: `make_metadata` output, also written as `ablation.json` in each export.
        rank: SVD rank for the dense -> LoRA conversion.
        base_pipe: the base model for that conversion; loaded from `metadata["base_model"]` when None.
    """
    unknown = set(exports) - set(EXPORT_KINDS)
    if unknown:
        raise ValueError(f"unknown export(s) {sorted(unknown)}; choose from {EXPORT_KINDS}")
    output_dir = Path(output_dir)
    if "pipeline" in exports:
        save_pipeline(pipe, output_dir / "pipeline", metadata)
        logger.info("wrote %s", output_dir / "pipeline")
    if "single-file" in exports:
        path = save_single_file_export(pipe, output_dir / SINGLE_FILE_DIR, metadata)
        logger.info("wrote %s", path)
    if "lora" in exports:
        state = lora_state or lora_state_from_pipe(pipe)
        if state is None:
            if base_pipe is None:
                from ablation.models import load_pipeline

                base_pipe = load_pipeline(metadata["base_model"])
            new = {f"{comp}.{k}": v for comp, m in components(pipe).items() if comp in TRAINABLE_COMPONENTS
                   for k, v in m.state_dict().items() if k.endswith(".weight") and v.ndim == 2}
            state, _ = svd_lora_state(base_pipe, new, rank)
        save_lora(pipe, output_dir / "lora", state, metadata)
        logger.info("wrote %s", output_dir / "lora")
