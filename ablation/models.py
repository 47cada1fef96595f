"""Resolving model ids (`toy`, a local directory, a single-file checkpoint or a hub id) and loading pipelines.

Every bad id fails here with a ConfigError that says what the id is and what would work, before any
weights are read: a missing path, a file that is not a model (a delta, a LoRA, a text file), a hub id
while offline or with the hub unreachable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ablation.config import ConfigError

TOY_MODEL_ID = "toy"
#: every embedded toy-world model: id -> folder under `ablation/toyworld/weights` (the UNet model and the MMDiT one)
TOY_MODELS = {TOY_MODEL_ID: "pipeline", "toy-sd3": "sd3"}
SINGLE_FILE_SUFFIXES = (".safetensors",)
_CHOICES = ("pass `toy` (or `toy-sd3`), a diffusers folder (with model_index.json), a single-file .safetensors "
            "checkpoint (SD 1.x/2.x/SDXL/SD3) or a hub id like `CompVis/stable-diffusion-v1-4`")


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """A model path that does not exist or is not a model (also a FileNotFoundError for older callers)."""


class HubUnavailableError(ConfigError):
    """A hub id cannot be resolved: offline mode is on or the hub is unreachable, and it is not cached."""


def is_toy(model: str) -> bool:
    """True for an embedded toy-world model id (`toy`, `toy-sd3`) or its directory."""
    if model in TOY_MODELS:
        return True
    from ablation.toyworld import WEIGHTS_DIR

    try:
        return any(Path(model).resolve() == (WEIGHTS_DIR / folder).resolve() for folder in TOY_MODELS.values())
    except OSError:
        return False


def is_single_file(model: str) -> bool:
    """True when `model` names an existing single-file checkpoint (`.safetensors` file)."""
    path = Path(model).expanduser()
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # an id the cache cannot even parse: let from_pretrained say what is wrong
        return False
    return isinstance(found, str)


def check_hub_id(repo_id: str, timeout: float = 5.0) -> None:
    """Make sure a hub id can be loaded: cached, or the hub reachable (one TCP connection, `timeout` s).

    A plain connection test rather than a hub request: huggingface_hub retries a failed request five
    times with back-off (about 25 s) and prints each retry.

    Raises:
        HubUnavailableError: offline mode is on, or the hub cannot be reached, and the id is not cached.
    """
    if _cached_on_hub(repo_id):
        return
    local = "a local diffusers folder or a single-file .safetensors checkpoint works offline"
    if _hub_offline():
        raise HubUnavailableError(f"model {repo_id!r} is a Hugging Face hub id, but offline mode is on "
                                  f"(HF_HUB_OFFLINE=1) and it is not in the local cache; {local}")
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise HubUnavailableError(f"model {repo_id!r} is a Hugging Face hub id, but the hub ({host}) is unreachable "
                                  f"({e.strerror or type(e).__name__}) and the model is not in the local cache; "
                                  f"{local}") from None


def resolve_model(model: str, *, check_hub: bool = True) -> str:
    """Map a model id to what `from_pretrained` / `from_single_file` takes, failing early on bad ids.

    Args:
        model: `toy`, a local diffusers directory, a single-file `.safetensors` checkpoint, or a hub id
            such as `CompVis/stable-diffusion-v1-4`.
        check_hub: check that a hub id is cached or the hub reachable (`check_hub_id`: one TCP connection,
            not a hub request). Offline mode without the id in the cache is refused either way.

    Returns:
        A local directory or file path, or the hub id unchanged.

    Raises:
        ModelNotFoundError: a local-looking path that does not exist, a directory without
            `model_index.json`, or a file that is not a model (says what it is).
        HubUnavailableError: a hub id while offline (or unreachable, with `check_hub`) and not cached.
        ConfigError: an empty id.
    """
    if not model or not model.strip():
        raise ConfigError(f"--model is empty; {_CHOICES}")
    if model in TOY_MODELS:
        from ablation.toyworld import _existing

        return str(_existing(TOY_MODELS[model]))
    path = Path(model).expanduser()
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{path} has no model_index.json; {_CHOICES}")
        return str(path)
    if path.is_file():
        return str(_check_model_file(path))
    if looks_local or path.suffix.lower() in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ModelNotFoundError(f"model path {model!r} does not exist; {_CHOICES}")
    if check_hub:
        check_hub_id(model)
    elif _hub_offline() and not _cached_on_hub(model):
        raise HubUnavailableError(f"model {model!r} is a Hugging Face hub id, but offline mode is on "
                                  f"(HF_HUB_OFFLINE=1) and it is not in the local cache; a local diffusers folder "
                                  f"or a single-file .safetensors checkpoint works offline")
    return model


def _check_model_file(path: Path) -> Path:
    """An existing file given as a model: a single-file checkpoint, or an error saying what it is."""
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelNotFoundError(f"{path} is a pickle checkpoint ({suffix}); only .safetensors are loaded (pickle "
                                 f"files can run code). Convert it to .safetensors, or {_CHOICES}")
    if suffix not in SINGLE_FILE_SUFFIXES:
        kind = "an empty file" if path.stat().st_size == 0 else f"a {suffix or 'extension-less'} file"
        raise ModelNotFoundError(f"{path} is {kind}, not a model; {_CHOICES}")
    from ablation.single_file import SingleFileError, describe_file

    try:
        problem = describe_file(path)
    except SingleFileError as e:
        raise ModelNotFoundError(str(e)) from None
    if problem:
        raise ModelNotFoundError(problem)
    return path


def dtype_kwarg(dtype) -> dict:
    """`{"dtype": dtype}` for diffusers versions that renamed `torch_dtype` (which then warns), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def embedded_configs(path: str) -> dict[str, dict] | None:
    """The diffusers configs `save_single_file` embedded in a checkpoint (`model_index`, `unet` or `transformer`,
    `vae`, ...), read from its header only; None for a file written elsewhere."""
    import json

    from ablation.single_file import CONFIG_KEY, _header

    _, metadata = _header(Path(path))
    return json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None


