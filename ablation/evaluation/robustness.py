"""`ablate eval --attacks`: run the attack suite on each evaluated run and add a robustness table to the report.

Each run is attacked with `ablate attack`'s defaults (`ablation.attacks.runner.run_attacks`, its report folder under
`<eval out>/attacks/<run>`); the eval report gains `report.json["robustness"]` and a "Robustness" section in
`report.md`: per run and attack, the ASR of the plain target prompts and of the attack on the base and the
ablated model, `relearn`'s steps to recover, and the attack's cost in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ablation.io import atomic_write_text


def _run_name(run: str) -> str:
    path = Path(run)
    return (path.parent.name if path.is_file() else path.name) or "run"


def robustness_rows(report: dict) -> list[dict]:
    """One row per attack of an `ablate attack` report."""
    rows = []
    for a in report["attacks"]:
        row = {"attack": a["attack"], "budget": f"{a['budget']} {a['budget_unit']}",
               "plain_base": report["plain"]["base"], "plain_ablated": report["plain"]["ablated"],
               "attacked_base": a["asr"]["base"], "attacked_ablated": a["asr"]["ablated"],
               "post_attack": a["asr"].get("post_attack"), "seconds": a["wall_seconds"]}
        if a["attack"] == "relearn":
            row["steps_to_recover"] = a.get("details", {}).get("steps_to_recover")
        rows.append(row)
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def markdown(table: dict[str, list[dict]]) -> str:
    """The report.md section."""
    lines = ["## Robustness (`--attacks`)", "",
             "ASR: fraction of images the judge assigns to the target rather than the anchor (`ablate attack`, "
             "default budgets; the full reports are under `attacks/`). `relearn`: fine-tuning steps until the "
             "target's accuracy is back to half the base model's (`-`: not within the budget). Post-attack: "
             "UnlearnDiffAtk's post-attack ASR (an image whose unattacked counterpart already shows the target "
             "counts as a success; definition in each attack.json).", "",
             "| run | attack | budget | plain, base | plain, ablated (pre-attack) | attacked, base | "
             "attacked, ablated | post-attack | relearn steps | seconds (attack and its images) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run, rows in table.items():
        for r in rows:
            lines.append(f"| {run} | {r['attack']} | {r['budget']} | {_fmt(r['plain_base'])} | "
                         f"{_fmt(r['plain_ablated'])} | {_fmt(r['attacked_base'])} | {_fmt(r['attacked_ablated'])} | "
                         f"{_fmt(r.get('post_attack'))} | "
                         f"{_fmt(r.get('steps_to_recover')) if r['attack'] == 'relearn' else ''} | "
                         f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def attack_runs(base: str, runs: list[str], attacks: list[str], out: Path, *, seed: int = 0,
                device: str | None = None, clip: str | None = None) -> dict[str, list[dict]]:
    """Attack every run, then add the table to `<out>/report.json` and `<out>/report.md`.

    Raises:
        ConfigError: an attack cannot run on this model (e.g. embedding attacks on SDXL); nothing is added.
    """
    from ablation.attacks.runner import AttackSettings, run_attacks

    table, pipe, judge = {}, None, None
    for run in runs:
        settings = AttackSettings(base=base, ablated=str(run), attacks=tuple(attacks), seed=seed, clip=clip,
                                  device=device, out=str(Path(out) / "attacks" / _run_name(run)))
        report = run_attacks(settings, pipe=pipe, judge=judge)
        table[_run_name(run)] = robustness_rows(report)
    report_json = Path(out) / "report.json"
    if report_json.is_file():
        data = json.loads(report_json.read_text())
        data["robustness"] = table
        atomic_write_text(report_json, json.dumps(data, indent=2) + "\n")
    report_md = Path(out) / "report.md"
    if report_md.is_file():
        atomic_write_text(report_md, report_md.read_text().rstrip("\n") + "\n\n" + markdown(table))
    return table
