"""Attack name -> what runs it, its default budget and the budget's unit.

The one table of `ablate attack`, `ablate eval --attacks` and the robustness tables. Each attack module is imported
when it runs, not when the table is read, so `ablate --help` and flag checking stay fast (the attack modules import
torch and diffusers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ablation.attacks.common import AttackContext


@dataclass(frozen=True)
class Attack:
    """One attack: `module.run(ctx, budget)` returns its report entry (ASR on both models, cost, prompts, details);
    the runner saves the prompts and vectors it rendered for `--replay`."""

    module: str
    budget: int
    unit: str

    def run(self, ctx: AttackContext, budget: int) -> dict:
        """Run the attack with `budget` (in `unit`) on the context's models."""
        return importlib.import_module(self.module).run(ctx, budget)


ATTACKS: dict[str, Attack] = {
    "prompts": Attack("ablation.attacks.prompts", 24, "prompts"),
    "text-search": Attack("ablation.attacks.text_search", 512, "text-encoder evaluations"),
    "prefix": Attack("ablation.attacks.prefix", 40, "iterations per prompt"),
    "inversion": Attack("ablation.attacks.inversion", 150, "steps"),
    "relearn": Attack("ablation.attacks.relearn", 100, "steps"),
}
