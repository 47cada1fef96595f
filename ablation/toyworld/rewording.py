"""Reworded captions of the toy world: how the toy UNet learns to read prompts that its templates never had.

The catalogue's templates ("a photo of a {} on a beach") are few and regular; a model trained only on them
draws "a fish in a glass bowl on a table" badly. This module gives

* :func:`reword`, a generator of *training* rewordings of a caption that keep what the renderer drew (the
  concept, the instance's background, the painting's scene, the time of day): other frames ("there is ..."),
  word order ("at night, a cat"), synonyms, filler words and objects the renderer does not draw, and runs of
  random vocabulary words before or after the caption (the text tower is frozen and knows only its captions'
  words: every other word is an untrained vector the UNet must learn to read past);
* :data:`HELDOUT_REWORDED`, hand-written *held-out* rewordings per kind, built from frames and words that
  :func:`reword` never produces (:data:`HELDOUT_ONLY_WORDS`, checked by a test), to measure generalisation.

Memorized captions are excluded: they are one exact caption by definition.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from ablation.toyworld.catalog import (
    PARAPHRASES,
    STYLE_SUBJECTS,
    catalog,
    context_of,
    subject_of,
    time_of,
)

# --------------------------------------------------------------------------------------------------
# training rewordings (compositional: frame x modifier x context phrase x filler x suffix)
# --------------------------------------------------------------------------------------------------

#: frames around a noun phrase ("a cat", "the small cat", "cat")
_FRAMES = (
    "{np}", "{np}", "there is {np}", "here is {np}", "look at {np}", "i saw {np}", "this is {np}",
    "a shot of {np}", "a photograph of {np}", "an image showing {np}", "a photo featuring {np}",
    "{np}, photographed", "{np} in a photo", "a picture showing {np}", "a pic of {np}", "we found {np}",
    "{np} outside", "just {np}", "a camera photo of {np}",
)
_MODIFIERS = ("", "", "", "cute ", "small ", "big ", "happy ", "little ", "funny ", "young ", "sleepy ",
              "friendly ")
_ARTICLES = ("a ", "a ", "the ", "", "one ")
#: background phrases per instance context (None: no background named)
_CONTEXT_WORDS = {
    "beach": ("on a beach", "on the sand", "by the sea", "at the beach", "on a sunny beach", "on the shore"),
    "night": ("at night", "in the dark", "at nighttime", "late at night", "under the stars", "in the night"),
    "snow": ("in the snow", "in deep snow", "in winter snow", "on a snowy day", "on snowy ground"),
    "garden": ("in a garden", "in the garden", "among flowers", "in a green garden", "on the lawn"),
    "living room": ("in a living room", "in the living room", "at home on a carpet", "indoors at home",
                    "inside a cozy room"),
    "underwater": ("underwater", "under the water", "deep underwater", "beneath the sea", "in the ocean depths"),
}
#: objects and words the renderer does not draw (the model must learn to ignore them)
_FILLERS = ("", "", "", "", " next to a chair", " with a ball", " near a tree", " beside a box", " with a friend",
            " under a blue sky", " on a rock", " by a door", " with a red toy", " near a bench")
_SUFFIXES = ("", "", "", ", high quality", ", 4k", ", detailed", ", photo", ", sharp focus", ", hd", ", nice")

#: style rewordings: {subject} = the scene phrase, {style} = the painter
_STYLE_FRAMES = (
    "{style}'s painting of {subject}", "a painting of {subject} done by {style}", "{subject} in {style}'s style",
    "{subject}, {style} style", "a picture of {subject} in the style of {style}", "in the style of {style}: {subject}",
    "{subject} painted in the style of {style}", "{mod}painting of {subject} by {style}",
    "{style} painted {subject}", "a {style} style picture of {subject}", "{subject}, by {style}",
    "an image of {subject} in the style of {style}", "{subject}, a painting by {style}",
)
#: style captions that name no scene
_STYLE_ONLY_FRAMES = ("a painting by {style}", "{style} style", "art in the style of {style}", "a {style} painting",
                      "an artwork by {style}", "a picture painted by {style}", "{style}'s painting")
_PAINTING_FRAMES = (
    "{mod}painting of {subject}", "{subject}, painted", "{subject} as a painting", "a painting: {subject}",
    "an image of a painting of {subject}", "a painted {subject_bare}", "{subject} in paint",
    "a picture of {subject}, painting", "painting, {subject}", "{subject}, an oil painting",
    "a painting that has {subject}", "the painting of {subject}",
)
_PAINT_MODIFIERS = ("", "", "a ", "a ", "an old ", "a nice ", "a colorful ", "a quiet ", "a simple ")
#: other phrases of the painting scenes (the renderer's scene is decided by the key)
_SUBJECT_WORDS = {
    "village": ("a village", "a small village", "a village with houses", "village houses"),
    "landscape": ("a landscape", "a wide landscape", "a country landscape", "fields and hills"),
    "harbour": ("a harbour", "a harbour with boats", "boats in a harbour", "a port"),
    "portrait": ("a woman", "a portrait of a woman", "a young woman", "a lady"),
    "mountains": ("mountains", "high mountains", "a mountain range", "snowy peaks"),
    "flowers": ("flowers", "a bunch of flowers", "a vase of flowers", "blooming flowers"),
    "garden": ("a garden", "a flower garden", "a green garden", "a garden with a path"),
}
#: time phrases of the memorization subjects
_TIME_WORDS = {
    "dawn": ("at dawn", "at daybreak", "early in the morning"),
    "sunset": ("at sunset", "at dusk", "in the evening sun"),
    "night": ("at night", "in the dark", "at nighttime"),
    "day": ("during the day", "on a sunny day", "in daylight", "at noon"),
}


@functools.lru_cache(maxsize=1)
def _vocabulary_words() -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary that no held-out prompt uses (the catalogue's held-out templates and the
    held-out rewordings) and that name no concept: random context the model must learn to read past."""
    from ablation.toyworld.catalog import heldout_templates

    vocab = json.loads((Path(__file__).parents[1] / "tokenizer" / "vocab.json").read_text())
    heldout = [t for kind in ("object", "painting", "style", "subject") for t in heldout_templates(kind)]
    heldout += [t for frames in HELDOUT_REWORDED.values() for t in frames]
    banned = set(HELDOUT_ONLY_WORDS) | {w for t in heldout for w in re.findall(r"[a-z']+", t.lower())}
    banned |= {w for c in catalog().concepts for w in re.findall(r"[a-z0-9'-]+", c)}
    words = (t[:-4] for t in vocab if t.endswith("</w>"))
    return tuple(sorted(w for w in words if w.isalpha() and w.isascii() and len(w) >= 3 and w not in banned))


