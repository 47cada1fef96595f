"""`ablate attack`: run attacks on an ablated model and write `attack.json` / `attack.md` with grids.

    ablate attack --ablated outputs/grumpy-cat --attack all --out outputs/grumpy-cat/attack
    ablate attack --base toy --ablated outputs/grumpy-cat --attack inversion --budget 100 --seed 1 --out DIR

Flags are generated from `AttackSettings` (`ablation.flags`; `--attack` and `--budget` are parsed here); the
work is `ablation.attacks.runner.run_attacks`, the attacks are `ablation.attacks.registry.ATTACKS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ablation.attacks.registry import ATTACKS
from ablation.attacks.runner import AttackSettings, resolve_task, run_attacks
from ablation.config import ConfigError
from ablation.flags import add_arguments

logger = logging.getLogger("ablation.attacks")


def parse(argv: list[str]) -> AttackSettings:
    """Command line -> settings."""
    p = argparse.ArgumentParser(prog="ablate attack", description="Attack an ablated model: can the concept come "
                                "back? Writes attack.json / attack.md with grids; ASR beside the base model's and "
                                "the plain target prompts'.")
    p.add_argument("--attack", action="append", default=[],
                   help=f"attack (repeatable): {', '.join(ATTACKS)} or all (default: prompts)")
    p.add_argument("--budget", action="append", default=[],
                   help="N for every attack, or KIND=N for one (repeatable; default per attack: " +
                   ", ".join(f"{k} {v.budget} {v.unit}" for k, v in ATTACKS.items()) + ")")
    add_arguments(p, AttackSettings, skip=("attacks", "budget", "budgets"))
    args = p.parse_args(argv)
    attacks = args.attack
    if "all" in attacks:
        attacks = list(ATTACKS)
    budget, budgets = None, {}
    for spec in args.budget:
        kind, _, value = spec.rpartition("=")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"--budget {spec}: expected N or KIND=N with an integer N") from None
        if kind:
            budgets[kind] = number
        else:
            budget = number
    kwargs = {k: v for k, v in vars(args).items() if k not in ("attack", "budget")}
    return AttackSettings(attacks=tuple(dict.fromkeys(attacks)), budget=budget, budgets=budgets, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`ablate attack`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        settings = parse(argv)
        settings.check()
        resolve_task(settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = run_attacks(settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for a in report["attacks"]:
        logger.info("%-12s ASR ablated %s (plain %.2f), base %s", a["attack"], a["asr"]["ablated"],
                    report["plain"]["ablated"], a["asr"]["base"])
    logger.info("wrote %s", Path(settings.out) / "attack.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
