"""Fast tests of the toy-world catalogue and renderer (no torch needed)."""

from __future__ import annotations

import importlib
import random
import re

import numpy as np
import pytest

from ablation.toyworld.catalog import (
    HELDOUT_SEED_OFFSET,
    Family,
    catalog,
    heldout_templates,
    sample_caption,
    train_templates,
)
from ablation.toyworld.render import (
    all_concepts,
    parse_caption,
    render,
    render_caption,
    sample_training_example,
)

# the package re-exports the function ``catalog``, which shadows the module attribute of the same name
cat_mod = importlib.import_module("ablation.toyworld.catalog")

KINDS = ("instance", "style", "painting", "memorization")


def test_catalogue_families_and_concepts():
    cat = catalog()
    assert cat is catalog()  # cached
    names = {f.target for f in cat.families.values()}
    assert {"grumpy cat", "snoopy", "nemo", "r2d2", "van gogh", "monet", "salvador dali", "greg rutkowski"} <= names
    assert sum(f.concept_type == "memorization" for f in cat.families.values()) >= 2
    for fam in cat.families.values():
        assert isinstance(fam, Family)
        assert len(set(fam.classes)) == len(fam.classes)
        for c in fam.classes:
            assert c in cat.concepts, c
            assert c == c.lower()
        assert fam.train_prompts and fam.heldout_prompts
        assert not set(fam.train_prompts) & set(fam.heldout_prompts)
        assert cat.family_of_target(fam.target.upper()) is fam
    fam = cat.family_of_target("grumpy cat")
    assert fam.classes == ("grumpy cat", "cat", "tabby cat", "black cat", "siamese cat")
    vg = cat.family_of_target("Van Gogh")
    assert vg.anchor == "painting" and len(vg.surrounding) == 5 and "jeremy mann" in vg.surrounding
    with pytest.raises(KeyError, match="known targets"):
        cat.family_of_target("mickey mouse")
    assert cat.concepts["grumpy cat"].judge_text == "a photo of a grumpy cat"
    assert cat.concepts["van gogh"].judge_text == "a painting in the style of van gogh"
    assert cat.concepts["painting"].judge_text == "a painting"


def test_target_prompt_derivation():
    cat = catalog()
    gc = cat.family_of_target("grumpy cat")
    assert gc.target_prompt("a photo of a cat on a beach") == "a photo of a grumpy cat on a beach"
    assert gc.target_prompt("a cat") == "a grumpy cat"
    assert gc.target_prompt("a catalog with a cat") == "a catalog with a grumpy cat"
    assert cat.family_of_target("r2d2").target_prompt("a robot at night") == "a r2d2 at night"
    vg = cat.family_of_target("van gogh")
    assert vg.target_prompt("a painting of a village") == "a painting of a village, in the style of van gogh"
    mem = next(f for f in cat.families.values() if f.concept_type == "memorization")
    assert mem.target_prompt(mem.train_prompts[0]) == mem.target
    # training captions contain the exact derived forms
    for fam in cat.families.values():
        if fam.concept_type == "instance":
            assert set(map(fam.target_prompt, fam.train_prompts)) == set(fam.prompts_for(fam.target, "train"))
    styled = {t.format(subject="{subject}", style="{style}") for t in train_templates("style")}
    for t in train_templates("painting"):
        assert t + ", in the style of {style}" in styled


def test_prompts_for():
    gc = catalog().family_of_target("grumpy cat")
    tabby = gc.prompts_for("tabby cat", "heldout")
    assert len(tabby) == len(gc.heldout_prompts) and all("tabby cat" in p for p in tabby)
    assert gc.prompts_for("cat", "train") == gc.train_prompts
    vg = catalog().family_of_target("van gogh")
    assert all(p.endswith(", in the style of monet") for p in vg.prompts_for("monet", "train"))
    with pytest.raises(KeyError):
        gc.prompts_for("dog", "train")


def test_templates_counts_and_disjoint():
    assert len(train_templates("instance")) >= 30
    assert len(train_templates("style")) >= 30
    assert len(train_templates("painting")) >= 30
    for k in KINDS:
        tr, ho = train_templates(k), heldout_templates(k)
        assert len(ho) >= 6
        assert not set(tr) & set(ho), k
        for t in tr + ho:
            assert t == t.lower()
            assert len(t.replace("{}", "golden retriever").split()) < 20
    for t in train_templates("instance") + heldout_templates("instance"):
        assert t.count("{}") == 1
    for t in train_templates("style") + heldout_templates("style"):
        assert "{style}" in t


