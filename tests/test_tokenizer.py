"""The vendored OpenAI CLIP tokenizer gives the ids of the real one."""

from ablation.tokenizer_util import clip_tokenizer


def test_ids_match_openai_clip():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of Grumpy Cat").input_ids == [49406, 320, 1125, 539, 23610, 2368, 49407]
    assert tok("painting in the style of Van Gogh").input_ids == [49406, 3086, 530, 518, 1844, 539, 2451, 19697, 49407]


def test_pads_to_77_with_end_token_like_sd1():
    ids = clip_tokenizer()("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert set(ids[4:]) == {49407}


def test_truncates_long_prompts():
    ids = clip_tokenizer(8)("a very long prompt " * 10, padding="max_length", truncation=True).input_ids
    assert len(ids) == 8 and ids[0] == 49406 and ids[-1] == 49407
