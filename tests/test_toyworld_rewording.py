"""Reworded captions: training rewordings keep what the render shows, and the held-out set shares none of their
frames (ablation.toyworld.rewording)."""

from __future__ import annotations

import random
import re

from ablation.toyworld.catalog import (
    MEMORIZED,
    PARAPHRASES,
    catalog,
    sample_caption,
    subject_of,
    train_templates,
)
from ablation.toyworld.rewording import (
    _CONTEXT_WORDS,
    _SUBJECT_WORDS,
    HELDOUT_ONLY_WORDS,
    HELDOUT_REWORDED,
    heldout_reworded_prompts,
    reword,
    reworded_concepts,
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w'-]+", text.lower()))


def _training_rewordings(n: int = 6000) -> list[tuple[str, str, str]]:
    r = random.Random(0)
    names = list(catalog().concepts)
    out = []
    for _ in range(n):
        concept = r.choice(names)
        caption, _ = sample_caption(concept, r)
        out.append((concept, caption, reword(concept, caption, r)))
    return out


def test_training_captions_never_use_the_held_out_words_or_prompts():
    heldout = {p for c in reworded_concepts() for p in heldout_reworded_prompts(c)}
    templates = [t for kind in ("object", "painting", "style", "subject") for t in train_templates(kind)]
    vocabulary = set().union(*(_words(t) for t in templates))
    for _, _, text in _training_rewordings():
        assert text not in heldout
        vocabulary |= _words(text)
    assert not vocabulary & set(HELDOUT_ONLY_WORDS)
    # every held-out frame uses at least one word that no training caption has
    for frames in HELDOUT_REWORDED.values():
        for frame in frames:
            assert _words(frame) & set(HELDOUT_ONLY_WORDS), frame


def _names(text: str, name: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", text) is not None


def test_rewordings_name_the_concept_and_keep_what_the_render_shows():
    cat = catalog()
    for concept, caption, text in _training_rewordings():
        kind = cat.concepts[concept].kind
        if kind == "memorized":
            assert text == caption == concept
        elif concept == "painting":
            assert "paint" in text and not any(_names(text, p) for p in cat.concepts if cat.concepts[p].kind == "style"
                                               and p != "painting"), text
        else:
            assert _names(text, concept), (concept, text)
        if kind == "object":  # the background the render was drawn with, and no second creature
            context = next((c for c, phrases in _CONTEXT_WORDS.items() if any(p in caption for p in phrases)), None)
            if context is not None:
                assert any(p in text for p in _CONTEXT_WORDS[context]), (caption, text)
            assert not [c for c in cat.concepts if c not in concept and cat.concepts[c].kind == "object"
                        and _names(text, c)], text
        elif kind == "style" and subject_of(caption) is not None:  # the painted scene
            subject = subject_of(caption)
            assert any(re.sub(r"^(a|an) ", "", p) in text for p in _SUBJECT_WORDS[subject]), (caption, text)


def test_held_out_rewordings_cover_every_concept_but_memorized_captions():
    concepts = reworded_concepts()
    assert len(concepts) == len(catalog().concepts) - len(MEMORIZED)
    assert set(PARAPHRASES) <= set(concepts)
    for concept in concepts:
        prompts = heldout_reworded_prompts(concept)
        assert len(prompts) >= 6 and len(set(prompts)) == len(prompts)
        assert all(concept in p or (concept == "painting" and "paint" in p) for p in prompts)
