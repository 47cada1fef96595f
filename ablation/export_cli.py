"""`ablate apply` and `ablate export`: turn a run's `delta.safetensors` into a pipeline or a LoRA directory.

    ablate apply --base CompVis/stable-diffusion-v1-4 --delta outputs/grumpy_cat --out models/sd14-no-grumpy-cat
    ablate export --run outputs/grumpy_cat --format lora --rank 16
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ablation import checkpoint


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


def apply_parser() -> argparse.ArgumentParser:
    """Arguments of `ablate apply`."""
    parser = argparse.ArgumentParser(
        prog="ablate apply",
        description="Apply an ablation delta to a base model and save the complete diffusers pipeline "
                    "(safetensors), loadable with DiffusionPipeline.from_pretrained(OUT).",
    )
    parser.add_argument("--base", default=None,
                        help="base model: `toy`, a diffusers directory or a hub id (default: the base_model "
                             "recorded in the delta's metadata)")
    parser.add_argument("--delta", required=True,
                        help="a delta.safetensors file, a run's output directory (its delta.safetensors) or a "
                             "LoRA directory (merged into the weights)")
    parser.add_argument("--out", required=True, help="directory to write the pipeline to")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def _apply(argv: list[str] | None) -> None:
    args = apply_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite)
    kind, path = checkpoint.resolve_delta(args.delta)
    if kind == "pipeline":
        raise _UsageError(f"{path} is already a complete pipeline; nothing to apply")
    metadata = checkpoint.read_metadata(path)
    base = _base_of(args.base, metadata, path)
    pipe = checkpoint.load_ablated_pipeline(base, path)
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


def export_parser() -> argparse.ArgumentParser:
    """Arguments of `ablate export`."""
    parser = argparse.ArgumentParser(
        prog="ablate export",
        description="Export a finished run (its delta.safetensors) as a complete diffusers pipeline or as a "
                    "LoRA directory for pipe.load_lora_weights(DIR). A LoRA export of a dense run approximates "
                    "each changed Linear weight's delta by truncated SVD: lossy below full rank (the relative "
                    "reconstruction error is logged); changed biases, norms, convolutions and embedding rows "
                    "are dropped.",
    )
    parser.add_argument("--run", required=True, help="the run's output directory (holds delta.safetensors)")
    parser.add_argument("--format", required=True, choices=checkpoint.EXPORT_KINDS, help="what to write")
    parser.add_argument("--base", default=None,
                        help="base model (default: the base_model recorded in the delta's metadata)")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank of the SVD (default: the run's lora_rank, else 16)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/pipeline or RUN/lora)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def _export(argv: list[str] | None) -> None:
    args = export_parser().parse_args(argv)
    run = Path(args.run).expanduser()
    delta_file = run / checkpoint.DELTA_FILENAME if run.is_dir() else run
    if not delta_file.is_file():
        raise _UsageError(f"{delta_file} does not exist; --run takes a finished run's output directory")
    out = Path(args.out).expanduser() if args.out else delta_file.parent / args.format
    _check_out(out, args.overwrite)
    if args.rank is not None and args.rank < 1:
        raise _UsageError(f"--rank must be >= 1, got {args.rank}")
    tensors, metadata = checkpoint.load_delta(delta_file)
    base = _base_of(args.base, metadata, delta_file)
    if args.format == "pipeline":
        pipe = checkpoint.load_ablated_pipeline(base, delta_file)
        checkpoint.save_pipeline(pipe, out, {**metadata, "base_model": base})
    else:
        from ablation.models import load_pipeline

        rank = args.rank or int(metadata.get("lora_rank", "0") or 0) or 16
        base_pipe = load_pipeline(base)
        checkpoint.check_base(base_pipe, metadata, delta_file)
        state, error = checkpoint.svd_lora_state(base_pipe, tensors, rank)
        checkpoint.save_lora(type(base_pipe), out, state, {**metadata, "base_model": base, "lora_rank": str(rank),
                                                           "svd_relative_error": f"{error:.6g}"})
        print(f"LoRA rank {rank}: relative reconstruction error {error:.3g}")
    print(f"wrote {out}")


def export_main(argv: list[str] | None = None) -> int:
    """Entry of `ablate export`; returns the exit status (2 on bad input)."""
    return _run(_export, argv)
