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
    rows = [r for r in _rows("many_concepts.jsonl") if "quality" in r]
    if not rows:
        return
    n = [r["concepts"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(n, [r["end_to_end_s"] for r in rows], "o-", label="end to end")
    a.plot(n, [r["phase_seconds"]["anchor data"] for r in rows], "s--", label="anchor data")
    a.plot(n, [r["phase_seconds"]["train"] for r in rows], "^--", label="training")
    a.axhline(3 * rows[0]["end_to_end_s"], color="grey", lw=0.8, ls=":", label="3x one concept")
    a.set_xlabel("concepts in one run")
    a.set_ylabel("seconds")
    a.legend(fontsize=7)
    for judge, style in (("classifier", "o-"), ("clip", "s--")):
        b.plot(n, [max(v[judge][1] for v in r["quality"]["targets"].values()) for r in rows], style,
               label=f"worst target accuracy ({judge})")
        b.plot(n, [r["quality"]["changed_fraction"][judge] for r in rows], style, alpha=0.5,
               label=f"other images changed ({judge})")
    b.axhline(0.10, color="grey", lw=0.8, ls=":")
    b.set_xlabel("concepts in one run")
    b.set_ylim(-0.02, 1.0)
    b.legend(fontsize=7)
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
