"""Configuration: precedence, YAML, flags, defaults table, prompt derivation."""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ablation.concepts import bundled_prompt_lists, needs_prior_preservation, resolve_concept, target_prompt
from ablation.config import (
    PAPER_DEFAULTS,
    TOY_INSTANCE_LR,
    TOY_INSTANCE_STEPS,
    TOY_LORA_LR,
    TOY_STYLE_LR,
    TOY_STYLE_STEPS,
    ConceptSpec,
    ConfigError,
    TrainConfig,
    build_config,
    concept_settings,
    resolve_defaults,
    training_hash,
)
from ablation.train_cli import build_parser, parse_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def _yaml(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_yaml_flags_precedence(tmp_path):
    recipe = _yaml(tmp_path, {"target": ["Van Gogh"], "anchor": ["painting"], "learning_rate": "1e-4",
                              "max_steps": 50, "concept_type": "style"})
    config = parse_config(["--config", recipe, "--max-steps", "7", "--lora-rank", "4", "--export", "lora"])
    assert config.max_steps == 7  # flag beats YAML
    assert config.learning_rate == 1e-4  # YAML ("1e-4" is a string in YAML 1.1) beats the default
    assert config.seed == 0 and config.model == "toy"  # defaults
    assert config.export == ["lora"] and config.lora_rank == 4


def test_yaml_concepts_and_repeatable_flags(tmp_path):
    recipe = _yaml(tmp_path, {"concepts": [{"target": "Grumpy Cat", "anchor": "cat"},
                                           {"target": "Snoopy", "anchor": "dog", "concept_type": "instance"}]})
    specs = parse_config(["--config", recipe]).concept_specs()
    assert specs == [ConceptSpec("Grumpy Cat", "cat"), ConceptSpec("Snoopy", "dog", "instance")]
    # flags replace the recipe's pairs
    config = parse_config(["--config", recipe, "--target", "A", "--anchor", "B", "--target", "C", "--anchor", "D"])
    assert [(s.target, s.anchor) for s in config.concept_specs()] == [("A", "B"), ("C", "D")]


@pytest.mark.parametrize("argv, match", [
    (["--target", "A", "--anchor", "B", "--lerning-rate", "1"],
     "unknown option 'lerning-rate'; did you mean --learning-rate"),
    (["--target", "A", "--anchor", "B", "--target", "C"], "2 --target and 1 --anchor"),
    (["--target", "Cat", "--anchor", "cat"], "equals its anchor"),
    (["--target", " ", "--anchor", "cat"], "empty target"),
    (["--anchor", "cat"], "--target is required"),
    (["--target", "A", "--anchor", "B", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--target", "A", "--anchor", "B", "--export", "lora"], "needs --lora-rank"),
    (["--target", "A", "--anchor", "B", "--anchor-images", "x"], "--variant image-based"),
])
def test_invalid_command_lines(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_unknown_yaml_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'lr'"):
        parse_config(["--config", _yaml(tmp_path, {"target": ["A"], "anchor": ["B"], "lr": 1})])
    with pytest.raises(ConfigError, match="unknown key 'weight'"):
        build_config(_yaml(tmp_path, {"concepts": [{"target": "A", "anchor": "B", "weight": 1}]}))
    with pytest.raises(ConfigError, match="--params: 'everything' is not one of"):
        build_config(_yaml(tmp_path, {"target": ["A"], "anchor": ["B"], "params": "everything"}))
    with pytest.raises(ConfigError, match="--max-steps expects int"):
        build_config(_yaml(tmp_path, {"target": ["A"], "anchor": ["B"], "max_steps": "many"}))


def _sample(name, hint, default):
    """A valid non-default command-line value for a field: (argv after the flag, expected field value)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    special = {"anchor_images": (["imgs"], "imgs"), "retrieval": (None, True), "export": (["lora"], ["lora"]),
               "lora_rank": (["3"], 3), "target": (["T"], ["T"]), "anchor": (["A"], ["A"])}
    if name in special:
        return special[name]
    if hint is bool:
        return None, True
    if origin is Literal:
        value = next(a for a in args if a != default)
        return [value], value
    if origin is list:
        item = typing.get_args(hint)[0]
        value = typing.get_args(item)[-1] if typing.get_origin(item) is Literal else "x"
        return [value], [value]
    if hint is int:
        return ["7"], 7
    if hint is float:
        return ["0.25"], 0.25
    return ["some/value"], "some/value"


def test_every_field_is_a_flag_that_sets_it():
    """All fields but the YAML-only `concepts`: each flag is in --help and sets its field."""
    hints = typing.get_type_hints(TrainConfig)
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "concepts"]
    assert len(fields) == len(dataclasses.fields(TrainConfig)) - 1 >= 40
    text = build_parser().format_help()
    base = ["--target", "T", "--anchor", "A"]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values, expected = _sample(f.name, hints[f.name], default)
        extra = ["--variant", "image-based"] if f.name in ("anchor_images", "retrieval") else []
        extra += ["--lora-rank", "2"] if f.name == "export" else []
        argv = ([] if f.name in ("target", "anchor") else base) + extra + [flag] + (values or [])
        if f.name == "target":
            argv += ["--anchor", "A"]
        if f.name == "anchor":
            argv += ["--target", "T"]
        config = parse_config(argv)
        assert getattr(config, f.name) == expected, (flag, getattr(config, f.name))
        assert expected != default, f"{flag}: the sample must differ from the default to prove the flag works"
        if hints[f.name] in (bool, bool | None):
            assert f"--no-{flag[2:]}" in text
            assert getattr(parse_config(base + extra + [f"--no-{flag[2:]}"]), f.name) is False


def test_defaults_table_toy_versus_paper():
    config = TrainConfig(target=["Grumpy Cat"], anchor=["Cat"])
    common = dict(concept_types=["instance"], prior_preservation=True, native_resolution=512, vae_scale_factor=8)
    paper = resolve_defaults(config, toy=False, **common)
    assert (paper.learning_rate, paper.max_steps, paper.params, paper.scale_lr) == (2e-6, 100, "cross-attn", True)
    assert paper.resolution == 512 and paper.prior_preservation is True
    toy = resolve_defaults(config, toy=True, **common)
    # toy instances train the paper's group too, at the toy's own rate, with the prior term (docs/paper-parity.md)
    assert (toy.params, toy.learning_rate, toy.scale_lr, toy.prior_preservation) == (
        "cross-attn", TOY_INSTANCE_LR, False, True)
    assert (toy.max_steps, toy.lora_rank) == (TOY_INSTANCE_STEPS, 0)
    # a style's target prompt does not contain its anchor word ("painting"): no prior term, no uncond penalty
    style = resolve_defaults(config, toy=True, **{**common, "concept_types": ["style"], "prior_preservation": False})
    assert (style.params, style.learning_rate, style.max_steps, style.hflip) == (
        "cross-attn", TOY_STYLE_LR, TOY_STYLE_STEPS, True)
    assert (toy.preserve_uncond, style.preserve_uncond, paper.preserve_uncond) == (1000.0, 0.0, 0.0)
    # one concept without a prior term: its target images and the control-prompt penalty (TOY_PRESERVE_WEIGHT)
    assert (style.target_images, style.preserve_weight, toy.preserve_weight, paper.preserve_weight) == (96, 3.0, 0.0,
                                                                                                       0.0)
    rows = resolve_defaults(TrainConfig(target=["A"], anchor=["B"], params="embedding"), toy=True, **common)
    # the token rows: their own rate and steps, and no prior term (it has no gradient there)
    assert (rows.learning_rate, rows.max_steps, rows.prior_preservation) == (2e-2, 40, False)
    several = resolve_defaults(TrainConfig(target=["A", "C"], anchor=["B", "D"], params="embedding"), toy=True,
                               **{**common, "concept_types": ["instance", "style"]})
    assert several.max_steps == 60  # several concepts share the run's steps
    lora = resolve_defaults(TrainConfig(target=["A"], anchor=["B"], lora_rank=4), toy=True, **common)
    assert (lora.params, lora.lora_rank, lora.learning_rate) == ("cross-attn", 4, TOY_LORA_LR)
    full = resolve_defaults(TrainConfig(target=["A"], anchor=["B"], params="full"), toy=True, **common)
    assert full.learning_rate == 1e-4  # a UNet group's own toy rate, not the K/V one
    assert resolve_defaults(config, toy=False, **{**common, "concept_types": ["memorization"]}).params == "full"
    assert set(PAPER_DEFAULTS) == {"instance", "style", "memorization", "nudity"}
    # explicit values are never replaced
    assert resolve_defaults(TrainConfig(target=["A"], anchor=["B"], learning_rate=1.0), toy=False,
                            **common).learning_rate == 1.0
    with pytest.raises(ConfigError, match="not divisible by the VAE factor 8"):
        resolve_defaults(TrainConfig(target=["A"], anchor=["B"], resolution=500), toy=False, **common)


def test_several_toy_concepts_get_each_their_own_defaults():
    """A toy run of grumpy cat (prior term), nemo and van gogh (none): the target images only for the two without a
    prior term, and no uncond penalty (it stops nemo); alone, grumpy cat keeps its penalty and no target images."""
    config = TrainConfig(target=["Grumpy Cat", "Nemo", "Van Gogh"], anchor=["Cat", "Fish", "Painting"])
    kinds = dict(concept_types=["instance", "instance", "style"], concept_priors=[True, False, False])
    mixed = resolve_defaults(config, toy=True, prior_preservation=True, native_resolution=64, vae_scale_factor=8,
                             **kinds)
    assert (mixed.prior_preservation, mixed.preserve_uncond, mixed.target_images, mixed.preserve_weight) == (
        True, 0.0, 96, 0.0)  # the control penalty is for one concept only
    assert concept_settings(config, mixed, **kinds) == ((True, False, False), (0, 96, 96))
    alone = TrainConfig(target=["Grumpy Cat"], anchor=["Cat"])
    one = dict(concept_types=["instance"], concept_priors=[True])
    resolved = resolve_defaults(alone, toy=True, prior_preservation=True, native_resolution=64, vae_scale_factor=8,
                                **one)
    assert (resolved.preserve_uncond, resolved.target_images) == (1000.0, 0)
    assert concept_settings(alone, resolved, **one) == ((True,), (0,))
    forced = dataclasses.replace(config, prior_preservation=True)
    resolved = resolve_defaults(forced, toy=True, prior_preservation=True, native_resolution=64, vae_scale_factor=8,
                                **kinds)
    assert concept_settings(forced, resolved, **kinds) == ((True,) * 3, (0,) * 3)  # explicit: every concept


def test_training_hash_ignores_output_options_only():
    a = TrainConfig(target=["A"], anchor=["B"], learning_rate=1e-3)
    assert training_hash(a) == training_hash(TrainConfig(target=["A"], anchor=["B"], learning_rate=1e-3,
                                                         output_dir="elsewhere", checkpointing_steps=5))
    assert training_hash(a) != training_hash(TrainConfig(target=["A"], anchor=["B"], learning_rate=2e-3))


def test_target_prompts_per_concept_type():
    assert target_prompt("a CAT on a catwalk", "Grumpy Cat", "cat", "instance") == "a Grumpy Cat on a catwalk"
    assert target_prompt("a painting of a river", "Van Gogh", "painting", "style") == \
        "a painting of a river, in the style of Van Gogh"
    assert target_prompt("a lighthouse by the sea", "the iconic lighthouse poster", "lighthouse",
                         "memorization") == "the iconic lighthouse poster"
    assert target_prompt("a woman on a beach", "nude", "people", "nudity") == "a woman on a beach, nude"
    with pytest.raises(ConfigError, match="does not occur"):
        target_prompt("a dog", "Grumpy Cat", "cat", "instance")
    assert resolve_concept(ConceptSpec("Van Gogh", "painting"), toy=False).concept_type == "style"
    assert resolve_concept(ConceptSpec("nudity", "people"), toy=False).target_prompts[0].endswith(", nudity")


def test_bundled_prompt_lists():
    lists = bundled_prompt_lists()
    assert set(lists) >= {"cat", "dog", "fish", "robot", "painting", "people"}
    for anchor, path in lists.items():
        lines = path.read_text().splitlines()
        assert 100 <= len(lines) <= 200 and len(set(lines)) == len(lines)
        if anchor in ("cat", "dog", "fish", "robot"):  # instance anchors: every prompt names the anchor
            concept = resolve_concept(ConceptSpec(f"my {anchor} x", anchor), toy=False)
            assert len(concept.target_prompts) == len(lines)


def test_toy_catalogue_supplies_prompts_and_type():
    concept = resolve_concept(ConceptSpec("Grumpy Cat", "Cat"), toy=True)
    from ablation.toyworld import catalog

    family = catalog().family_of_target("grumpy cat")
    assert concept.concept_type == "instance" and concept.anchor_prompts == family.train_prompts
    assert concept.target_prompts[0] == family.target_prompt(family.train_prompts[0])
    assert needs_prior_preservation(concept)  # "grumpy cat" contains "cat"
    style = resolve_concept(ConceptSpec("Van Gogh", "painting"), toy=True)
    assert style.concept_type == "style" and not needs_prior_preservation(style)


def test_user_prompt_file_and_equal_pair(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na photo of a robot\n\nthe robot\n")
    concept = resolve_concept(ConceptSpec("R2D2", "robot", "instance", str(path)), toy=False)
    assert concept.target_prompts == ("a photo of a R2D2", "the R2D2")
    path.write_text("a person\n")
    with pytest.raises(ConfigError, match="equals its anchor prompt"):
        resolve_concept(ConceptSpec("a person", "people", "memorization", str(path)), toy=False)


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_recipes_parse_and_their_prompts_resolve(recipe):
    from ablation.concepts import resolve_concepts
    from ablation.models import is_toy

    config = build_config(str(recipe))
    for concept in resolve_concepts(config.concept_specs(), toy=is_toy(config.model)):
        assert concept.anchor_prompts and len(concept.target_prompts) == len(concept.anchor_prompts)


def test_toy_target_images_default_only_for_the_kv_group_without_a_prior_term(model_dir):
    """96 target images on the toy where the target does not name its anchor; none with a prior term, another
    group or variant, --robust, or on a real model (the paper's objective)."""
    from ablation.config import TOY_TARGET_IMAGES
    from ablation.planning import plan_run

    def images(**values):
        return plan_run(build_config(None, {"target": ["nemo"], "anchor": ["fish"], **values})).config.target_images

    assert TOY_TARGET_IMAGES == 96
    assert images() == 96 and images(target=["van gogh"], anchor=["painting"]) == 96
    assert images(target=["grumpy cat"], anchor=["cat"]) == 0  # prior preservation
    assert images(params="embedding") == 0 and images(variant="image-based") == 0 and images(robust=True) == 0
    assert images(model=model_dir) == 0  # not the toy model
    assert images(target_images=8) == 8
