"""The vendored OpenAI CLIP tokenizer (the one Stable Diffusion 1.x/2.x and SDXL use)."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Load the vendored CLIP BPE tokenizer offline.

    Args:
        model_max_length: padding/truncation length (77 in Stable Diffusion).

    Returns:
        A `CLIPTokenizer` whose ids match OpenAI CLIP's (49,408 tokens).
    """
    # from_pretrained(dir), not CLIPTokenizer(vocab_file=..., merges_file=...): the latter silently
    # builds a 2-token tokenizer in transformers 5.
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=model_max_length)
