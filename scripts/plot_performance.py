"""Draw the plots of docs/performance.md from the benchmark's JSON lines (docs/bench/*.jsonl).

    python scripts/plot_performance.py        # writes docs/images/perf_*.png

Needs matplotlib (`pip install -e ".[plots]"`).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH, IMAGES = ROOT / "docs" / "bench", ROOT / "docs" / "images"


def _rows(name: str) -> list[dict]:
    path = BENCH / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def many_concepts(plt) -> None:
    series = [(name, label, [r for r in _rows(name) if "quality" in r])
              for name, label in (("many_concepts.jsonl", "60 steps for the run (the default for several)"),
                                  ("many_concepts_40.jsonl", "40 + 10 per extra concept (not kept)"))]
    series = [s for s in series if s[2]]
    if not series:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for (_, label, rows), style in zip(series, ("o--", "s-"), strict=False):
        n = [r["concepts"] for r in rows]
        a.plot(n, [r["end_to_end_s"] / rows[0]["end_to_end_s"] for r in rows], style, label=label)
        b.plot(n, [max(v["classifier"][1] for v in r["quality"]["targets"].values()) for r in rows], style,
               label=f"worst target, classifier ({label})")
        b.plot(n, [max(v["clip"][1] for v in r["quality"]["targets"].values()) for r in rows], style, alpha=0.5,
               label=f"worst target, toy CLIP ({label})")
        b.plot(n, [r["quality"]["changed_fraction"]["classifier"] for r in rows], style, alpha=0.3,
               label=f"other images changed ({label})")
    a.axhline(3, color="grey", lw=0.8, ls=":", label="issue bound: 3x one concept")
    a.set_xlabel("concepts in one run")
    a.set_ylabel("end-to-end time / one concept's")
    a.legend(fontsize=6)
    b.axhline(0.10, color="grey", lw=0.8, ls=":")
    b.set_xlabel("concepts in one run")
    b.set_ylim(-0.02, 1.0)
    b.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(IMAGES / "perf_many_concepts.png", dpi=110)


def quality_cost(plt) -> None:
    rows = _rows("quality_cost.jsonl")
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, r in enumerate(rows, 1):  # the numbers are the rows of the table in docs/performance.md
        phases = r.get("phase_seconds") or {}
        cost = phases.get("anchor data", 0) + phases.get("train", 0)
        for judge, marker in (("classifier", "o"), ("toy_clip", "x")):
            target = r[judge]["accuracy"]["grumpy cat"][1]
            changed = r[judge]["changed_fraction"]
            ax.scatter(cost, target, c="tab:red" if changed > 0.01 else "tab:blue", marker=marker, s=20)
        ax.annotate(str(i), (cost, r["classifier"]["accuracy"]["grumpy cat"][1]), fontsize=6, xytext=(2, 4),
                    textcoords="offset points")
    ax.set_xlabel("anchor data + training seconds (1 CPU thread)")
    ax.set_ylabel("grumpy cat accuracy after ablation")
    ax.set_title("o classifier, x toy CLIP; red: >1% of other images changed class", fontsize=8)
    ax.set_ylim(-0.05, 1.0)
    fig.tight_layout()
    fig.savefig(IMAGES / "perf_quality_cost.png", dpi=110)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    many_concepts(plt)
    quality_cost(plt)


if __name__ == "__main__":
    main()