def single_file_config_dir(path: str, model_config: str | None = None) -> str:
    """The diffusers folder that holds a single-file checkpoint's configs when none are embedded: `model_config`,
    or the family's configs in the local Hugging Face cache.

    Raises:
        ConfigError: neither is available.
    """
    if model_config is not None:
        return str(Path(model_config).expanduser())
    from ablation.single_file import _cached_config_dir, model_type

    folder = _cached_config_dir(model_type(path))
    if folder is None:
        raise ConfigError(f"{path} is a single-file checkpoint whose diffusers configs are not available "
                          f"offline; pass --model-config DIR (a diffusers folder of the same family)")
    return str(folder)


def read_model_configs(model: str, model_config: str | None = None) -> tuple[dict, dict]:
    """The denoiser (UNet, or SD3/FLUX transformer) and VAE configs of a model without loading weights (for
    planning a run).

    For a single-file checkpoint they come from `model_config` (a diffusers folder of the same family),
    the configs embedded by `save_single_file`, or the local Hugging Face cache.

    Raises:
        ConfigError: the configs cannot be read.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    resolved = resolve_model(model)
    if is_single_file(resolved):
        configs = embedded_configs(resolved) if model_config is None else None
        if configs is not None:
            # an SD3 file has no UNet: its transformer's config takes the denoiser's place, as for an SD3 folder
            return dict(configs.get("unet") or configs["transformer"]), dict(configs["vae"])
        resolved = single_file_config_dir(resolved, model_config)
    elif model_config is not None:
        resolved = str(Path(model_config).expanduser())
    try:
        unet = UNet2DConditionModel.load_config(resolved, subfolder="unet")
        vae = AutoencoderKL.load_config(resolved, subfolder="vae")
    except (OSError, ValueError) as e:
        from ablation.architectures import read_transformer_configs

        transformer = read_transformer_configs(resolved)  # SD3 / FLUX: the transformer's config instead
        if transformer is not None:
            return transformer[0], transformer[1]
        raise ConfigError(f"cannot read the UNet/VAE config of model {model!r}: {e}") from None
    return dict(unet), dict(vae)


def torch_dtype(name: str):
    """`fp32` (or `no`, accelerate's word for it), `fp16`, `bf16` (`config.PRECISIONS`) -> the torch dtype."""
    import torch

    from ablation.config import PRECISIONS

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[PRECISIONS[name]]


def store_in_fp8(denoiser, group: str, compute_dtype) -> int:
    """`--fp8-base`: the denoiser's frozen weights stored in float8 (e4m3), each layer upcast to `compute_dtype`
    while it runs (diffusers' `enable_layerwise_casting`, with its default exceptions: norms, patch and position
    embeddings, the input / output projections). The modules of the trained `group` keep their dtype: a dense
    group trains its own weights, and LoRA's base layers stay as loaded, so the delta's fingerprint and the LoRA's
    base are the checkpoint's weights. Call it before LoRA is added (the adapters then carry no casting hooks).

    Returns:
        How many parameters are now stored in float8.
    """
    import re

    import torch
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    from ablation.params import group_parameter_names

    trained = set() if group == "embedding" else {n.rsplit(".", 1)[0] for n in group_parameter_names(denoiser, group)}
    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(f"^{re.escape(m)}$" for m in sorted(trained))
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                      skip_modules_pattern=patterns)
    return sum(p.numel() for p in denoiser.parameters() if p.dtype == torch.float8_e4m3fn)


