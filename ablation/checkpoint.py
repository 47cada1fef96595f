"""Deltas, exports and loading an ablated pipeline: one import for the weights-I/O API.

This module only re-exports; each concern lives in its own module:

- `ablation.delta`: the `delta.safetensors` format (trained tensors + metadata), save/load/validate,
  the base-weights fingerprint, `apply_delta`.
- `ablation.merge`: peft LoRA adapters merged into dense weights (in float32).
- `ablation.lora_convert`: LoRA states from adapters or by SVD of a dense delta; the kohya layout.
- `ablation.export`: pipeline / LoRA / single-file exports, written atomically.
- `ablation.single_file`: single-file (LDM / A1111) checkpoints, read and written.
- `ablation.loading`: `resolve_delta`, `check_base`, `load_ablated_pipeline`.
"""

from __future__ import annotations

from ablation.delta import (
    DELTA_FILENAME,
    FINGERPRINT_KEY,
    FORMAT,
    INDEX_SUFFIX,
    METADATA_FILENAME,
    ROWS_SUFFIX,
    TRAINABLE_COMPONENTS,
    BaseMismatchError,
    DeltaFileError,
    DeltaNotFoundError,
    apply_delta,
    base_weights_fingerprint,
    check_fingerprint,
    check_safetensors_file,
    config_hash,
    fingerprints_match,
    load_delta,
    make_metadata,
    pipeline_config_hash,
    read_metadata,
    save_delta,
    trained_tensors,
)
from ablation.export import EXPORT_KINDS, export_outputs, kohya_file_name, save_lora, save_pipeline
from ablation.loading import check_base, load_ablated_pipeline, resolve_delta
from ablation.lora_convert import (
    KOHYA_SUFFIX,
    LORA_WEIGHT_NAME,
    kohya_state_dict,
    lora_scale,
    lora_state_from_pipe,
    svd_lora_state,
)
from ablation.merge import dense_copy, dense_pipeline, dense_state_dict
from ablation.single_file import SingleFileError, load_single_file, save_single_file

__all__ = [
    "DELTA_FILENAME", "EXPORT_KINDS", "FINGERPRINT_KEY", "FORMAT", "INDEX_SUFFIX", "KOHYA_SUFFIX", "LORA_WEIGHT_NAME",
    "METADATA_FILENAME", "ROWS_SUFFIX", "TRAINABLE_COMPONENTS", "BaseMismatchError", "DeltaFileError",
    "DeltaNotFoundError", "SingleFileError", "apply_delta", "base_weights_fingerprint", "check_base",
    "check_fingerprint", "check_safetensors_file", "config_hash", "dense_copy", "dense_pipeline", "dense_state_dict",
    "export_outputs", "fingerprints_match", "kohya_file_name", "kohya_state_dict", "load_ablated_pipeline",
    "load_delta", "load_single_file", "lora_scale", "lora_state_from_pipe", "make_metadata", "pipeline_config_hash",
    "read_metadata", "resolve_delta", "save_delta", "save_lora", "save_pipeline", "save_single_file",
    "svd_lora_state", "trained_tensors",
]
