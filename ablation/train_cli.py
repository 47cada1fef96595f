"""`ablate train` / `accelerate launch ablate.py`: parse, plan, train, report.

Flags are generated from `ablation.config.TrainConfig` (field `lora_rank` -> `--lora-rank`), so the
dataclass is the single list of options. Only flags actually given override the YAML recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Literal

from ablation.config import ConfigError, TrainConfig, build_config, unknown_key_error

EXAMPLES = """examples:
  accelerate launch ablate.py --target "Grumpy Cat" --anchor "Cat"
  ablate train --config recipes/<recipe>.yaml --max-steps 50
  ablate train --model CompVis/stable-diffusion-v1-4 --target "Van Gogh" --anchor painting --concept-type style
"""


def _argument(parser: argparse.ArgumentParser, f: dataclasses.Field, hint) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    # SUPPRESS: an absent flag leaves no attribute, so YAML values survive (defaults < YAML < flags).
    common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif origin is Literal:
        parser.add_argument(flag, choices=args, **common)
    elif origin is list:
        item = typing.get_args(hint)[0]
        if f.name in ("target", "anchor"):  # repeatable, paired in order
            parser.add_argument(flag, action="append", **common)
        elif typing.get_origin(item) is Literal:
            parser.add_argument(flag, nargs="+", choices=typing.get_args(item), **common)
        else:
            parser.add_argument(flag, nargs="+", **common)
    else:
        parser.add_argument(flag, type=hint if hint in (int, float) else str, **common)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per `TrainConfig` field (except the YAML-only `concepts`)."""
    parser = argparse.ArgumentParser(
        prog="ablate train", description="Ablate concepts from a text-to-image diffusion model (Kumari et al. 2023).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False)
    parser.add_argument("--config", help="YAML recipe; flags given here override its values")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "concepts":
            _argument(parser, f, hints[f.name])
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
        raise unknown_key_error(flag.split("=")[0].lstrip("-"), "option") if flag.startswith("-") else \
            ConfigError(f"unexpected argument {flag!r}")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 = bad input, 1 = training failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_config(argv)
        from ablation.trainer import TrainingError, plan_run, train

        plan = plan_run(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        if result.stopped_early:
            print(f"stopped after {result.steps} steps (--stop-after-steps); checkpoints in "
                  f"{result.output_dir / 'checkpoints'}")
        else:
            print(_summary(result, config.model))
    return 0
