"""Target -> anchor pairs: concept types, anchor prompts and the target prompts derived from them.

Anchor prompts come from (first match wins) the user's `anchor_prompts` file, the toy-world catalogue
(model `toy` and a catalogue target), or the list bundled for the anchor word in `ablation/prompts/`.
Each anchor prompt c becomes a target prompt c* by concept type:

* instance: the anchor word is replaced, whole-word and case-insensitive ("a cute cat" -> "a cute Grumpy Cat");
* style: the target is appended ("a painting of a river, in the style of Van Gogh");
* memorization: c* is the memorized caption itself, the anchor prompts are its paraphrases;
* nudity: the target words are inserted ("a person on a beach, nude").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ablation.config import ConceptSpec, ConfigError

PROMPTS_DIR = Path(__file__).parent / "prompts"
#: concept type implied by a bundled anchor list when none is given (other lists are instance anchors)
BUNDLED_TYPES = {"painting": "style", "people": "nudity"}


@dataclass(frozen=True)
class Concept:
    """A resolved pair: every anchor prompt with its target prompt (same index)."""

    target: str
    anchor: str
    concept_type: str
    anchor_prompts: tuple[str, ...]
    target_prompts: tuple[str, ...]
    prompt_file: str | None = None  # the user's anchor-prompt file (absolute), if one was given
    target_variants: tuple[tuple[str, ...], ...] = ()  # per anchor prompt: every template (empty: one each)

    def variants(self) -> tuple[tuple[str, ...], ...]:
        """Target-prompt templates per anchor prompt; training draws one uniformly per sample."""
        return self.target_variants or tuple((t,) for t in self.target_prompts)

    def to_dict(self) -> dict:
        """The summary stored in the delta's metadata (the prompts themselves are not: they can be long)."""
        return {"target": self.target, "anchor": self.anchor, "concept_type": self.concept_type,
                "anchor_prompts": self.prompt_file, "num_anchor_prompts": len(self.anchor_prompts)}


def bundled_prompt_lists() -> dict[str, Path]:
    """Anchor word -> bundled prompt file (`ablation/prompts/<anchor>.txt`)."""
    return {p.stem: p for p in sorted(PROMPTS_DIR.glob("*.txt"))}


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Non-empty, stripped lines of a prompt file (lines starting with `#` are comments)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"anchor prompt file {str(path)!r} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = tuple(line for line in lines if line and not line.startswith("#"))
    if not prompts:
        raise ConfigError(f"anchor prompt file {str(path)!r} has no prompts")
    return prompts


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(r"(?<![\w-])" + re.escape(word.strip()) + r"(?![\w-])", re.IGNORECASE)


def target_prompt(anchor_prompt: str, target: str, anchor: str, concept_type: str) -> str:
    """Derive the target prompt c* from an anchor prompt c (see the module docstring)."""
    if concept_type == "instance":
        prompt, n = _word_pattern(anchor).subn(target.strip(), anchor_prompt)
        if not n:
            raise ConfigError(f"anchor word {anchor!r} does not occur in the anchor prompt {anchor_prompt!r}; "
                              f"instance prompts must name the anchor")
        return prompt
    if concept_type == "style":
        return f"{anchor_prompt}, in the style of {target.strip()}"
    if concept_type == "memorization":
        return target.strip()
    if concept_type == "nudity":
        return f"{anchor_prompt}, {target.strip()}"
    raise ConfigError(f"unknown concept type {concept_type!r}")


def style_variants(anchor_prompt: str, target: str) -> tuple[str, str, str]:
    """The reference's three style templates (`utils.py` `__getprompt__`: r in {0, 1, 2}, where 1 and 2 give the
    same text), kept as three entries so that a uniform draw has the reference's 1/3 : 2/3 odds."""
    target = target.strip()
    possessive = f"in {target}'s style, {anchor_prompt}"
    return f"{anchor_prompt}, in the style of {target}", possessive, possessive


#: CLIP's BPE vocabulary is ordered by merge frequency: a whole-word token below this id ("van</w>" 2451, or the
#: single characters of "r2d2") is a word that many ordinary prompts use.
COMMON_TOKEN_ID = 10000


def common_words(tokenizer, token_ids: list[int]) -> list[str]:
    """The trained tokens (embedding group) that are common whole words, whose rows every other prompt shares.

    Training "Van Gogh" retrains the row of "van", so "a white van" changes too: the run warns about these.
    """
    words = []
    for token_id in token_ids:
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(token, str) and token.endswith("</w>") and token_id < COMMON_TOKEN_ID:
            words.append(token[:-4])
    return words


def needs_prior_preservation(concept: Concept) -> bool:
    """The default of --prior-preservation: the anchor itself is at risk of being ablated too.

    That happens when the target prompt contains the anchor word ("grumpy cat" / "cat"), and for
    nudity and memorization (docs/method.md).
    """
    if concept.concept_type in ("nudity", "memorization"):
        return True
    return bool(_word_pattern(concept.anchor).search(concept.target))


def _toy_family(spec: ConceptSpec):
    from ablation.toyworld import catalog

    try:
        family = catalog().family_of_target(spec.target)
    except KeyError:
        return None
    return family if family.anchor.lower() == spec.anchor.strip().lower() else None


def resolve_concept(spec: ConceptSpec, toy: bool) -> Concept:
    """Turn a user pair into prompts (reads prompt files and the toy catalogue; no model needed).

    Raises:
        ConfigError: no anchor prompts found, an unknown concept type, or a target prompt equal to its
            anchor prompt.
    """
    family = _toy_family(spec) if toy and not spec.anchor_prompts else None
    variants: tuple[tuple[str, ...], ...] = ()  # the toy catalogue's own template: the toy model knows only it
    default_type = family.concept_type if family else BUNDLED_TYPES.get(spec.anchor.strip().lower(), "instance")
    concept_type = spec.concept_type or default_type
    if family is not None and concept_type == family.concept_type:
        anchors = tuple(family.train_prompts)
        targets = tuple(family.target_prompt(p) for p in anchors)
    else:
        if spec.anchor_prompts:
            anchors = read_prompts(spec.anchor_prompts)
        else:
            lists = bundled_prompt_lists()
            key = spec.anchor.strip().lower()
            if key not in lists:
                raise ConfigError(f"no anchor prompts for anchor {spec.anchor!r}: pass --anchor-prompts FILE "
                                  f"(bundled lists: {', '.join(lists)})")
            anchors = read_prompts(lists[key])
        targets = tuple(target_prompt(p, spec.target, spec.anchor, concept_type) for p in anchors)
        if concept_type == "style":
            variants = tuple(style_variants(p, spec.target) for p in anchors)
    for a, t in zip(anchors, targets, strict=True):
        if a.strip().lower() == t.strip().lower():
            raise ConfigError(f"target prompt equals its anchor prompt {a!r} ({spec.target!r} -> {spec.anchor!r})")
    prompt_file = str(Path(spec.anchor_prompts).expanduser().resolve()) if spec.anchor_prompts else None
    return Concept(spec.target.strip(), spec.anchor.strip(), concept_type, anchors, targets, prompt_file, variants)


def resolve_concepts(specs: list[ConceptSpec], toy: bool) -> list[Concept]:
    """`resolve_concept` for every pair."""
    return [resolve_concept(spec, toy) for spec in specs]