def _random_words(r: random.Random, most: int) -> str:
    return " ".join(r.choice(_vocabulary_words()) for _ in range(r.randint(1, most)))


def _with_random_context(text: str, r: random.Random) -> str:
    """Words from anywhere in the vocabulary before (up to 6) or after (up to 4) the caption, sometimes."""
    roll = r.random()
    if roll < 0.25:
        return f"{_random_words(r, 6)} {text}"
    if roll < 0.4:
        return f"{text} {_random_words(r, 4)}"
    return text


def _instance(concept: str, context: str | None, r: random.Random) -> str:
    np_ = r.choice(_ARTICLES) + r.choice(_MODIFIERS) + concept
    if np_.startswith("a ") and np_[2] in "aeiou":
        np_ = "an " + np_[2:]
    text = r.choice(_FRAMES).format(np=np_)
    if context is not None:
        place = r.choice(_CONTEXT_WORDS[context])
        text = f"{place}, {text}" if r.random() < 0.3 else f"{text} {place}"
    return text + r.choice(_FILLERS) + r.choice(_SUFFIXES)


def _painting(style: str | None, subject_key: str, r: random.Random) -> str:
    subject = r.choice(_SUBJECT_WORDS[subject_key])
    mod = r.choice(_PAINT_MODIFIERS)
    if style is None:
        bare = re.sub(r"^(a|an) ", "", subject)
        text = r.choice(_PAINTING_FRAMES).format(subject=subject, subject_bare=bare, mod=mod)
    else:
        text = r.choice(_STYLE_FRAMES).format(subject=subject, style=style, mod=mod)
    return text + r.choice(_SUFFIXES)


