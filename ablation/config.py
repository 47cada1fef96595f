"""The training configuration: one typed dataclass, its validation, and the defaults table.

Field names are the YAML keys and (with `-` for `_`) the command-line flags; help text lives in
`field(metadata={"help": ...})` so that `ablate train --help` and the recipes never disagree.
Precedence: dataclass defaults < YAML recipe (`--config`) < command-line flags.

Hyperparameters whose default depends on the model and the concept type are `None` here and
filled in one place, `resolve_defaults`, from the tables `PAPER_DEFAULTS` (Stable Diffusion,
docs/method.md) and `TOY_DEFAULTS` (the 64 px toy-world model).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ablation.flags import option as _help  # a field with its --help text

ConceptType = Literal["instance", "style", "memorization", "nudity"]
Variant = Literal["model-based", "image-based"]
ParamGroup = Literal["cross-attn", "attn", "full", "embedding", "text-kv+embedders"]
Sampler = Literal["ddim", "dpm++", "euler", "ddpm", "pndm"]
#: precision names (`--mixed-precision`, `--dtype`; accelerate's `no` is fp32) -> the name the project prints
PRECISIONS = {"no": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
#: the precision names of `--dtype` (the values of PRECISIONS, in order)
Precision = Literal[tuple(dict.fromkeys(PRECISIONS.values()))]
#: classifier-free guidance of the paper's sampling (anchors and evaluation, docs/method.md): every default uses it
GUIDANCE = 6.0
#: sampler name -> diffusers scheduler class: the one table of anchors, `ablate eval / generate / attack` and the demo
SAMPLERS: dict[str, str] = dict(zip(typing.get_args(Sampler), ("DDIMScheduler", "DPMSolverMultistepScheduler",
                                                               "EulerDiscreteScheduler", "DDPMScheduler",
                                                               "PNDMScheduler"), strict=True))
#: the judge of the paper's CLIP accuracy and CLIP score on real Stable Diffusion models: the official
#: `evaluate.py` of Kumari et al. loads CLIP ViT-B/32 (issue 9)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
#: a stronger judge, not the paper's (`--clip-model openai/clip-vit-large-patch14`)
LARGE_CLIP = "openai/clip-vit-large-patch14"
Teacher = Literal["same", "frozen"]
MixedPrecision = Literal["no", "fp16", "bf16"]
ReportTo = Literal["tensorboard", "none"]
ExportKind = Literal["pipeline", "lora", "single-file"]
#: the export kinds, which are also the names of their folders in a run (`ablation.export`)
EXPORT_KINDS: tuple[str, ...] = typing.get_args(ExportKind)

CONCEPT_KEYS = ("target", "anchor", "concept_type", "anchor_prompts")
#: the official code's names, accepted as aliases of this project's
ALIASES = {"full-weight": "full", "noise-based": "image-based"}
DEFAULT_CACHE_DIR = "~/.cache/ablation/anchors"


class ConfigError(ValueError):
    """Bad user input, detected before any expensive work (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class ConceptSpec:
    """One target -> anchor pair as the user gave it (prompts are derived in `ablation.concepts`)."""

    target: str
    anchor: str
    concept_type: ConceptType | None = None
    anchor_prompts: str | None = None


@dataclass
class TrainConfig:
    """Everything `ablate train` / `accelerate launch ablate.py` accepts."""

    # --- concepts -------------------------------------------------------------------------------
    target: list[str] = _help("concept to ablate, e.g. 'Grumpy Cat' (repeatable; paired in order with --anchor)",
                              default_factory=list)
    anchor: list[str] = _help("anchor concept the target should turn into, e.g. 'Cat' (repeatable)",
                              default_factory=list)
    concept_type: ConceptType | None = _help(
        "how target prompts derive from anchor prompts (default: the toy catalogue's type; style for the anchor "
        "`painting`, nudity for `people`; else instance)",
        default=None)
    anchor_prompts: str | None = _help(
        "text file of anchor prompts, one per line (default: toy catalogue, else the bundled list for the anchor)",
        default=None)
    concepts: list[dict] = _help(
        "YAML only: several pairs [{target, anchor, concept_type, anchor_prompts}]", default_factory=list)

    # --- model and method -----------------------------------------------------------------------
    model: str = _help("`toy`, a local diffusers pipeline directory or a hub id", default="toy")
    model_config: str | None = _help(
        "single-file --model (.safetensors): a diffusers folder of the same family to read its configs from, "
        "offline (default: configs embedded by `--export single-file`, else the local Hugging Face cache)",
        default=None)
    variant: Variant = _help(
        "model-based: match eps(z_t,c*) to the teacher's eps(z_t,c); image-based: regress the noise of anchor "
        "images under the target prompt", default="model-based")
    params: ParamGroup | None = _help(
        "weights to train: cross-attn (attn2 to_k/to_v; SD3/FLUX: the text stream's add_k_proj/add_v_proj), attn "
        "(all attention q/k/v/out), full (whole UNet or transformer), embedding (target token rows of the text "
        "encoder; UNet models and SD3 without T5), text-kv+embedders (SD3/FLUX: cross-attn + context_embedder and "
        "the pooled-text projection); default by concept type", default=None)
    lora_rank: int | None = _help(
        "train LoRA adapters of this rank on the chosen group instead of dense updates (0 = dense; default: 0 on "
        "UNet models, 16 on SD3/FLUX, which do not fit next to a dense teacher copy)", default=None)
    lora_alpha: float | None = _help("LoRA alpha (default: equal to the rank)", default=None)
    teacher: Teacher | None = _help(
        "model-based teacher eps(z_t,c): `same` = the model being trained under no_grad (the paper's official code; "
        "one set of weights); `frozen` = the pretrained weights (free with LoRA; dense keeps a copy of the trained "
        "tensors). Default: `same` on real models (paper setting), `frozen` on the toy model, where `same` let the "
        "anchor drift (docs/paper-parity.md)", default=None)
    prior_preservation: bool | None = _help(
        "add the denoising loss on anchor images with anchor prompts (default: on when the target prompt contains "
        "the anchor word, and for nudity/memorization)", default=None)
    prior_weight: float | None = _help("weight lambda of the prior-preservation loss", default=None)
    preserve_weight: float | None = _help(
        "weight of the control-prompt penalty: how much the trained text key/value projections may change the "
        "tokens of prompts outside the ablated families (ablation/preserve.py; an addition to the paper; default 0 = "
        "off; on the toy model 3 for one concept without a prior term (nemo, snoopy, r2d2, styles), where it kept "
        "other concepts without keeping the target, docs/paper-parity.md)", default=None)
    preserve_uncond: float | None = _help(
        "weight of the penalty that keeps the unconditional (empty) prompt's text keys/values where they were "
        "(ablation/preserve.py): classifier-free guidance uses them in every image, so their drift changes every "
        "concept. An addition to the paper (0 = off: the paper setting); default on the toy model: 1000 with prior "
        "preservation (it holds the anchor), else 0 (there it stopped the ablation; docs/paper-parity.md)",
        default=None)

    robust: bool = _help(
        "harden the ablation against the attacks of `ablate attack`: on every --robust-every-th step, a few ascent "
        "steps find target conditioning (within --robust-radius of the target prompt's) that brings the target "
        "back, and the ablation loss is applied to it too (AdvUnlearn / Receler style; costs --robust-steps extra "
        "forward and backward passes per use). Model-based variant, UNet groups (SD3/FLUX: the persistent "
        "adversary). A trade: on the toy world it lowered prefix and inversion attacks and made relearning 16x "
        "slower, but changed other concepts (dalmatian -0.7 by CLIP, 2-8%% of control images; docs/robustness.md)",
        default=False)
    robust_every: int = _help("--robust: use the adversary every N micro-steps", default=1)
    robust_steps: int = _help("--robust: ascent steps of the adversary per use (6: measured on the toy world, "
                              "docs/robustness.md)", default=6)
    robust_radius: float | None = _help(
        "--robust: bound of the perturbation, relative to the token norm (default: 0.1 for `ball`, 1.0 for the "
        "persistent adversaries)", default=None)
    robust_weight: float = _help("--robust: weight of the ablation loss on the adversarial conditioning (4: measured "
                                 "on the toy world, docs/robustness.md)", default=4.0)
    robust_adversary: Literal["ball", "persistent", "prefix", "shifted"] = _help(
        "--robust: `ball` starts afresh each use and pushes the prediction away from the anchor's within "
        "--robust-radius of the target's own tokens; `persistent` keeps one perturbation of every token across "
        "steps and moves it, by --robust-steps steps per use, towards conditioning under which the model draws "
        "what the original model draws for the target, within --robust-radius; `prefix` does the same with five "
        "free input tokens in front of the target prompt, through the text encoder (as the `prefix` attack, "
        "unbounded, --robust-radius scales its steps; one CLIP text encoder: SD 1.x/2.x); `shifted` is `persistent` "
        "on the target prompt behind 0-5 fresh random vocabulary tokens each use (the shift and context an "
        "attacker's prefix brings; SD 1.x/2.x). docs/robustness.md measures them", default="persistent")

    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float | None = _help("AdamW learning rate (base rate if --scale-lr)", default=None)
    scale_lr: bool | None = _help("multiply the learning rate by batch size x accumulation x processes",
                                  default=None)
    max_steps: int | None = _help("optimizer steps", default=None)
    train_batch_size: int | None = _help("batch size per process", default=None)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    max_grad_norm: float = _help("gradient clipping norm (0 = off)", default=1.0)
    adam_weight_decay: float = _help("AdamW weight decay (the embedding group always uses 0)", default=1e-2)
    seed: int = _help("seed of anchor generation, noise, timesteps and batch order", default=0)

    # --- anchor data ----------------------------------------------------------------------------
    resolution: int | None = _help("training resolution in pixels (default: the model's native size)", default=None)
    num_anchor_images: int | None = _help("anchor images per concept", default=None)
    anchor_scheduler: Sampler | None = _help("sampler used to generate anchor images", default=None)
    anchor_steps: int | None = _help("sampling steps of anchor generation", default=None)
    anchor_guidance: float | None = _help("classifier-free guidance of anchor generation", default=None)
    anchor_trajectory: bool = _help(
        "train on the anchor sampler's intermediate states (z_t, t) instead of re-noised final latents: each anchor "
        "image gives --anchor-steps training points (model-based variant, without --augment; UNet and SD3 "
        "models; docs/performance.md measures it)", default=False)
    target_images: int | None = _help(
        "model-based: also sample this many images of the target with the base model (its target prompts) and "
        "train their noisy latents toward the anchor too, as the anchor images' are, so the ablated model also "
        "leaves the target's own sampling path (0: the paper's, anchor images only; docs/paper-parity.md measures "
        "it)", default=None)
    anchor_batch_size: int | None = _help("images per generation batch (default: 16; the toy model: 64, faster per "
                                          "image on a CPU)", default=None)
    cache_dir: str | None = _help(
        f"anchor cache (default: $ABLATION_CACHE or {DEFAULT_CACHE_DIR})", default=None)
    anchor_images: str | None = _help(
        "image-based: a folder of images or a saved `datasets` dataset (column `image`, optional `prompt`)",
        default=None)
    retrieval: bool = _help("image-based: retrieve anchor images with clip-retrieval (pip install "
                            "'ablation[retrieval]')", default=False)
    retrieval_url: str = _help("clip-retrieval service of --retrieval", default="https://knn.laion.ai/knn-service")
    retrieval_index: str = _help("clip-retrieval index of --retrieval (the official code used laion_400m)",
                                 default="laion5B-L-14")
    memorized_image: str | None = _help(
        "memorization: the memorized image; generated anchors that copy it are replaced (the official SSCD "
        "filter). The toy world renders it itself", default=None)
    copy_detector: str | None = _help(
        "memorization: SSCD TorchScript file (`sscd_imagenet_mixup.torchscript.pt`, threshold 0.5) for the copy "
        "filter; it runs the file's code, so only pass files you trust (default: CLIP image cosine, threshold 0.9)",
        default=None)
    hflip: bool | None = _help("random horizontal flips of the anchor latents (default: on, as the official commands)",
                               default=None)
    augment: bool | None = _help(
        "the official resize augmentation: anchors rescaled to a random size and placed in a grey canvas (or "
        "cropped when enlarged), 'a far away'/'zoomed in' prompt prefixes, loss masked to the valid region; done on "
        "the cached latents (default: on for instances and memorization, as the official code)", default=None)

    # --- hardware -------------------------------------------------------------------------------
    mixed_precision: MixedPrecision = _help("frozen weights in fp16/bf16, trained weights stay fp32",
                                            default="no")
    gradient_checkpointing: bool = _help("trade compute for UNet activation memory", default=False)
    use_8bit_adam: bool = _help("bitsandbytes AdamW8bit (GPU; the optional extra: pip install -e \".[8bit]\")",
                                default=False)
    offload_text_encoders: bool = _help(
        "keep the text encoders in CPU memory: they visit the accelerator only to encode prompts, while the denoiser "
        "waits in CPU memory, so anchor sampling holds the denoiser without them (SD3.5-large, FLUX on 24 GB); "
        "costs two moves of the denoiser per sampled anchor set and for the training prompts", default=False)
    fp8_base: bool = _help(
        "SD3 / FLUX: store the frozen transformer weights in float8 (e4m3), each layer upcast to the training dtype "
        "as it runs "
        "(diffusers' layerwise casting; norms, embeddings and the trained group stay as they are): FLUX.1-dev's "
        "frozen transformer 22.2 -> 14.4 GB, at fp8's rounding of the base (the teacher and the anchors too); pays "
        "in training only with --gradient-checkpointing (without it autograd keeps each layer's upcast copy); one "
        "process", default=False)
    plan: bool = _help("print the run's memory plan (estimated peak accelerator memory by part, from the configs on "
                       "the meta device; no weights loaded) and exit", default=False)
    max_memory: float | None = _help("GB of accelerator memory the run may use: refuse, naming options that fit, "
                                     "when the memory plan's peak is above it", default=None)

    # --- output ---------------------------------------------------------------------------------
    output_dir: str | None = _help("run directory (default: outputs/<target>)", default=None)
    overwrite: bool = _help("allow a non-empty output directory (its previous results are removed)",
                            default=False)
    checkpointing_steps: int = _help("save resumable state every N steps (0 = never)", default=100)
    checkpoints_total_limit: int | None = _help("keep at most this many checkpoints", default=2)
    resume_from_checkpoint: str | None = _help("`latest` or a checkpoint directory", default=None)
    export: list[ExportKind] = _help("extra outputs: pipeline (full diffusers pipeline), lora (diffusers and "
                                     "kohya/A1111/ComfyUI LoRA files), single-file (one .safetensors checkpoint)",
                                     default_factory=list)
    report_to: ReportTo = _help("experiment tracker", default="none")

    # --- debugging ------------------------------------------------------------------------------
    stop_after_steps: int | None = _help("debug: stop (as if killed) after this many steps", default=None)
    debug_checksums: bool = _help("debug: every rank writes a checksum of its trained weights to "
                                  "<output-dir>/debug/", default=False)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.concept_specs()  # validates the pairs
        if not self.model.strip():
            raise ConfigError("--model is empty; pass `toy`, a local diffusers directory or a hub id")
        for name in ("max_steps", "train_batch_size", "gradient_accumulation_steps", "resolution",
                     "num_anchor_images", "anchor_steps", "anchor_batch_size", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {value}")
        for name in ("lora_rank", "checkpointing_steps", "max_grad_norm", "adam_weight_decay", "prior_weight",
                     "preserve_weight", "preserve_uncond", "target_images"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
        for name in ("learning_rate", "lora_alpha", "max_memory"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {value}")
        if self.lora_rank and self.params == "embedding":
            raise ConfigError("--lora-rank applies to UNet groups; the embedding group trains token rows directly")
        # The default rank depends on the model family (resolve_defaults); only `toy` is known to be a UNet here.
        if "lora" in self.export and (self.lora_rank == 0 or (self.lora_rank is None and self.model == "toy")):
            raise ConfigError("--export lora needs --lora-rank > 0")
        if (self.anchor_images or self.retrieval) and self.variant != "image-based":
            raise ConfigError("--anchor-images / --retrieval give real images: use them with --variant image-based")
        if self.anchor_images and self.retrieval:
            raise ConfigError("give either --anchor-images or --retrieval, not both")
        if self.robust and (self.variant != "model-based" or self.params == "embedding"):
            raise ConfigError("--robust needs the model-based variant and a UNet group (--params cross-attn, attn or "
                              "full): the adversary moves the UNet's text conditioning")
        if self.robust_every < 1 or self.robust_steps < 1 or self.robust_weight < 0 or (
                self.robust_radius is not None and self.robust_radius <= 0):
            raise ConfigError("--robust-every and --robust-steps must be >= 1, --robust-radius > 0, "
                              "--robust-weight >= 0")
        if self.target_images and self.variant != "model-based":
            raise ConfigError("--target-images needs the model-based variant: the image-based loss would regress "
                              "the noise of the target's images, teaching the target rather than removing it")
        if self.anchor_trajectory and self.variant != "model-based":
            raise ConfigError("--anchor-trajectory needs the model-based variant: the image-based loss regresses the "
                              "noise of re-noised latents, which a sampler state does not have")
        if self.offload_text_encoders and (self.params == "embedding" or (
                self.robust and self.robust_adversary in ("prefix", "shifted"))):
            raise ConfigError("--offload-text-encoders: the embedding group and the prefix adversary encode prompts "
                              "while training, so the text encoders stay on the accelerator; drop one of the two")
        if self.fp8_base and {"pipeline", "single-file"} & set(self.export):
            raise ConfigError("--fp8-base holds the base rounded to float8, which a full export would save; export "
                              "the pipeline from the run's delta afterwards: "
                              "ablate export --run RUN_DIR --format pipeline")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"--stop-after-steps must be >= 1, got {self.stop_after_steps}")

    def concept_specs(self) -> list[ConceptSpec]:
        """The target -> anchor pairs, from `concepts` (YAML) or the paired --target/--anchor flags."""
        if self.concepts and (self.target or self.anchor):
            raise ConfigError("give the pairs either as `concepts` (YAML) or as --target/--anchor, not both")
        if self.concepts:
            specs = []
            for i, item in enumerate(self.concepts):
                if not isinstance(item, dict):
                    raise ConfigError(f"concepts[{i}] must be a mapping with keys {CONCEPT_KEYS}, got {item!r}")
                for key in item:
                    if key not in CONCEPT_KEYS:
                        raise ConfigError(f"unknown key {key!r} in concepts[{i}]; allowed: {', '.join(CONCEPT_KEYS)}")
                missing = [k for k in ("target", "anchor") if k not in item]
                if missing:
                    raise ConfigError(f"concepts[{i}] is missing {', '.join(missing)}")
                hints = typing.get_type_hints(ConceptSpec)
                specs.append(ConceptSpec(**{k: _coerce(f"concepts[{i}].{k}", v, hints[k]) for k, v in item.items()}))
        else:
            if not self.target:
                raise ConfigError("--target is required (e.g. --target 'Grumpy Cat' --anchor 'Cat')")
            if len(self.target) != len(self.anchor):
                raise ConfigError(f"got {len(self.target)} --target and {len(self.anchor)} --anchor; "
                                  f"each --target needs its --anchor, paired in order")
            specs = [ConceptSpec(t, a, self.concept_type, self.anchor_prompts)
                     for t, a in zip(self.target, self.anchor, strict=True)]
        for spec in specs:
            if not spec.target.strip() or not spec.anchor.strip():
                raise ConfigError(f"empty target or anchor in {spec.target!r} -> {spec.anchor!r}")
            if spec.target.strip().lower() == spec.anchor.strip().lower():
                raise ConfigError(f"target {spec.target!r} equals its anchor; the anchor must be a different concept")
        return specs

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the YAML written to `<output-dir>/config.yaml`)."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a type hint, converting YAML strings like "1e-4" (YAML 1.1 reads them as str)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        value = ALIASES.get(value, value) if isinstance(value, str) else value
        if value not in args:
            raise ConfigError(f"{_flag(name)}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, v, args[0]) if args else v for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{_flag(name)} expects a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{_flag(name)} expects {hint.__name__}, got {value!r}") from None
        if hint is float and not math.isfinite(converted):
            raise ConfigError(f"{_flag(name)} must be a finite number, got {value!r}")
        if hint is int and isinstance(value, float) and converted != value:
            raise ConfigError(f"{_flag(name)} expects an integer, got {value!r}")
        return converted
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{_flag(name)} expects {getattr(hint, '__name__', hint)}, got {value!r}")


def field_names() -> list[str]:
    """All configuration keys, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def unknown_key_error(key: str, where: str, as_flag: bool = False) -> ConfigError:
    """A ConfigError naming an unknown key, with the closest known key as a hint.

    Args:
        key: the unknown key as the user spelled it.
        where: what it is, e.g. "option" or "key in recipe.yaml:".
        as_flag: suggest the command-line spelling (`--max-steps`) instead of the YAML key (`'max_steps'`).
    """
    close = difflib.get_close_matches(key.replace("-", "_").lstrip("_"), field_names(), n=1)
    if as_flag:
        hint = f"; did you mean {_flag(close[0])}?" if close else ""
    else:
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {where} {key!r}{hint}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe, rejecting keys that are not configuration fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of option: value")
    known = set(field_names())
    for key in data:
        if key not in known:
            raise unknown_key_error(str(key), f"key in {path.name}:")
    return _relative_to_recipe(data, path.parent)


#: recipe keys that name input files; a relative path in a recipe is relative to the recipe file
RECIPE_PATH_KEYS = ("anchor_prompts", "anchor_images")


def _relative_to_recipe(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve the recipe's relative input paths against its own folder, so it runs from any directory.

    Output locations (`output_dir`, `cache_dir`) stay relative to where the run is launched.
    """

    def fix(mapping: dict[str, Any]) -> dict[str, Any]:
        out = dict(mapping)
        for key in RECIPE_PATH_KEYS:
            value = out.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                out[key] = str(base / value)
        return out

    data = fix(data)
    if isinstance(data.get("concepts"), list):
        data["concepts"] = [fix(c) if isinstance(c, dict) else c for c in data["concepts"]]
    return data


def build_config(yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML < overrides (the flags actually given on the command line)."""
    values: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    overrides = dict(overrides or {})
    # Pairs given as flags replace the recipe's pairs (both forms would otherwise be an error).
    if "target" in overrides or "anchor" in overrides:
        values.pop("concepts", None)
    values.update(overrides)
    try:
        return TrainConfig(**values)
    except TypeError as e:  # an unknown keyword from a programmatic caller
        raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------------------------------
# defaults that depend on the model and the concept type
# --------------------------------------------------------------------------------------------------

#: docs/method.md and the official commands (concept-ablation `diffusers/README.md`: every task passes --hflip,
#: styles also --noaug), Stable Diffusion 1.4 at 512 px; the learning rates are base rates (scaled, and doubled
#: with prior preservation as the official `train.py` does). docs/paper-parity.md lists every option.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "instance": dict(params="cross-attn", learning_rate=2e-6, max_steps=100, train_batch_size=4, hflip=True,
                     augment=True),
    "style": dict(params="cross-attn", learning_rate=2e-6, max_steps=100, train_batch_size=4, hflip=True,
                  augment=False),
    "nudity": dict(params="attn", learning_rate=4e-6, max_steps=400, train_batch_size=4, hflip=True, augment=True),
    "memorization": dict(params="full", learning_rate=5e-7, max_steps=400, train_batch_size=2, hflip=True,
                         augment=True),
}
#: prior_weight 0.25: the official masked loss divides by mask *cells* (one channel) while the prior term is a
#: per-element mean, so its ablation term weighs 4x (4 latent channels); under Adam, which ignores a common
#: scale of the loss, lambda 1 there equals lambda 0.25 with this project's per-element means.
PAPER_COMMON: dict[str, Any] = dict(scale_lr=True, prior_weight=0.25, num_anchor_images=1000, teacher="same",
                                    preserve_weight=0.0, preserve_uncond=0.0, target_images=0,
                                    anchor_batch_size=16, anchor_scheduler="dpm++", anchor_steps=25,
                                    anchor_guidance=GUIDANCE)

#: The toy model (64 px, ~7M-parameter UNet) needs far larger rates than SD's 2e-6, and the whole run,
#: anchor generation included, must fit in a few CPU seconds. Instances and styles train the paper's group, the
#: cross-attention key/value projections, model-based, with prior preservation for instances; the rate and steps
#: were tuned on the toy model with `scripts/fidelity_sweep.py` (all 31 concepts, both toy judges;
#: docs/paper-parity.md, "The toy defaults"). The target's token rows (`--params embedding`) remain an option:
#: they leave every other concept untouched but every embedding attack reverses them (docs/robustness.md).
TOY_INSTANCE_LR, TOY_INSTANCE_STEPS = 6e-4, 60
TOY_STYLE_LR, TOY_STYLE_STEPS = 6e-4, 100
TOY_DEFAULTS: dict[str, dict[str, Any]] = {
    "instance": dict(params="cross-attn", learning_rate=TOY_INSTANCE_LR, max_steps=TOY_INSTANCE_STEPS,
                     train_batch_size=8, hflip=False, augment=False),
    "style": dict(params="cross-attn", learning_rate=TOY_STYLE_LR, max_steps=TOY_STYLE_STEPS, train_batch_size=8,
                  hflip=True, augment=False),
    "nudity": dict(params="attn", learning_rate=3e-4, max_steps=200, train_batch_size=8, hflip=False, augment=False),
    "memorization": dict(params="full", learning_rate=1e-4, max_steps=200, train_batch_size=8, hflip=False,
                         augment=False),
}
#: rate and steps of a group the user chose instead of the concept type's (a rate tuned for token rows would wreck
#: a UNet group). The embedding group: 40 steps at 2e-2 removed every toy target (nemo, the slowest, CLIP 0.25 at
#: 30 steps, 0.06 at 40, 0.00 at 60; docs/performance.md).
TOY_GROUP: dict[str, dict[str, Any]] = {
    "embedding": dict(learning_rate=2e-2, max_steps=40),
    "cross-attn": dict(learning_rate=TOY_INSTANCE_LR, max_steps=TOY_INSTANCE_STEPS),
    "attn": dict(learning_rate=3e-4),
    "full": dict(learning_rate=1e-4),
}
#: LoRA on a toy UNet group (`--lora-rank N`): the adapter's rate (dense rates are far too small for it)
TOY_LORA_LR = 1e-2
#: embedding group, several concepts in one run: 60 steps were measured as good as 80-120 for 5 and 8 concepts
#: (every target 0.00 by the toy classifier, nothing else changed; docs/performance.md)
TOY_MULTI_CONCEPT_STEPS = 60
#: --preserve-uncond on the toy model: with prior preservation only. The prior term holds the anchor's conditional
#: prediction, but classifier-free guidance also uses the empty prompt's, which the K/V update moved (cat 1.00 ->
#: 0.69 by the CLIP judge in DDIM 10 without it, 1.00 with it); without a prior term (the target prompt does not
#: contain the anchor: nemo, snoopy, r2d2, styles) it stopped the ablation (docs/paper-parity.md)
TOY_PRESERVE_UNCOND = 1000.0
#: --target-images on the toy model: the K/V group without a prior term (nemo, snoopy, r2d2, styles). With anchor
#: images only, nemo stayed 0.44 / 0.56 (classifier / CLIP, 32 images) after the default steps, its orange trajectory
#: never trained; with 96 target images (three quarters of each batch) it goes; where the target names its anchor
#: (grumpy cat -> cat, prior preservation) the target's images are near the anchors' and only dilute the batch
#: (grumpy cat 0.06 -> 0.12-0.16). Not under --robust, which was tuned without them: with them nemo's robust run kept
#: 0.25 of its images and lost to every embedding attack (docs/robustness.md). docs/paper-parity.md, "The target's
#: own images"
TOY_TARGET_IMAGES = 96
#: --preserve-weight on the toy model, with those target images when no concept has a prior term: the control-prompt
#: penalty then keeps other concepts (control images changed by CLIP: nemo 1.4% -> 0.7%, van gogh 3.8% -> 0.8%, r2d2
#: 2.0% -> 0.8%) and the target still goes (<= 0.06 by both judges; at 10 it kept nemo 0.28 by CLIP). Not with a prior
#: term (grumpy cat, prior + uncond penalty, kept 0.59 with it at 10), not for several concepts in one run (there it
#: kept nemo and van gogh at 1 and 3; docs/performance.md); docs/paper-parity.md, "The control-prompt penalty"
TOY_PRESERVE_WEIGHT = 3.0
TOY_COMMON: dict[str, Any] = dict(scale_lr=False, prior_weight=1.0, num_anchor_images=32, teacher="frozen",
                                  preserve_weight=0.0, target_images=0, anchor_batch_size=64,
                                  anchor_scheduler="ddim", anchor_steps=10, anchor_guidance=GUIDANCE)

#: SD3 / SD3.5 / FLUX (docs/mmdit.md), overlaid on the paper's table: these models do not fit next to a dense
#: teacher copy, so LoRA (rank 16) on the group is the default and the teacher is the same transformer with its
#: adapters off (`frozen`, no second copy); anchors are sampled with the model's own flow-matching Euler scheduler
#: at its usual settings. The LoRA learning rate is diffusers' dreambooth-LoRA default for these models (1e-4,
#: unscaled); it is not tuned for ablation. A dense run (`--lora-rank 0`) keeps the paper's rate.
MMDIT_COMMON: dict[str, Any] = dict(lora_rank=16, teacher="frozen", anchor_scheduler="euler", anchor_steps=28)
MMDIT_LORA: dict[str, Any] = dict(learning_rate=1e-4, scale_lr=False)
#: per family: `sd3` (SD3/SD3.5: classifier-free guidance 7.0), `flux` (FLUX.1-dev: distilled guidance input
#: 3.5), `flux-schnell` (no guidance input; 4 steps, as its model card samples)
MMDIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd3": dict(anchor_guidance=7.0),
    "flux": dict(anchor_guidance=3.5),
    "flux-schnell": dict(anchor_guidance=0.0, anchor_steps=4),
}
#: the toy MMDiT (`--model toy-sd3`, SD3 without T5): anchors as the toy UNet's (10 sampler steps, guidance 6, the
#: setting its quality was measured at) and, as on the toy UNet, the target's token rows (`embedding`, no LoRA):
#: the text K/V group with LoRA removed grumpy cat but changed 15-17% of other concepts' images (docs/mmdit.md)
TOY_MMDIT: dict[str, Any] = dict(params="embedding", lora_rank=0, anchor_steps=10, anchor_guidance=GUIDANCE,
                                 learning_rate=2e-2, max_steps=40, train_batch_size=8)
#: ... and for a transformer group chosen on it (LoRA 16 on the text K/V: lr 1e-3, 100 steps removed grumpy cat)
TOY_MMDIT_LORA: dict[str, Any] = dict(learning_rate=1e-3, max_steps=100)


def learning_rate(config: TrainConfig, num_processes: int) -> float:
    """The optimizer's rate: the base rate, scaled by the total batch with --scale-lr, and then doubled with prior
    preservation, as the official `train.py` does (the prior half doubles the batch it scales by)."""
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.train_batch_size * config.gradient_accumulation_steps * num_processes
        if config.prior_preservation:
            lr *= 2
    return lr


def resolve_defaults(config: TrainConfig, *, toy: bool, concept_types: list[str], prior_preservation: bool,
                     native_resolution: int, vae_scale_factor: int, family: str = "unet",
                     concept_priors: list[bool] | None = None) -> TrainConfig:
    """Fill every `None` default, and check what needs the model's config.

    Args:
        config: the validated user configuration.
        toy: the model is the toy-world model (toy table instead of the paper's).
        concept_types: resolved type of each concept; the first one picks the defaults.
        prior_preservation: what `--prior-preservation` defaults to (see `concepts.needs_prior_preservation`).
        native_resolution: `unet.config.sample_size * vae_scale_factor`.
        vae_scale_factor: pixels per latent cell (SD3/FLUX: per transformer token side, which the resolution
            must divide into).
        family: `unet` (SD1/SD2/SDXL, the toy model), or `sd3`, `flux`, `flux-schnell` (`MMDIT_DEFAULTS`).
        concept_priors: `needs_prior_preservation` of each concept (default: `prior_preservation` for all); with
            several concepts the toy rules below look at every concept, not only the first (`concept_settings`).

    Returns:
        A new TrainConfig without `None` in the hyperparameters.
    """
    table = TOY_DEFAULTS if toy else PAPER_DEFAULTS
    defaults = {**(TOY_COMMON if toy else PAPER_COMMON), **table[concept_types[0]]}
    lora_rank = config.lora_rank
    if family in MMDIT_DEFAULTS:
        defaults.update(MMDIT_COMMON, **MMDIT_DEFAULTS[family])
        if toy:
            defaults.update(TOY_MMDIT)
            if config.params not in (None, "embedding"):  # a transformer group on the toy MMDiT: LoRA, as on real ones
                defaults.update(lora_rank=MMDIT_COMMON["lora_rank"], **TOY_MMDIT_LORA)
        lora_rank = defaults["lora_rank"] if lora_rank is None else lora_rank
        if lora_rank and not toy:
            defaults.update(MMDIT_LORA)
    lora_rank = lora_rank or 0
    defaults.update(prior_preservation=prior_preservation, resolution=native_resolution, lora_rank=lora_rank,
                    lora_alpha=float(lora_rank) or None,
                    cache_dir=os.environ.get("ABLATION_CACHE") or DEFAULT_CACHE_DIR)
    if toy and family not in MMDIT_DEFAULTS:
        if config.params in TOY_GROUP and config.params != defaults["params"]:
            defaults.update(TOY_GROUP[config.params])
        if lora_rank and (config.params or defaults["params"]) != "embedding":
            defaults["learning_rate"] = TOY_LORA_LR
    if toy and (config.params or defaults["params"]) == "embedding":
        defaults["max_steps"] = max(defaults["max_steps"], TOY_MULTI_CONCEPT_STEPS if len(concept_types) > 1 else 0)
    if config.params == "embedding" or (config.params is None and defaults.get("params") == "embedding"):
        # The anchor prompts do not contain the trained token rows, so the prior term would have no gradient.
        defaults["prior_preservation"] = False
    prior = defaults["prior_preservation"] if config.prior_preservation is None else config.prior_preservation
    priors = _concept_priors(config, prior, concept_priors or [prior] * len(concept_types))
    kv = (config.params or defaults["params"]) == "cross-attn"
    if toy and "preserve_uncond" not in defaults:  # the K/V group only: memorization / nudity were tuned without it
        # a run mixing concepts with and without their prior term: off (it stops the ablation of those without)
        defaults["preserve_uncond"] = TOY_PRESERVE_UNCOND if all(priors) and kv else 0.0
    if (toy and family not in MMDIT_DEFAULTS and kv and not config.robust and config.variant == "model-based"
            and any(_wants_target_images(t, p) for t, p in zip(concept_types, priors, strict=True))):
        defaults["target_images"] = TOY_TARGET_IMAGES
        if priors == [False]:  # one concept: in a mix the penalty kept nemo and van gogh (docs/performance.md)
            defaults["preserve_weight"] = TOY_PRESERVE_WEIGHT
    defaults["robust_radius"] = 0.1 if config.robust_adversary == "ball" else 1.0
    updates = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    resolved = dataclasses.replace(config, **updates)
    if resolved.resolution % vae_scale_factor:
        raise ConfigError(f"--resolution {resolved.resolution} is not divisible by the VAE factor {vae_scale_factor} "
                          f"of this model (native size {native_resolution})")
    if resolved.params == "embedding" and resolved.lora_rank:
        raise ConfigError("--lora-rank applies to UNet groups; the embedding group trains token rows directly")
    if "lora" in resolved.export and not resolved.lora_rank:
        raise ConfigError("--export lora needs --lora-rank > 0")
    if resolved.anchor_trajectory:
        if resolved.augment:
            raise ConfigError("--anchor-trajectory trains on noisy sampler states, which the resize augmentation "
                              "cannot rescale; add --no-augment")
        if family.startswith("flux"):
            raise ConfigError("--anchor-trajectory is implemented for UNet and SD3 models, not FLUX")
        if resolved.anchor_steps < 2:
            raise ConfigError("--anchor-trajectory needs --anchor-steps >= 2 (a one-step sampler visits only noise)")
    return resolved


def _concept_priors(config: TrainConfig, prior: bool, concept_priors: list[bool]) -> list[bool]:
    """Whether each concept gets the prior term: an explicit --(no-)prior-preservation for every concept, by default
    only the concepts whose anchor is at risk (`concepts.needs_prior_preservation`)."""
    if config.prior_preservation is not None or not prior:
        return [prior] * len(concept_priors)
    return list(concept_priors)


def _wants_target_images(concept_type: str, prior: bool) -> bool:
    """The toy rule of `TOY_TARGET_IMAGES`: an instance or style trained without a prior term."""
    return concept_type in ("instance", "style") and not prior


def concept_settings(config: TrainConfig, resolved: TrainConfig, *, concept_types: list[str],
                     concept_priors: list[bool]) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """The prior term and the number of the target's own images of each concept of a run.

    An explicit `--prior-preservation` / `--target-images` applies to every concept; by default each concept gets its
    own: the prior term where its anchor is at risk, and (where the toy rule set `--target-images`) the target's
    images only for instances and styles without a prior term. In a one-concept run this is the run's setting.

    Args:
        config: the user's configuration (`None` = defaulted).
        resolved: the same after `resolve_defaults`.
        concept_types: resolved type of each concept.
        concept_priors: `concepts.needs_prior_preservation` of each concept.

    Returns:
        (prior term per concept, target images per concept).
    """
    priors = _concept_priors(config, resolved.prior_preservation, concept_priors)
    if config.target_images is None and resolved.target_images:
        counts = [resolved.target_images if _wants_target_images(t, p) else 0
                  for t, p in zip(concept_types, priors, strict=True)]
    else:
        counts = [resolved.target_images] * len(concept_types)
    return tuple(priors), tuple(counts)


#: fields that do not change the trained weights (excluded from the resume hash)
NON_TRAINING_FIELDS = frozenset({
    "output_dir", "overwrite", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "export", "report_to", "stop_after_steps", "debug_checksums", "cache_dir", "max_steps", "anchor_batch_size",
    "plan", "max_memory",
})


def training_hash(config: TrainConfig, per_concept: dict[str, Any] | None = None) -> str:
    """Hash of the training-relevant configuration (checkpoints store it; resuming checks it).

    `per_concept`: settings that differ between the concepts of a run (`concept_settings`), hashed too; a run whose
    concepts share every setting hashes as its configuration alone.
    """
    data = {k: v for k, v in config.to_dict().items() if k not in NON_TRAINING_FIELDS}
    if per_concept:
        data["per_concept"] = per_concept
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
