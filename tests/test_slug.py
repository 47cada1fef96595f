"""Run folder names: Unicode-aware, never empty, never too long for the filesystem."""

from pathlib import Path

import pytest

from ablation.config import build_config
from ablation.planning import SLUG_MAX_BYTES, plan_run, slug


@pytest.mark.parametrize("text, expected", [
    ("Grumpy Cat", "grumpy-cat"),
    ("Café 猫", "café-猫"),
    ("猫猫", "猫猫"),
    ("Salvador Dalí", "salvador-dalí"),
    ("Cafe\u0301", "café"),  # decomposed accent: NFC first, so both spellings share one folder
    ("  R2-D2!! ", "r2-d2"),
    ("../../etc", "etc"),  # no path separators or dot-names survive
    ("हिन्दी", "हिन्दी"),  # combining vowel signs are kept with their letters
])
def test_slug_keeps_every_script(text, expected):
    assert slug(text) == expected


def test_slug_is_never_empty():
    for text in ("!!!", "🐱", "   ", "---"):
        name = slug(text)
        assert name.startswith("concept-") and len(name) == len("concept-") + 8
    assert slug("!!!") != slug("???")  # different texts, different folders


def test_long_slugs_are_cut_with_a_hash():
    long_a = " ".join(["word"] * 300)
    long_b = " ".join(["word"] * 299 + ["other"])
    a, b = slug(long_a), slug(long_b)
    assert len(a.encode()) <= SLUG_MAX_BYTES and len(b.encode()) <= SLUG_MAX_BYTES
    assert a != b and a.startswith("word-word-")
    cjk = slug("猫" * 200)  # 3 bytes a character: cut at a character boundary
    assert len(cjk.encode()) <= SLUG_MAX_BYTES and cjk.startswith("猫" * 10)
    cjk.encode().decode()


@pytest.mark.parametrize("target, folder", [("猫猫", "猫猫"), ("Café 猫", "café-猫")])
def test_default_output_dir_is_a_subfolder(model_dir, tmp_path, monkeypatch, target, folder):
    monkeypatch.chdir(tmp_path)
    plan = plan_run(build_config(None, dict(model=model_dir, target=[target], anchor=["cat"])))
    assert plan.output_dir == Path("outputs") / folder


def test_a_300_word_target_gets_a_creatable_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = " ".join(f"word{i}" for i in range(300))
    plan = plan_run(build_config(None, dict(model=model_dir, target=[target], anchor=["cat"],
                                            concept_type="style")))
    assert plan.output_dir.parent == Path("outputs") and len(plan.output_dir.name.encode()) <= SLUG_MAX_BYTES
    plan.output_dir.mkdir(parents=True)  # was: OSError "File name too long"
