"""Behaviour on the toy world (slow): the README's ablations remove the target and keep its neighbours.

Run with `python -m pytest -m slow tests/test_toyworld_behaviour.py` (about 5 minutes on 2 CPU cores).
Each case trains with the recipe defaults (anchor generation included), then evaluates the base and
the ablated model with the toy CLIP on the target's family and on an unrelated family.
"""

import json

import pytest

from ablation.cli import main

CASES = [
    # target, anchor, its family, an unrelated family
    ("grumpy cat", "cat", "grumpy_cat", "snoopy"),
    ("van gogh", "painting", "van_gogh", "r2d2"),
]


def _comparison(report_dir, task):
    report = json.loads((report_dir / "report.json").read_text())
    rows = next(iter(report["comparison"].values()))
    return {r["concept"]: r for r in rows if r["task"] == task and r["metric"] == "clip_accuracy"}


@pytest.mark.slow
@pytest.mark.parametrize(("target", "anchor", "family", "other"), CASES, ids=[c[2] for c in CASES])
def test_ablation_removes_target_and_keeps_neighbours(tmp_path, monkeypatch, target, anchor, family, other):
    monkeypatch.setenv("ABLATION_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--target", target, "--anchor", anchor, "--output-dir", str(run)]) == 0
    for task in (family, other):
        out = tmp_path / f"eval_{task}"
        assert main(["eval", "--ablated", str(run), "--family", task, "--num-samples", "4", "--steps", "25",
                     "--out", str(out)]) == 0
        rows = _comparison(out, task)
        for concept, row in rows.items():
            if concept == target:
                assert row["base"] >= 0.9 and row["ablated"] <= 0.10, row
            elif task == family:  # the anchor and the surrounding concepts (issue 4: within 0.05)
                assert abs(row["change"]) <= 0.05, row
            else:  # another family: 32 images a concept, one image is 0.031; measured up to 0.09 (dalmatian)
                assert abs(row["change"]) <= 0.10, row
