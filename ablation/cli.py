"""The `ablate` command: one entry, one subcommand per program.

Each subcommand lives in its own module and exposes `main(argv) -> int`; they are imported only
when chosen so that `ablate --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module:function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ablation.train_cli:main", "ablate concepts from a model (same as `accelerate launch ablate.py`)"),
    "generate": ("ablation.evaluation.cli:generate_main", "text-to-image samples for a prompt set, with a manifest"),
    "inpaint": ("ablation.evaluation.cli:inpaint_main", "inpaint a masked region with a prompt"),
    "upscale": ("ablation.evaluation.cli:upscale_main", "x4 upscale low-resolution images with a prompt"),
    "eval": ("ablation.evaluation.cli:eval_main", "evaluate ablated runs against the base model: report + grids"),
    "apply": ("ablation.export_cli:apply_main", "apply a delta.safetensors to a base model, writing a pipeline"),
    "export": ("ablation.export_cli:export_main", "export a finished run as a diffusers pipeline or LoRA"),
    "demo": ("ablation.demo:main", "web page: base and ablated models side by side for any prompt"),
    "attack": ("ablation.attacks.cli:main", "attack an ablated model: can the concept come back? (ASR report)"),
}


def _usage() -> str:
    lines = ["usage: ablate <command> [options]   (ablate <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Default model: the embedded toy-world model (`--model toy`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `ablate <command> ...` to the command's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ablation import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"ablate: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import os

    from ablation.quiet import quiet_libraries

    # Every program: library output a user cannot act on stays hidden (ABLATION_VERBOSE=1 shows it).
    quiet_libraries(verbose=bool(os.environ.get("ABLATION_VERBOSE")))
    module_name, func_name = SUBCOMMANDS[command][0].split(":")
    module = importlib.import_module(module_name)
    if command == "train":  # its timings.json counts start-up from the process start
        return int(module.main(rest, started_at=module.process_start()) or 0)
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
