"""The toy world's concept catalogue: concepts, families, caption templates.

Pure data plus small helpers (no numpy / PIL). The renderer (:mod:`ablation.toyworld.render`) draws
every concept named here; the toy model is trained on ``(render, caption)`` pairs whose captions come
from the *training* templates below, and evaluation uses the *held-out* templates and held-out seeds
(``>= HELDOUT_SEED_OFFSET``) that training never sees.

Three kinds of families, mirroring the concept types of the method (docs/method.md):

* ``instance``: target replaces the anchor word ("a photo of a cat" -> "a photo of a grumpy cat").
* ``style``: target is appended ("a painting of a village" -> "a painting of a village, in the style
  of van gogh"); anchor ``"painting"``, surrounding = the other painters.
* ``memorization``: target is one caption always drawn as the same image; the anchor is the generic
  subject ("lighthouse"), whose prompts are paraphrases that render varied images.

Caption templates of instances use ``{}`` for the concept name; painting / style templates use
``{subject}`` (a scene such as "a village") and ``{style}`` (a painter).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Literal

ConceptType = Literal["instance", "style", "memorization"]
ConceptKind = Literal["object", "style", "memorized", "subject"]
Split = Literal["train", "heldout"]

HELDOUT_SEED_OFFSET = 10**9

# --------------------------------------------------------------------------------------------------
# concepts
# --------------------------------------------------------------------------------------------------

#: instance families: target -> (anchor, surrounding)
INSTANCE_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "grumpy cat": ("cat", ("tabby cat", "black cat", "siamese cat")),
    "snoopy": ("dog", ("dalmatian", "beagle", "golden retriever")),
    "nemo": ("fish", ("goldfish", "angelfish", "blue tang")),
    "r2d2": ("robot", ("wall-e", "c-3po", "bb8")),
}

#: creature group of every instance concept (the renderer draws one group per function)
INSTANCE_GROUP: dict[str, str] = {}
for _target, (_anchor, _sur) in INSTANCE_FAMILIES.items():
    for _c in (_target, _anchor, *_sur):
        INSTANCE_GROUP[_c] = _anchor

PAINTING = "painting"
#: painters; the first four are ablation targets, the last two only surrounding concepts
PAINTERS: tuple[str, ...] = (
    "van gogh", "monet", "salvador dali", "greg rutkowski", "johannes vermeer", "jeremy mann",
)
STYLE_TARGETS: tuple[str, ...] = PAINTERS[:4]

#: scene subjects of paintings: key -> phrase used in captions
STYLE_SUBJECTS: dict[str, str] = {
    "village": "a village",
    "landscape": "a landscape",
    "harbour": "a harbour",
    "portrait": "a woman",
    "mountains": "mountains",
    "flowers": "flowers",
    "garden": "a garden",
}

#: memorization: generic subject -> memorized caption (always the same image)
MEMORIZED: dict[str, str] = {
    "lighthouse": "the iconic lighthouse at dawn poster",
    "balloon": "the famous red balloon over paris photograph",
}

#: paraphrases of each memorized subject (anchor prompts; NOT memorized, varied renders)
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "lighthouse": {
        "train": (
            "a lighthouse by the sea", "a painting of a lighthouse", "a photo of a lighthouse",
            "a lighthouse on a rocky coast", "a tall lighthouse at sunset", "a lighthouse at night",
            "a lighthouse during the day", "a white lighthouse near the ocean",
            "a picture of a lighthouse on a cliff", "an old lighthouse", "a lighthouse at dawn",
            "a poster of a lighthouse", "a striped lighthouse by the sea", "a lighthouse with a bright light",
            "a lighthouse",
        ),
        "heldout": (
            "a lighthouse standing by the water", "an image of a lighthouse at dawn",
            "a lighthouse overlooking the sea", "a coastal lighthouse", "a lighthouse on the shore at night",
            "a drawing of a lighthouse",
        ),
    },
    "balloon": {
        "train": (
            "a red balloon in the sky", "a balloon over a city", "a photo of a balloon",
            "a balloon floating over rooftops", "a balloon at night", "a painting of a balloon",
            "a picture of a red balloon", "a balloon on a sunny day", "a balloon over a field",
            "a colorful balloon", "a balloon at sunset", "a balloon with a string",
            "a photograph of a balloon", "a blue balloon in the sky", "a balloon",
        ),
        "heldout": (
            "a balloon drifting in the sky", "an image of a red balloon", "a balloon above the houses",
            "a single balloon at dawn", "a floating balloon", "a balloon over the town",
        ),
    },
}

# --------------------------------------------------------------------------------------------------
# caption templates
# --------------------------------------------------------------------------------------------------

#: context key -> phrases that name it in captions (matched as substrings, first key wins)
CONTEXT_PHRASES: dict[str, tuple[str, ...]] = {
    "beach": ("on a beach", "on the beach", "at the beach"),
    "night": ("at night",),
    "snow": ("in the snow",),
    "garden": ("in a garden", "in the garden"),
    "living room": ("in a living room", "in the living room"),
    "underwater": ("underwater",),
}
INSTANCE_CONTEXTS: tuple[str, ...] = tuple(CONTEXT_PHRASES)

#: time of day of the memorization subjects (lighthouse, balloon)
TIME_PHRASES: dict[str, tuple[str, ...]] = {
    "dawn": ("at dawn",),
    "sunset": ("at sunset",),
    "night": ("at night",),
    "day": ("during the day", "on a sunny day"),
}

_INSTANCE_TRAIN: tuple[str, ...] = (
    "a photo of a {}",
    "a picture of a {}",
    "a {}",
    "a photo of a {} on a beach",
    "a picture of a {} at night",
    "a {} in the snow, high quality photo",
    "a photo of a {} in a garden",
    "a photo of a {} in a living room",
    "a photo of a {} underwater",
    "a close-up photo of a {}",
    "a {} on the beach",
    "a {} at night",
    "a {} in the snow",
    "a {} in a garden",
    "a {} in a living room",
    "a {} underwater",
    "a cute {}",
    "a cute {} on a beach",
    "a photo of a cute {} at night",
    "a good photo of a {} in the snow",
    "a bright photo of a {} in a garden",
    "a photo of the {}",
    "an image of a {}",
    "a {}, high quality photo",
    "a small {} on a beach",
    "a large {} in a living room",
    "a photo of a {} at night, high quality",
    "a nice picture of a {} underwater",
    "a photo of one {} in a garden",
    "a picture of a {} in the snow",
    "a photo of a small {}",
    "a photo of a large {}",
)
_INSTANCE_HELDOUT: tuple[str, ...] = (
    "a snapshot of a {}",
    "a snapshot of a {} on a beach",
    "a clear photo of a {} at night",
    "one {} in the snow",
    "a lovely {} in a garden",
    "a {} resting in a living room",
    "an underwater photo of a {}",
    "a real photo of the {}",
)

#: anchor ("painting") templates; ``{subject}`` is a scene phrase
_PAINTING_TRAIN: tuple[str, ...] = (
    "a painting of {subject}",
    "an oil painting of {subject}",
    "a painting of {subject}, oil on canvas",
    "a famous painting of {subject}",
    "a beautiful painting of {subject}",
    "a canvas painting of {subject}",
    "a detailed painting of {subject}",
    "a large painting of {subject}",
    "a small painting of {subject}",
    "an old painting of {subject}",
    "a painting showing {subject}",
    "a painting depicting {subject}",
    "a classic painting of {subject}",
    "a fine art painting of {subject}",
    "an artwork of {subject}",
    "a painted picture of {subject}",
    "a painting of {subject}, art",
    "{subject}, painting",
    "{subject}, oil painting",
    "painting of {subject}",
    "a framed painting of {subject}",
    "a painting of {subject}, high quality",
    "a gallery painting of {subject}",
    "a simple painting of {subject}",
    "a nice painting of {subject}",
    "a painting of {subject} on canvas",
    "a masterpiece painting of {subject}",
    "an acrylic painting of {subject}",
    "a painting with {subject}",
    "a picture of a painting of {subject}",
)
_PAINTING_HELDOUT: tuple[str, ...] = (
    "a wall painting of {subject}",
    "a painting that shows {subject}",
    "a modern painting of {subject}",
    "an oil on canvas of {subject}",
    "a lovely painting of {subject}",
    "an art piece showing {subject}",
    "a painting featuring {subject}",
)
STYLE_SUFFIX = ", in the style of {style}"
#: style templates that are not "anchor template + STYLE_SUFFIX"
_STYLE_EXTRA_TRAIN: tuple[str, ...] = (
    "a painting of {subject} in the style of {style}",
    "{subject}, in the style of {style}",
    "{subject} painted by {style}",
    "a painting of {subject} by {style}",
    "a {style} painting of {subject}",
    "{subject} in the style of {style}",
    "an oil painting of {subject} by {style}",
    "a painting in the style of {style}",
    "art by {style}, {subject}",
    "{style} style painting of {subject}",
)
_STYLE_EXTRA_HELDOUT: tuple[str, ...] = (
    "a {style} artwork of {subject}",
    "{subject}, artwork by {style}",
    "a canvas of {subject} by {style}",
)

#: aliases accepted by train_templates / heldout_templates
_KIND_ALIASES = {
    "instance": "object", "object": "object",
    "style": "style",
    "painting": "painting",
    "memorization": "subject", "subject": "subject", "memorized": "subject",
}


def _templates(kind: str, split: Split) -> tuple[str, ...]:
    k = _KIND_ALIASES.get(kind)
    if k is None:
        raise KeyError(f"unknown template kind {kind!r}; use one of {sorted(_KIND_ALIASES)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train = split == "train"
    if k == "object":
        return _INSTANCE_TRAIN if train else _INSTANCE_HELDOUT
    if k == "painting":
        return _PAINTING_TRAIN if train else _PAINTING_HELDOUT
    if k == "style":
        base = _PAINTING_TRAIN if train else _PAINTING_HELDOUT
        extra = _STYLE_EXTRA_TRAIN if train else _STYLE_EXTRA_HELDOUT
        return tuple(t + STYLE_SUFFIX for t in base) + extra
    # memorization subjects: the concrete paraphrases (they name their subject themselves)
    return tuple(p for subj in PARAPHRASES for p in PARAPHRASES[subj][split])


def train_templates(kind: str) -> tuple[str, ...]:
    """Training caption templates of a kind.

    ``kind``: "instance"/"object" (``{}`` = concept name), "style" (``{subject}``, ``{style}``),
    "painting" (the style anchor, ``{subject}``), "memorization"/"subject" (concrete paraphrases).
    """
    return _templates(kind, "train")


def heldout_templates(kind: str) -> tuple[str, ...]:
    """Held-out templates (never used for training); same kinds as :func:`train_templates`."""
    return _templates(kind, "heldout")


# --------------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    name: str
    kind: ConceptKind
    judge_text: str


def _replace_word(text: str, word: str, new: str) -> str:
    """Replace the first whole-word occurrence of ``word`` (not followed by more letters/digits/-)."""
    pat = re.compile(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])")
    out, n = pat.subn(new, text, count=1)
    if n == 0:
        raise ValueError(f"anchor word {word!r} not found in prompt {text!r}")
    return out


@dataclass(frozen=True)
class Family:
    name: str
    concept_type: ConceptType
    target: str
    anchor: str
    surrounding: tuple[str, ...]
    train_prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return (self.target, self.anchor, *self.surrounding)

    def target_prompt(self, anchor_prompt: str) -> str:
        """The target prompt derived from an anchor prompt (per concept type)."""
        if self.concept_type == "instance":
            return _replace_word(anchor_prompt, self.anchor, self.target)
        if self.concept_type == "style":
            return anchor_prompt + STYLE_SUFFIX.format(style=self.target)
        return self.target

    def prompts_for(self, concept: str, split: Split = "train") -> tuple[str, ...]:
        """Prompts of any class of the family (target, anchor or surrounding) for a split."""
        if concept not in self.classes:
            raise KeyError(f"{concept!r} is not a class of family {self.name!r}: {self.classes}")
        anchor_prompts = self.train_prompts if split == "train" else self.heldout_prompts
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if concept == self.anchor:
            return anchor_prompts
        if self.concept_type == "instance":
            return tuple(_replace_word(p, self.anchor, concept) for p in anchor_prompts)
        if self.concept_type == "style":
            return tuple(p + STYLE_SUFFIX.format(style=concept) for p in anchor_prompts)
        # memorization: classes other than the anchor are memorized captions
        return (concept,)


@dataclass(frozen=True)
class Catalog:
    concepts: dict[str, Concept]
    families: dict[str, Family]

    def family_of_target(self, target: str) -> Family:
        key = target.strip().lower()
        for fam in self.families.values():
            if fam.target.lower() == key or fam.name == key:
                return fam
        targets = ", ".join(repr(f.target) for f in self.families.values())
        raise KeyError(f"no toy-world family has target {target!r}; known targets: {targets}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _painting_prompts(templates: tuple[str, ...], per_template: int) -> tuple[str, ...]:
    subjects = list(STYLE_SUBJECTS.values())
    out = []
    for i, t in enumerate(templates):
        for j in range(per_template):
            out.append(t.format(subject=subjects[(i + 3 * j) % len(subjects)]))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def catalog() -> Catalog:
    concepts: dict[str, Concept] = {}
    families: dict[str, Family] = {}
    for target, (anchor, surrounding) in INSTANCE_FAMILIES.items():
        for c in (anchor, target, *surrounding):
            concepts[c] = Concept(c, "object", f"a photo of a {c}")
        families[slug(target)] = Family(
            name=slug(target), concept_type="instance", target=target, anchor=anchor, surrounding=surrounding,
            train_prompts=tuple(t.format(anchor) for t in _INSTANCE_TRAIN),
            heldout_prompts=tuple(t.format(anchor) for t in _INSTANCE_HELDOUT),
        )
    concepts[PAINTING] = Concept(PAINTING, "style", "a painting")
    for p in PAINTERS:
        concepts[p] = Concept(p, "style", f"a painting in the style of {p}")
    train_paint = _painting_prompts(_PAINTING_TRAIN, 2)
    heldout_paint = _painting_prompts(_PAINTING_HELDOUT, 2)
    for target in STYLE_TARGETS:
        families[slug(target)] = Family(
            name=slug(target), concept_type="style", target=target, anchor=PAINTING,
            surrounding=tuple(p for p in PAINTERS if p != target),
            train_prompts=train_paint, heldout_prompts=heldout_paint,
        )
    for subj, caption in MEMORIZED.items():
        concepts[subj] = Concept(subj, "subject", f"a picture of a {subj}")
        concepts[caption] = Concept(caption, "memorized", caption)
    for subj, caption in MEMORIZED.items():
        name = "memorized_" + slug(subj)
        families[name] = Family(
            name=name, concept_type="memorization", target=caption, anchor=subj,
            surrounding=tuple(c for s, c in MEMORIZED.items() if s != subj),
            train_prompts=PARAPHRASES[subj]["train"], heldout_prompts=PARAPHRASES[subj]["heldout"],
        )
    return Catalog(concepts=concepts, families=families)


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------


def context_of(caption: str) -> str | None:
    """The instance context (background) a caption names, or None."""
    c = caption.lower()
    for key, phrases in CONTEXT_PHRASES.items():
        if any(p in c for p in phrases):
            return key
    return None


def time_of(caption: str) -> str | None:
    """The time of day a memorization-subject caption names, or None."""
    c = caption.lower()
    for key, phrases in TIME_PHRASES.items():
        if any(p in c for p in phrases):
            return key
    return None


def subject_of(caption: str) -> str | None:
    """The painting scene subject (a key of STYLE_SUBJECTS) a caption names, or None."""
    c = caption.lower()
    for key, phrase in STYLE_SUBJECTS.items():
        if re.search(r"\b" + re.escape(key) + r"\b", c) or phrase in c:
            return key
    if re.search(r"\bportrait\b", c):
        return "portrait"
    return None


def sample_caption(concept: str, rng: random.Random, split: Split = "train") -> tuple[str, str | None]:
    """A random caption of ``concept`` and the context it names.

    The second item is the background context for instance concepts ("beach", "night", ... or None),
    the scene subject key for painting/style concepts ("village", ...), the time of day for generic
    memorization subjects ("dawn", ... or None) and None for memorized captions.
    """
    cat = catalog()
    if concept not in cat.concepts:
        raise KeyError(f"unknown toy-world concept {concept!r}")
    kind = cat.concepts[concept].kind
    if kind == "object":
        t = rng.choice(_templates("object", split))
        return t.format(concept), context_of(t)
    if kind == "style":
        subject = rng.choice(list(STYLE_SUBJECTS))
        phrase = STYLE_SUBJECTS[subject]
        if concept == PAINTING:
            t = rng.choice(_templates("painting", split))
            return t.format(subject=phrase), subject
        t = rng.choice(_templates("style", split))
        return t.format(subject=phrase, style=concept), subject
    if kind == "subject":
        p = rng.choice(PARAPHRASES[concept][split])
        return p, time_of(p)
    return concept, None