def read_component_tensors(model_path: str, component: str, names) -> dict:
    """Only the named tensors of one component of a diffusers folder, read from its safetensors files in float32.

    The exact originals of a few weights (the base of LoRA-trained layers) for a model loaded in fp16/bf16, without
    loading the component again: safetensors reads tensor by tensor. Returns {} for anything but a diffusers
    folder (a single-file checkpoint: the caller merges onto the loaded weights); names not found are left out.
    """
    import torch
    from safetensors import safe_open

    folder = Path(model_path) / component
    if not folder.is_dir():
        return {}
    wanted, out = set(names), {}
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1 or "-of-" in f.name]  # not a `.fp16.` variant
    for file in plain or files:
        with safe_open(str(file), framework="pt") as f:
            for key in wanted.intersection(f.keys()) - set(out):
                out[key] = f.get_tensor(key).to(torch.float32)
    return out


def load_pipeline(model: str, torch_dtype=None, *, model_config: str | None = None, **kwargs):
    """Load any diffusers pipeline by id (see `resolve_model`), safetensors only, no remote code.

    Args:
        model: `toy`, a diffusers folder, a single-file `.safetensors` checkpoint or a hub id.
        torch_dtype: dtype to load in (default float32).
        model_config: for a single-file checkpoint, a diffusers folder of the same family to take the
            configs from (see `ablation.single_file.load_single_file`).
        **kwargs: forwarded to `from_pretrained` / `from_single_file`.
    """
    import torch

    resolved = resolve_model(model)
    if is_single_file(resolved):
        from ablation.single_file import load_single_file

        return load_single_file(resolved, config=model_config, torch_dtype=torch_dtype, **kwargs)
    from diffusers import DiffusionPipeline

    kwargs.setdefault("use_safetensors", True)
    index = Path(resolved) / "model_index.json"
    if index.is_file():  # a folder saved without a component (SD3 without T5): diffusers wants it passed as None
        import json

        for name, spec in json.loads(index.read_text()).items():
            if isinstance(spec, list) and spec == [None, None] and name not in ("feature_extractor", "image_encoder",
                                                                                "safety_checker"):
                kwargs.setdefault(name, None)
    return DiffusionPipeline.from_pretrained(resolved, **dtype_kwarg(torch_dtype or torch.float32), **kwargs)
