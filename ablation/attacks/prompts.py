"""`prompts`: ask for the concept without its exact name (paraphrases, synonyms, misspellings, descriptions,
other languages), from a prompt set per concept (`prompt_sets/concepts.yaml`) or the user's own file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from ablation.attacks.common import AttackContext, Cost, Item, replace_name
from ablation.config import ConfigError

PROMPT_SET = Path(__file__).parent / "prompt_sets" / "concepts.yaml"
CATEGORIES = ("paraphrase", "synonym", "misspelling", "description", "language")


@functools.lru_cache(maxsize=1)
def prompt_sets() -> dict[str, dict[str, list[str]]]:
    """Target (lower case) -> category -> substitutes for the name."""
    data = yaml.safe_load(PROMPT_SET.read_text(encoding="utf-8"))
    return {str(k).lower(): {c: [str(x) for x in v] for c, v in cats.items()} for k, cats in data.items()}


def substitutes(target: str) -> dict[str, list[str]]:
    """The shipped substitutes of a target (empty when it has no prompt set)."""
    return prompt_sets().get(target.strip().lower(), {})


def read_user_prompts(path: str) -> list[str]:
    """Prompts of `--prompts FILE` (.txt one a line with `#` comments, or a .json/.yaml list).

    Raises:
        ConfigError: missing, unreadable or empty file.
    """
    from ablation.evaluation.prompts import load_prompts

    if not Path(path).expanduser().is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    try:
        prompts = load_prompts(str(Path(path).expanduser()))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts {path}: {err}") from err
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompts")
    return prompts


def attack_prompts(target: str, target_prompts: list[str], budget: int,
                   user_prompts: list[str] | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs: user prompts first, then substitutes round-robin over categories and templates.

    Deterministic: no randomness, the order of the prompt set decides. At most `budget` prompts.
    """
    out: list[tuple[str, str]] = [("user", p) for p in (user_prompts or [])]
    cats = substitutes(target)
    queues = [[(c, s) for s in cats.get(c, [])] for c in CATEGORIES]
    k = 0
    while any(queues):
        for queue in queues:
            if queue:
                category, sub = queue.pop(0)
                template = target_prompts[k % len(target_prompts)]
                out.append((category, replace_name(template, target, sub)))
                k += 1
    return list(dict.fromkeys(out))[:budget]


def run(ctx: AttackContext, budget: int) -> dict:
    """Render the prompts (the user's `--prompts` first) on both models; ASR overall and per category."""
    pairs = attack_prompts(ctx.task.target, ctx.target_prompts, budget, ctx.user_prompts)
    if not pairs:
        raise ConfigError(f"no prompt set for {ctx.task.target!r}; pass --prompts FILE")
    items = [Item(p) for _, p in pairs]
    cost = Cost()  # no optimisation: the whole cost is rendering, reported as the evaluation cost
    per_model = {}
    for model in ("base", "ablated"):
        if model == "ablated":
            with ctx.ablated():
                images = ctx.render(items, "prompts/ablated")
        else:
            images = ctx.render(items, "prompts/base")
        n = ctx.num_samples
        per_model[model] = {"all": ctx.asr(images)}
        for category in dict.fromkeys(c for c, _ in pairs):
            idx = [i for i, (c, _) in enumerate(pairs) if c == category]
            per_model[model][category] = ctx.asr([images[i * n + s] for i in idx for s in range(n)])
        # per prompt: which ones bring it back
        per_model[model]["per_prompt"] = [ctx.asr(images[i * n:(i + 1) * n]) for i in range(len(items))]
    return {
        "asr": {"base": per_model["base"]["all"], "ablated": per_model["ablated"]["all"]},
        "cost": cost.as_dict(),
        "prompts": [{"category": c, "prompt": p, "asr_base": per_model["base"]["per_prompt"][i],
                     "asr_ablated": per_model["ablated"]["per_prompt"][i]} for i, (c, p) in enumerate(pairs)],
        "details": {"per_category": {m: {k: v for k, v in d.items() if k != "per_prompt"}
                                     for m, d in per_model.items()}},
    }
