"""Every recipe parses through the real config loader, names its own launch command, and derives its prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ablation.concepts import resolve_concepts
from ablation.config import ConfigError, build_config
from ablation.toyworld import catalog

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_there_are_recipes():
    names = {_rel(p) for p in RECIPES}
    for task in ("r2d2", "grumpy_cat", "snoopy", "nemo", "van_gogh", "monet", "salvador_dali", "greg_rutkowski",
                 "memorization", "nudity"):
        assert f"recipes/{task}_sd14.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_parses_with_the_config_loader(path):
    config = build_config(str(path))  # unknown keys and bad values raise ConfigError
    assert config.concept_specs()
    assert config.output_dir, "recipes name their output directory"


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_header_gives_its_launch_command(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert f"accelerate launch ablate.py --config {_rel(path)}" in text
    overrides = [line for line in header if f"--config {_rel(path)} --" in line]
    assert overrides, "the header shows an override example"


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_prompt_files_exist_and_prompts_derive(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # users launch recipes from anywhere: their input paths are relative to the file
    config = build_config(str(path))
    specs = config.concept_specs()
    for spec in specs:
        if spec.anchor_prompts:
            assert Path(spec.anchor_prompts).is_file(), f"{_rel(path)}: missing prompt file {spec.anchor_prompts}"
    concepts = resolve_concepts(specs, toy=config.model == "toy")
    for concept in concepts:
        assert concept.anchor_prompts and len(concept.target_prompts) == len(concept.anchor_prompts)


def test_recipe_input_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "prompts").mkdir(parents=True)
    (tmp_path / "recipes" / "prompts" / "p.txt").write_text("a photo of a cat\n")
    (tmp_path / "recipes" / "imgs").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "concepts": [{"target": "Grumpy Cat", "anchor": "cat", "anchor_prompts": "prompts/p.txt"}],
        "variant": "image-based", "anchor_images": "imgs", "output_dir": "outputs/r", "cache_dir": "cache"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = build_config("../recipes/r.yaml")
    assert Path(config.concepts[0]["anchor_prompts"]).resolve() == (tmp_path / "recipes/prompts/p.txt").resolve()
    assert Path(config.anchor_images).resolve() == (tmp_path / "recipes/imgs").resolve()
    assert (config.output_dir, config.cache_dir) == ("outputs/r", "cache")  # outputs: where the run is launched
    # a flag on the command line is relative to the current directory, as any flag
    assert build_config("../recipes/r.yaml", {"anchor_images": "mine"}).anchor_images == "mine"
    (concept,) = resolve_concepts(config.concept_specs(), toy=False)
    assert concept.target_prompts == ("a photo of a Grumpy Cat",)


def test_every_toy_family_has_a_recipe():
    for name, family in catalog().families.items():
        path = ROOT / "recipes" / "toy" / f"{name}.yaml"
        assert path.is_file(), f"no recipe for toy family {name}"
        data = yaml.safe_load(path.read_text())
        assert data["model"] == "toy"
        (spec,) = build_config(str(path)).concept_specs()
        assert (spec.target, spec.anchor, spec.concept_type) == (family.target, family.anchor, family.concept_type)
        (concept,) = resolve_concepts([spec], toy=True)
        assert concept.anchor_prompts == family.train_prompts  # the catalogue's prompts, not a bundled list


def test_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "toy" / "grumpy_cat.yaml").read_text() + "learning_rte: 1.0e-4\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(str(bad))


PUBLISHED_IDS = {"stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", "unet"),
                 "stabilityai/stable-diffusion-3.5-medium": ("sd35-medium", "sd3"),
                 "stabilityai/stable-diffusion-3.5-large": ("sd35-large", "sd3"),
                 "black-forest-labs/FLUX.1-dev": ("flux-dev", "flux")}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "24gb").glob("*.yaml")), ids=_rel)
def test_24gb_recipe_states_its_plan_and_fits(path, tmp_path):
    """The planned peak in the header is what `--plan` gives from the model's published configs, and <= 22 GB."""
    import re

    from ablation.config import PAPER_COMMON
    from ablation.memory import GB, PlanSettings, plan_memory
    from ablation.published import config_folder

    config = build_config(str(path))
    name, family = PUBLISHED_IDS[config.model]
    stated = float(re.search(r"Planned peak: ([\d.]+) GB", path.read_text()).group(1))
    settings = PlanSettings(params=config.params, lora_rank=config.lora_rank, batch_size=config.train_batch_size,
                            prior_preservation=True, resolution=config.resolution,
                            mixed_precision=config.mixed_precision,
                            gradient_checkpointing=config.gradient_checkpointing,
                            use_8bit_adam=config.use_8bit_adam,
                            anchor_batch_size=config.anchor_batch_size or PAPER_COMMON["anchor_batch_size"],
                            offload_text_encoders=config.offload_text_encoders, fp8_base=config.fp8_base)
    plan = plan_memory(config_folder(name, tmp_path / name), settings, family)
    assert plan.peak / GB == pytest.approx(stated, abs=0.06) and stated <= 22
