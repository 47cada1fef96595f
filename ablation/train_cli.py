"""`ablate train` / `accelerate launch ablate.py`: parse, plan, train, report.

Flags are generated from `ablation.config.TrainConfig` (field `lora_rank` -> `--lora-rank`), so the
dataclass is the single list of options. Only flags actually given override the YAML recipe.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import traceback

from ablation.config import ConfigError, TrainConfig, build_config, unknown_key_error
from ablation.flags import add_arguments
from ablation.quiet import quiet_libraries

EXAMPLES = """examples:
  accelerate launch ablate.py --target "Grumpy Cat" --anchor "Cat"
  ablate train --config recipes/<recipe>.yaml --max-steps 50
  ablate train --model CompVis/stable-diffusion-v1-4 --target "Van Gogh" --anchor painting --concept-type style
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per `TrainConfig` field (except the YAML-only `concepts`)."""
    parser = argparse.ArgumentParser(
        prog="ablate train", description="Ablate concepts from a text-to-image diffusion model (Kumari et al. 2023).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False)
    parser.add_argument("--config", help="YAML recipe; flags given here override its values")
    # an absent flag sets nothing, so YAML values survive (defaults < YAML < flags); --target/--anchor are paired
    add_arguments(parser, TrainConfig, skip=("concepts",), keep_absent=True, repeatable=("target", "anchor"))
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    """Command line (and its `--config` YAML) -> validated TrainConfig.

    Raises:
        ConfigError: unknown flag or YAML key, or an invalid value.
    """
    parser = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # a bad choice or number: same "error: ..." and exit 2 as other input
        raise ConfigError(str(e)) from None
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise unknown_key_error(flag.split("=")[0].lstrip("-"), "option", as_flag=True) if flag.startswith("-") \
            else ConfigError(f"unexpected argument {flag!r}")
    overrides = vars(namespace)
    yaml_path = overrides.pop("config", None)
    return build_config(yaml_path, overrides)


def _summary(result, model: str) -> str:
    lines = [f"ablation finished: {result.steps} steps, ablation loss on a fixed batch "
             f"{result.initial_loss:.4g} -> {result.final_loss:.4g}",
             f"  run directory: {result.output_dir}"]
    if result.delta_path:
        lines.append(f"  delta:         {result.delta_path}")
    lines += [f"  export:        {path}" for path in result.exports]
    lines.append(f"  config:        {result.output_dir / 'config.yaml'}")
    if result.delta_path:
        lines.append(f"load it:  ablation.load_ablated_pipeline({model!r}, {str(result.output_dir)!r})")
        lines.append(f"evaluate: ablate eval --ablated {result.output_dir}")
    return "\n".join(lines)


def _error(e: BaseException) -> str:
    """`error: ...` on one line (library messages may span several).

    The failed run's frames are cleared first: their progress bars close (printing their last state before
    the error, not after it) and the run's lock is dropped.
    """
    traceback.clear_frames(e.__traceback__)
    return "error: " + " ".join(str(e).split())


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "StorageFull", "file write failed")


def _is_out_of_space(e: BaseException | None) -> bool:
    """A full disk, as OSError or as the writers wrap it (torch.save: RuntimeError, safetensors: its own error)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _NO_SPACE):
            return True
        e = e.__cause__ or e.__context__
    return False


def _out_of_space(e: BaseException, output_dir) -> str:
    from ablation.resume import list_checkpoints

    kept = list_checkpoints(output_dir) if output_dir is not None else []
    filename = getattr(e, "filename", None)
    where = f" writing {filename}" if filename else ""
    return (f"error: no space left on the device{where}; free some space and continue with "
            f"--resume-from-checkpoint latest (last good checkpoint: {kept[-1] if kept else 'none'})")


def _remove_if_unused(output_dir, existed: bool) -> None:
    """A run that failed on bad input leaves no folder it created (only its own lock file may be in it)."""
    from ablation.runlock import LOCK_NAME, release

    release(output_dir)
    if existed or not output_dir.is_dir():
        return
    if all(p.name == LOCK_NAME for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)


def process_start() -> float:
    """`time.time()` at which this process started (interpreter start-up and imports count as start-up)."""
    import psutil  # an accelerate dependency

    return psutil.Process().create_time()


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    """Entry point; returns the exit status (2 = bad input, 1 = training failed or the disk is full).

    `started_at` (`time.time()`): where the `start-up` phase of `timings.json` starts; the programs pass their
    process start (`process_start()`), in-process callers leave it out and time from `train()`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_config(argv)
    except ConfigError as e:
        print(_error(e), file=sys.stderr)
        return 2
    quiet_libraries(verbose=bool(os.environ.get("ABLATION_VERBOSE")))
    try:
        from ablation.trainer import TrainingError, plan_run, train

        plan = plan_run(config)
        if config.plan or config.max_memory is not None:
            import torch

            from ablation.planning import check_memory, memory_plan

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            if config.plan:
                mem = memory_plan(plan, device_type)
                print(mem.table() if mem is not None else f"no memory plan: {plan.model_path} is not a diffusers "
                      f"folder (the plan builds the model from its config files)")
                return 0
            check_memory(plan, device_type)
    except ConfigError as e:
        print(_error(e), file=sys.stderr)
        return 2
    existed = plan.output_dir.exists()
    try:
        result = train(config, plan, started_at=started_at)
    except ConfigError as e:
        from ablation.runlock import RunLockedError

        if not isinstance(e, RunLockedError):  # the holder's folder is not ours to clean
            _remove_if_unused(plan.output_dir, existed)
        print(_error(e), file=sys.stderr)
        return 2
    except TrainingError as e:
        print(_error(e), file=sys.stderr)
        return 1
    except Exception as e:
        if not _is_out_of_space(e):
            raise
        traceback.clear_frames(e.__traceback__)
        print(_out_of_space(e, plan.output_dir), file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        if result.stopped_early:
            print(f"stopped after {result.steps} steps (--stop-after-steps); checkpoints in "
                  f"{result.output_dir / 'checkpoints'}")
        else:
            print(_summary(result, config.model))
    return 0
