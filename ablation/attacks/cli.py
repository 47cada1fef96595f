"""`ablate attack`: run attacks on an ablated model and write `attack.json` / `attack.md` with grids.

    ablate attack --ablated outputs/grumpy-cat --attack all --out outputs/grumpy-cat/attack
    ablate attack --base toy --ablated outputs/grumpy-cat --attack inversion --budget 100 --seed 1 --out DIR

Flags -> `AttackSettings`; the work is `ablation.attacks.runner.run_attacks`, the attacks are
`ablation.attacks.registry.ATTACKS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ablation.attacks.registry import ATTACKS
from ablation.attacks.runner import AttackSettings, resolve_task, run_attacks
from ablation.config import GUIDANCE, ConfigError

logger = logging.getLogger("ablation.attacks")


def parse(argv: list[str]) -> AttackSettings:
    """Command line -> settings."""
    p = argparse.ArgumentParser(prog="ablate attack", description="Attack an ablated model: can the concept come "
                                "back? Writes attack.json / attack.md with grids; ASR beside the base model's and "
                                "the plain target prompts'.")
    p.add_argument("--base", default="toy", help="base model (default: toy)")
    p.add_argument("--ablated", required=True, help="run dir, delta file, LoRA dir or pipeline dir")
    p.add_argument("--attack", action="append", default=[],
                   help=f"attack (repeatable): {', '.join(ATTACKS)} or all (default: prompts)")
    p.add_argument("--budget", action="append", default=[],
                   help="N for every attack, or KIND=N for one (repeatable; default per attack: " +
                   ", ".join(f"{k} {v.budget} {v.unit}" for k, v in ATTACKS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of every image and of the attacks' randomness")
    p.add_argument("--out", required=True, help="report folder (replaced atomically)")
    p.add_argument("--family", default=None, help="task (toy family or paper prompt set; default: the run's concept)")
    p.add_argument("--target", default=None, help="target concept (default: the run's)")
    p.add_argument("--anchor", default=None, help="anchor of --target when it has no prompt set")
    p.add_argument("--prompts", dest="prompts_file", default=None,
                   help="your own attack prompts for `prompts` (.txt one a line, or a .json/.yaml list)")
    p.add_argument("--clip", default=None, help="CLIP judge (default: toy CLIP for toy, else ViT-L/14)")
    p.add_argument("--num-prompts", type=int, default=4, help="target prompts attacked (default 4)")
    p.add_argument("--num-samples", type=int, default=2, help="images per prompt and model (default 2)")
    p.add_argument("--num-references", type=int, default=8, help="base-model images of the target (default 8)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of every image (default 25)")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance (default 6)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--replay", default=None, metavar="DIR",
                   help="render the prompts and embeddings an earlier `ablate attack` run saved in DIR on --ablated "
                   "(no search; its seed, budgets, images per prompt, sampling and task are used; relearn is re-run "
                   "with its budget); --attack picks some of its attacks (default: all of them)")
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
