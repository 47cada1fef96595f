"""`ablate apply` and `ablate export`: turn a run's `delta.safetensors` into a pipeline, a LoRA or a single file.

    ablate apply --base CompVis/stable-diffusion-v1-4 --delta outputs/grumpy-cat --out models/sd14-no-grumpy-cat
    ablate export --run outputs/grumpy-cat --format lora --rank 16
    ablate export --run outputs/grumpy-cat --format single-file

Bad input (a missing or damaged delta, a delta trained on other base weights without --force, an
existing --out) is one line `error: ...`, exit status 2, before any model is loaded or anything written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from ablation import checkpoint
from ablation.config import ExportKind, Precision
from ablation.flags import add_arguments, from_namespace, option
from ablation.models import torch_dtype


class _UsageError(Exception):
    """Bad input: printed as `error: ...`, exit status 2."""


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise _UsageError(f"{out} exists and is not empty; pass --overwrite to replace it")


def _base_of(args_base: str | None, metadata: dict[str, str], source: Path) -> str:
    base = args_base or metadata.get("base_model")
    if not base:
        raise _UsageError(f"{source} does not name its base model; pass --base")
    return base


def _run(func, argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        func(argv)
    except (_UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------
# ablate apply
# --------------------------------------------------------------------------------------------------


_DTYPE = ("pipeline / single-file: load the base in this dtype (no fp32 copy of it first) and write the result in "
          "it, the delta's tensors cast to it (default: fp32). A LoRA by SVD always subtracts the fp32 base")
_OVERWRITE = "replace a non-empty --out"


@dataclass
class ApplyOptions:
    """`ablate apply` (its flags: `ablation.flags`)."""

    base: str | None = option("base model: `toy`, a diffusers directory, a single-file .safetensors checkpoint or a "
                              "hub id (default: the base_model recorded in the delta's metadata)", default=None)
    delta: str = option("a delta.safetensors file, a run's output directory (its delta.safetensors) or a LoRA "
                        "directory (merged into the weights)", required=True)
    out: str = option("directory to write the pipeline to", required=True)
    overwrite: bool = option(_OVERWRITE, default=False)
    force: bool = option("apply even when the delta records other base weights than --base's", default=False)
    dtype: Precision = option(_DTYPE, default="fp32")


def apply_parser() -> argparse.ArgumentParser:
    """Arguments of `ablate apply` (the fields of `ApplyOptions`)."""
    parser = argparse.ArgumentParser(
        prog="ablate apply",
        description="Apply an ablation delta to a base model and save the complete diffusers pipeline "
                    "(safetensors), loadable with DiffusionPipeline.from_pretrained(OUT).",
    )
    add_arguments(parser, ApplyOptions)
    return parser


def _apply(argv: list[str] | None) -> None:
    opts = from_namespace(ApplyOptions, apply_parser().parse_args(argv))
    out = Path(opts.out).expanduser()
    _check_out(out, opts.overwrite)
    kind, path = checkpoint.resolve_delta(opts.delta)
    if kind == "pipeline":
        raise _UsageError(f"{path} is already a complete pipeline; nothing to apply")
    metadata = checkpoint.read_metadata(path)
    base = _base_of(opts.base, metadata, path)
    pipe = checkpoint.load_ablated_pipeline(base, path, force=opts.force, torch_dtype=torch_dtype(opts.dtype))
    if kind == "lora":
        pipe.fuse_lora()  # merge adapters into the weights so the saved pipeline needs no peft
        pipe.unload_lora_weights()
    checkpoint.save_pipeline(pipe, out, {**metadata, "base_model": base})
    print(f"wrote {out}")


def apply_main(argv: list[str] | None = None) -> int:
    """Entry of `ablate apply`; returns the exit status (2 on bad input)."""
    return _run(_apply, argv)


# --------------------------------------------------------------------------------------------------
# ablate export
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportOptions:
    """`ablate export` (its flags: `ablation.flags`)."""

    run: str = option("the run's output directory (holds delta.safetensors)", required=True)
    format: ExportKind | None = option("what to write (optional with --push-to-hub)", default=None)
    base: str | None = option("base model (default: the base_model recorded in the delta's metadata)", default=None)
    rank: int | None = option("LoRA rank of the SVD (default: the run's lora_rank, else 16)", default=None)
    out: str | None = option("output directory (default: RUN/pipeline, RUN/lora or RUN/single-file)", default=None)
    overwrite: bool = option(_OVERWRITE, default=False)
    force: bool = option("export even when the delta records other base weights than --base's", default=False)
    push_to_hub: str | None = option("upload the run folder (delta, exports, model card; not checkpoints) to this "
                                     "Hub repo", default=None, metavar="REPO")
    hub_token: str | None = option("Hub token (default: the logged-in token, HF_TOKEN)", default=None)
    private: bool = option("create the Hub repo as private", default=False)
    dtype: Precision = option(_DTYPE, default="fp32")


def export_parser() -> argparse.ArgumentParser:
    """Arguments of `ablate export` (the fields of `ExportOptions`)."""
    parser = argparse.ArgumentParser(
        prog="ablate export",
        description="Export a finished run (its delta.safetensors) as a complete diffusers pipeline, as a "
                    "LoRA directory for pipe.load_lora_weights(DIR) that also holds a kohya-layout file for "
                    "AUTOMATIC1111/ComfyUI, or as one single-file .safetensors in the original (LDM / A1111) "
                    "layout. A LoRA export of a dense run approximates each changed Linear weight's delta by "
                    "truncated SVD: lossy below full rank (the relative "
                    "reconstruction error is logged); changed biases, norms, convolutions and embedding rows "
                    "are dropped.",
    )
    add_arguments(parser, ExportOptions)
    return parser


def _export(argv: list[str] | None) -> None:
    opts = from_namespace(ExportOptions, export_parser().parse_args(argv))
    run = Path(opts.run).expanduser()
    delta_file = run / checkpoint.DELTA_FILENAME if run.is_dir() else run
    if not delta_file.is_file():
        raise _UsageError(f"{delta_file} does not exist; --run takes a finished run's output directory")
    if opts.format is None:
        if not opts.push_to_hub:
            raise _UsageError("give --format pipeline|lora|single-file, --push-to-hub REPO, or both")
        _publish(opts, delta_file.parent)
        return
    out = Path(opts.out).expanduser() if opts.out else delta_file.parent / opts.format
    _check_out(out, opts.overwrite)
    if opts.rank is not None and opts.rank < 1:
        raise _UsageError(f"--rank must be >= 1, got {opts.rank}")
    tensors, metadata = checkpoint.load_delta(delta_file)
    base = _base_of(opts.base, metadata, delta_file)
    if opts.format in ("pipeline", "single-file"):
        pipe = checkpoint.load_ablated_pipeline(base, delta_file, force=opts.force,
                                                torch_dtype=torch_dtype(opts.dtype))
        if opts.format == "pipeline":
            checkpoint.save_pipeline(pipe, out, {**metadata, "base_model": base})
        else:
            from ablation.export import save_single_file_export

            out = save_single_file_export(pipe, out, {**metadata, "base_model": base})
    else:
        from ablation.models import load_pipeline

        rank = opts.rank or int(metadata.get("lora_rank", "0") or 0) or 16
        base_pipe = load_pipeline(base, torch_dtype=torch_dtype(opts.dtype))
        checkpoint.check_base(base_pipe, metadata, delta_file, keys=tensors, force=opts.force)
        state, error = checkpoint.svd_lora_state(base_pipe, tensors, rank)
        checkpoint.save_lora(base_pipe, out, state, {**metadata, "base_model": base, "lora_rank": str(rank),
                                                           "svd_relative_error": f"{error:.6g}"})
        print(f"LoRA rank {rank}: relative reconstruction error {error:.3g}")
    print(f"wrote {out}")
    _publish(opts, delta_file.parent)


def _publish(opts: ExportOptions, run: Path) -> None:
    """Refresh the run's model card (it lists the exports), then upload the run if asked."""
    from ablation.model_card import push_to_hub, write_model_card

    if (run / "config.yaml").is_file():
        write_model_card(run, repo_id=opts.push_to_hub)
    if opts.push_to_hub:
        url = push_to_hub(run, opts.push_to_hub, token=opts.hub_token, private=opts.private)
        print(f"uploaded {run} to {url}")


def export_main(argv: list[str] | None = None) -> int:
    """Entry of `ablate export`; returns the exit status (2 on bad input)."""
    return _run(_export, argv)