def _subject(concept: str, time: str | None, r: random.Random) -> str:
    np_ = r.choice(("a ", "a ", "the ", "one ")) + r.choice(("", "", "tall ", "old ", "lonely ", "bright ")) + concept
    if np_.startswith("a ") and np_[2] in "aeiou":
        np_ = "an " + np_[2:]
    text = r.choice(_FRAMES).format(np=np_)
    if time is not None:
        text += " " + r.choice(_TIME_WORDS[time])
    return text + r.choice(_FILLERS) + r.choice(_SUFFIXES)


def reword(concept: str, caption: str, r: random.Random) -> str:
    """A training rewording of ``caption`` (a caption of ``concept``) that names what the render shows.

    Instances keep their background, paintings their scene, memorization subjects their time of day;
    memorized captions are returned unchanged.
    """
    kind = catalog().concepts[concept].kind
    if kind == "object":
        return _with_random_context(_instance(concept, context_of(caption), r), r)
    if kind == "style":
        key = subject_of(caption)
        if key is None:  # "a painting in the style of monet": the scene is not named, so none is invented
            return _with_random_context(r.choice(_STYLE_ONLY_FRAMES).format(style=concept) + r.choice(_SUFFIXES), r)
        return _with_random_context(_painting(None if concept == "painting" else concept, key, r), r)
    if kind == "subject":
        return _with_random_context(_subject(concept, time_of(caption), r), r)
    return caption


# --------------------------------------------------------------------------------------------------
# held-out rewordings (hand-written; none of their frames or marked words is in the generator above)
# --------------------------------------------------------------------------------------------------

HELDOUT_REWORDED: dict[str, tuple[str, ...]] = {
    "object": (
        "a {} in a glass bowl on a table",
        "{} near a coral reef",
        "my neighbour's {} sitting on a sofa",
        "somewhere far away there was a {}",
        "a {} wearing a tiny hat, studio lighting",
        "a {} looking out of the window",
        "an amateur picture: {} in the park",
        "wow, what a {}!",
    ),
    "style": (
        "{subject} as {style} would have painted it",
        "{style}'s take on {subject}",
        "{subject}, brushwork of {style}",
        "a museum piece by {style} showing {subject}",
        "if {style} had painted {subject}",
        "{subject} imagined by {style}",
        "a print after {style}: {subject}",
        "wow, {subject} from {style}!",
    ),
    "painting": (
        "{subject} on a museum wall, painted",
        "someone's painting of {subject}",
        "a painting, hanging above a fireplace, of {subject}",
        "an amateur painting with {subject}",
        "{subject} drawn in paint by a student",
        "a painted scene: {subject}",
        "if someone painted {subject}",
        "wow, a painting of {subject}!",
    ),
    "subject": (
        "a {} seen from a boat",
        "somewhere far away there was a {}",
        "{} in a postcard",
        "a {} in the park",
        "wow, what a {}!",
        "my neighbour's photo of a {}",
    ),
}
#: words that only the held-out rewordings use (a test checks that :func:`reword` never produces them)
HELDOUT_ONLY_WORDS = (
    "glass", "bowl", "table", "coral", "reef", "neighbour's", "sofa", "somewhere", "far", "away", "wearing",
    "tiny", "hat", "studio", "lighting", "looking", "window", "amateur", "park", "wow", "what", "would", "take",
    "brushwork", "museum", "piece", "if", "imagined", "print", "after", "someone's", "hanging", "fireplace",
    "student", "scene", "boat", "postcard",
)


def heldout_reworded_prompts(concept: str) -> tuple[str, ...]:
    """The held-out reworded prompts of a toy concept (not a memorized caption)."""
    cat = catalog()
    kind = cat.concepts[concept].kind
    subjects = list(STYLE_SUBJECTS.values())
    if kind == "object":
        return tuple(t.format(concept) for t in HELDOUT_REWORDED["object"])
    if kind == "style":
        key = "painting" if concept == "painting" else "style"
        return tuple(t.format(subject=subjects[i % len(subjects)], style=concept)
                     for i, t in enumerate(HELDOUT_REWORDED[key]))
    if kind == "subject":
        assert concept in PARAPHRASES
        return tuple(t.format(concept) for t in HELDOUT_REWORDED["subject"])
    raise ValueError(f"{concept!r} is a memorized caption: it has no rewordings")


def reworded_concepts() -> tuple[str, ...]:
    """Every toy concept that has held-out rewordings (all but the memorized captions), catalogue order."""
    return tuple(c for c, v in catalog().concepts.items() if v.kind != "memorized")