def test_sample_caption_context_matches_words():
    r = random.Random(0)
    for concept in all_concepts():
        for split in ("train", "heldout"):
            cap, ctx = sample_caption(concept, r, split)
            assert cap == cap.lower()
            kind = catalog().concepts[concept].kind
            if kind == "object":
                assert concept in cap
                if ctx is not None:
                    assert any(p in cap for p in cat_mod.CONTEXT_PHRASES[ctx])
            elif kind == "style":
                assert ctx in cat_mod.STYLE_SUBJECTS
            assert parse_caption(cap)[0] == concept, cap


def test_render_every_concept_shape_dtype_and_determinism():
    for concept in all_concepts():
        a = render(concept, 3)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, render(concept, 3))
        assert a.std() > 5  # not blank
    assert render("cat", 1, size=32).shape == (32, 32, 3)
    assert not np.array_equal(render("cat", 1), render("cat", 2))
    assert not np.array_equal(render("van gogh", 1), render("van gogh", 2))


def test_contexts_and_subjects_render():
    for ctx in cat_mod.INSTANCE_CONTEXTS + (None,):
        for c in ("cat", "nemo", "r2d2", "snoopy"):
            assert render(c, 0, context=ctx).shape == (64, 64, 3)
    for subj in cat_mod.STYLE_SUBJECTS:
        assert render("monet", 0, subject=subj).shape == (64, 64, 3)
    # context changes the background
    a, b = render("cat", 5, context="night"), render("cat", 5, context="snow")
    assert a.mean() < b.mean()
    with pytest.raises(KeyError):
        render("mickey mouse", 0)


def test_memorized_captions_fixed():
    for subj, caption in cat_mod.MEMORIZED.items():
        ref = render(caption, 0)
        for seed in (1, 7, HELDOUT_SEED_OFFSET + 3):
            assert np.array_equal(render(caption, seed, context="night"), ref)
            assert np.array_equal(render_caption(caption, seed), ref)
        ref[:] = 0
        assert render(caption, 0).any()
        # paraphrases are varied and differ from the memorized image
        for p in cat_mod.PARAPHRASES[subj]["train"][:4]:
            imgs = [render_caption(p, s).astype(int) for s in range(3)]
            assert not np.array_equal(imgs[0], imgs[1])
            assert all(np.abs(i - render(caption, 0)).mean() > 10 for i in imgs)


def test_render_caption_parsing():
    assert parse_caption("a photo of a grumpy cat on a beach") == ("grumpy cat", "beach", None)
    assert parse_caption("a photo of a cat on a beach")[0] == "cat"
    assert parse_caption("a goldfish underwater")[0] == "goldfish"
    assert parse_caption("a wall-e at night") == ("wall-e", "night", None)
    assert parse_caption("a painting of a village, in the style of van gogh") == ("van gogh", None, "village")
    assert parse_caption("a painting of mountains") == ("painting", None, "mountains")
    assert parse_caption("a painting of a lighthouse")[0] == "lighthouse"
    with pytest.raises(ValueError):
        parse_caption("an empty room")
    a = render_caption("a photo of a cat in the snow", 4)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_caption("a photo of a cat in the snow", 4))


def test_sample_training_example_deterministic_and_balanced():
    img, cap, concept = sample_training_example(11)
    img2, cap2, concept2 = sample_training_example(11)
    assert np.array_equal(img, img2) and cap == cap2 and concept == concept2
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    counts: dict[str, int] = {}
    heldout_t = set(heldout_templates("instance"))
    for s in range(600):
        _, cap, concept = sample_training_example(s)
        counts[concept] = counts.get(concept, 0) + 1
        assert parse_caption(cap)[0] == concept
        assert not any(re.fullmatch(re.escape(t).replace(r"\{\}", ".+"), cap) for t in heldout_t)
    assert set(counts) == set(all_concepts())
    mem = [counts[c] for c in cat_mod.MEMORIZED.values()]
    ordinary = np.mean([n for c, n in counts.items() if c not in cat_mod.MEMORIZED.values()])
    assert max(mem) < ordinary
    _, cap_h, _ = sample_training_example(11, split="heldout")
    assert isinstance(cap_h, str)
