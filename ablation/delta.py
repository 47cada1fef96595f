"""The delta format: trained tensors + string metadata in one `delta.safetensors`.

A run's primary output holds only the trained tensors (a few MB for the cross-attention group instead
of a 4 GB pipeline), keyed `"<component>.<parameter name>"`, with string metadata (base model, its
config hash, a fingerprint of its weights, concepts, hyperparameters; see `make_metadata`).

Token-embedding rows are stored sparsely: `"text_encoder.<embedding weight>::rows"` (the changed
rows) plus `"...::index"` (their int64 row ids), because SD's full 49408 x 768 matrix is 150 MB.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ablation.config import ConfigError
from ablation.io import atomic_write_file
from ablation.merge import alias, base_name, components, dense_state_dict, unwrap

logger = logging.getLogger("ablation.checkpoint")

FORMAT = "ablation-delta/1"
DELTA_FILENAME = "delta.safetensors"
METADATA_FILENAME = "ablation.json"  # sidecar metadata next to exported pipelines and LoRA dirs
ROWS_SUFFIX, INDEX_SUFFIX = "::rows", "::index"
FINGERPRINT_KEY = "base_weights_fingerprint"
# Components that hold trainable weights of a text-to-image pipeline, in the order they are saved
# (`transformer`: the denoiser of SD3 / FLUX pipelines).
TRAINABLE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


class DeltaFileError(ConfigError):
    """A file given as a delta is not a readable safetensors file (truncated, random, another format)."""


class DeltaNotFoundError(ConfigError, FileNotFoundError):
    """A delta path that does not exist (also a FileNotFoundError, for callers that catch that)."""


class BaseMismatchError(ConfigError):
    """The delta was trained on other base weights than the model it is applied to."""


# --------------------------------------------------------------------------------------------------
# metadata and hashing
# --------------------------------------------------------------------------------------------------


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """Stable sha256 of a model config.

    Args:
        config: a dict or diffusers `FrozenDict` (e.g. `pipe.unet.config`).
        ignore: further keys to leave out (e.g. `in_channels` to compare inpainting variants).

    Returns:
        Hex digest of the sorted JSON, without private `_` keys (`_name_or_path`, `_diffusers_version`
        differ between an in-memory model and the same model loaded from disk).
    """
    skip = set(ignore)
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in skip}
    text = json.dumps(clean, sort_keys=True, default=str)  # tuples and lists serialise alike
    return hashlib.sha256(text.encode()).hexdigest()


def pipeline_config_hash(pipe, ignore: Iterable[str] = ()) -> str:
    """`config_hash` of the pipeline's denoiser config (UNet, or SD3/FLUX transformer): what a delta's names and
    shapes depend on."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return config_hash(denoiser.config, ignore)


def make_metadata(
    *,
    base_model: str,
    base_config_hash: str,
    concepts: Any,
    params: str,
    lora_rank: int,
    steps: int,
    learning_rate: float,
    variant: str,
    base_fingerprint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The string metadata stored in a delta (safetensors allows only str -> str).

    Args:
        base_model: model id the run started from (`toy`, a directory or a hub id).
        base_config_hash: `pipeline_config_hash` of that base model.
        concepts: JSON-serialisable description of the ablated concepts (list of dicts or dataclasses).
        params: parameter group (`cross-attn`, `attn`, `full-weight`, `embedding`).
        lora_rank: LoRA rank, 0 for a dense run.
        steps: optimisation steps done.
        learning_rate: the (scaled) learning rate used.
        variant: loss variant (`model-based` / `noise-based`).
        base_fingerprint: `base_weights_fingerprint` of the base taken before training; compared when
            the delta is applied.
        extra: further str -> str entries.
    """
    from ablation import __version__

    def _default(obj):
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        return str(obj)

    meta = {
        "format": FORMAT,
        "base_model": str(base_model),
        "base_config_hash": str(base_config_hash),
        "concepts": json.dumps(concepts, default=_default, sort_keys=True),
        "params": str(params),
        "lora_rank": str(int(lora_rank)),
        "steps": str(int(steps)),
        "learning_rate": repr(float(learning_rate)),
        "variant": str(variant),
        "ablation_version": __version__,
    }
    if base_fingerprint:
        meta[FINGERPRINT_KEY] = str(base_fingerprint)
    meta.update({str(k): str(v) for k, v in (extra or {}).items()})
    return meta


# --------------------------------------------------------------------------------------------------
# base-weights fingerprint
# --------------------------------------------------------------------------------------------------

_SAMPLES_PER_TENSOR = 8
_MAX_TENSORS = 128  # bounds the metadata size (~16 kB) for the `full` group


def _fingerprint_key(comp: str, name: str) -> str:
    return f"{comp}.{alias(base_name(name.removesuffix(ROWS_SUFFIX).removesuffix(INDEX_SUFFIX)))}"


def base_weights_fingerprint(pipe, param_names: Mapping[str, Sequence[str]]) -> str:
    """A cheap fingerprint of the base weights a delta is trained on: shapes and a fixed sample of values.

    Call it on the base model *before* training (LoRA adapters may be attached already; their base
    weights are read, not the merged ones) and before casting frozen weights to fp16/bf16, and pass the
    result to `make_metadata(base_fingerprint=...)`.

    It is a JSON string of `{key: "shape:values"}` for (up to 128, evenly chosen) trained tensors, 8
    float32 values each, rather than one hash: a pipeline loaded in fp16/bf16 has rounded values, and a
    LoRA export covers only a subset of a delta's tensors, so `fingerprints_match` compares the common
    tensors with the tolerance of the coarser dtype (exactly when both are float32).

    Args:
        pipe: the base pipeline.
        param_names: component -> parameter names, as for `trained_tensors` (adapter names allowed).

    Returns:
        The fingerprint string.
    """
    comps = components(pipe)
    keys: dict[str, torch.Tensor] = {}
    dtypes = set()
    for comp, names in param_names.items():
        if comp not in comps or not names:
            continue
        state = {alias(base_name(k)): v for k, v in unwrap(comps[comp]).state_dict().items() if ".lora_" not in k}
        for name in names:
            key = _fingerprint_key(comp, name)
            tensor = state.get(key.partition(".")[2])
            if tensor is not None:
                keys[key] = tensor
    chosen = sorted(keys)
    if len(chosen) > _MAX_TENSORS:
        step = len(chosen) / _MAX_TENSORS
        chosen = [chosen[int(i * step)] for i in range(_MAX_TENSORS)]
    entries = {}
    for key in chosen:
        tensor = keys[key].detach()
        dtypes.add(tensor.dtype)
        flat = tensor.reshape(-1)
        index = torch.linspace(0, max(flat.numel() - 1, 0), _SAMPLES_PER_TENSOR).round().long().to(flat.device)
        values = flat[index].to("cpu", torch.float32).numpy().tobytes() if flat.numel() else b""
        shape = "x".join(str(s) for s in tensor.shape)
        entries[key] = f"{shape}:{base64.b64encode(values).decode()}"
    coarse = "float32" if dtypes <= {torch.float32} else str(max(dtypes, key=_eps)).removeprefix("torch.")
    return json.dumps({"version": 1, "dtype": coarse, "tensors": entries}, sort_keys=True, separators=(",", ":"))


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def fingerprints_match(expected: str, actual: str) -> bool | None:
    """Compare two `base_weights_fingerprint`s on their common tensors.

    Returns:
        True / False, or None when they share no tensor (nothing to compare) or one is unreadable.
    """
    try:
        a, b = json.loads(expected), json.loads(actual)
        ta, tb = a["tensors"], b["tensors"]
    except (ValueError, KeyError, TypeError):
        return None
    common = sorted(set(ta) & set(tb))
    if not common:
        return None
    eps = max(_eps(getattr(torch, d, torch.float32)) for d in (a.get("dtype", "float32"), b.get("dtype", "float32")))
    for key in common:
        shape_a, _, va = ta[key].partition(":")
        shape_b, _, vb = tb[key].partition(":")
        if shape_a != shape_b:
            return False
        xa = torch.frombuffer(bytearray(base64.b64decode(va)), dtype=torch.float32)
        xb = torch.frombuffer(bytearray(base64.b64decode(vb)), dtype=torch.float32)
        if eps <= torch.finfo(torch.float32).eps:
            if not torch.equal(xa, xb):
                return False
        elif not torch.allclose(xa, xb, rtol=2 * eps, atol=1e-7):
            return False
    return True


def names_of(keys: Iterable[str]) -> dict[str, list[str]]:
    """Component -> parameter names of delta or LoRA keys (`unet.x.to_k.lora_A.weight` -> `x.to_k.weight`)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        comp, _, name = key.partition(".")
        name = base_name(name.removesuffix(ROWS_SUFFIX).removesuffix(INDEX_SUFFIX))
        if name.endswith(".alpha"):
            continue
        out.setdefault(comp, [])
        if name not in out[comp]:
            out[comp].append(name)
    return out


def check_fingerprint(pipe, metadata: Mapping[str, str], keys: Iterable[str], source: str | Path,
                      force: bool = False) -> None:
    """Refuse (BaseMismatchError) when the delta's recorded base fingerprint differs from `pipe`'s weights.

    Deltas without a fingerprint (written before it existed) pass. With `force=True` a mismatch is a warning.
    """
    expected = metadata.get(FINGERPRINT_KEY)
    if not expected:
        return
    actual = base_weights_fingerprint(pipe, names_of(keys))
    if fingerprints_match(expected, actual) is not False:
        return
    message = (f"{source} was trained on other base weights than this model's (base_model "
               f"{metadata.get('base_model', '?')!r}; same architecture, different values): the update would land on "
               f"weights it was not trained for")
    if force:
        logger.warning("%s; applying anyway (--force)", message)
        return
    raise BaseMismatchError(f"{message}. Pass the base model the run started from, or --force to apply it anyway")


# --------------------------------------------------------------------------------------------------
# trained tensors and delta files
# --------------------------------------------------------------------------------------------------


def _embedding_weight_name(module) -> str | None:
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    weight = emb.get_base_layer().weight if hasattr(emb, "get_base_layer") else emb.weight
    for name, param in module.named_parameters():
        if param is weight:
            return base_name(name)
    return None


def trained_tensors(
    pipe,
    param_names: Mapping[str, Sequence[str]],
    *,
    embedding_rows: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    base_pipe=None,
    base_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Collect the trained tensors of a pipeline for `save_delta`.

    Args:
        pipe: the trained pipeline (components may be LoRA-wrapped with `unet.add_adapter`).
        param_names: component -> names of the trained parameters. For LoRA components the adapter
            parameter names (`...to_k.lora_A.default.weight`) or the base names may be given; both map
            to the base weight, whose merged value (W + scale * B @ A, in float32) is returned.
        embedding_rows: token ids whose embedding rows were trained (a sequence, or component -> ids).
            When the token-embedding matrix is among the trained names, only these rows are stored
            (`::rows` / `::index` keys). Without it the full matrix is stored, with a warning.
        base_pipe: the float32 base model; needed for an exact LoRA merge when `pipe`'s frozen weights were
            cast to fp16/bf16 for mixed-precision training (their rounding would otherwise stay in the delta).
        base_states: instead of `base_pipe`, component -> {name: float32 original} of just the weights the
            adapters merge into (`ablation.models.read_component_tensors`).

    Returns:
        `"<component>.<name>"` -> CPU float32 contiguous copies.

    Raises:
        KeyError: a component or parameter name does not exist.
    """
    comps = components(pipe)
    base_comps = components(base_pipe) if base_pipe is not None else {}
    out: dict[str, torch.Tensor] = {}
    for comp, names in param_names.items():
        if not names:
            continue
        if comp not in comps:
            raise KeyError(f"pipeline {type(pipe).__name__} has no component {comp!r}; it has {sorted(comps)}")
        module = comps[comp]
        base_state = base_comps[comp].state_dict() if comp in base_comps else (base_states or {}).get(comp)
        state = dense_state_dict(module, base=base_state)
        emb_name = _embedding_weight_name(module) if comp.startswith("text_encoder") else None
        aliases = {alias(k): k for k in state}
        for given in dict.fromkeys(base_name(n) for n in names):  # dedupe, keep order
            name = given if given in state else aliases.get(alias(given))
            if name is None:
                raise KeyError(f"{comp} has no parameter {given!r}")
            tensor = state[name].detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            rows = _rows_for(comp, embedding_rows)
            if name == emb_name and rows is not None:
                index = torch.as_tensor(sorted(set(int(i) for i in rows)), dtype=torch.int64)
                out[f"{comp}.{name}{ROWS_SUFFIX}"] = tensor[index].contiguous()
                out[f"{comp}.{name}{INDEX_SUFFIX}"] = index
                continue
            if name == emb_name:
                logger.warning("storing the full token-embedding matrix of %s (%s); pass embedding_rows to store "
                               "only the trained rows", comp, tuple(tensor.shape))
            out[f"{comp}.{name}"] = tensor
    return out


def _rows_for(comp: str, rows) -> Sequence[int] | None:
    if rows is None or not isinstance(rows, Mapping):
        return rows
    return rows.get(comp)


def save_delta(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write tensors and metadata as safetensors, atomically (`ablation.io.atomic_write_file`).

    Raises:
        TypeError: a metadata key or value is not a str (safetensors only stores str -> str).
    """
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"delta metadata must map str to str; not str: {bad} (use make_metadata)")
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata)))


def check_safetensors_file(path: str | Path, what: str = "delta file") -> dict[str, str]:
    """Validate a safetensors file's header and extent without reading its tensors; return its metadata.

    Cheap (reads the header only), so CLIs call it before loading any model.

    Raises:
        DeltaNotFoundError: the file does not exist.
        DeltaFileError: the file is truncated, random, empty or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise DeltaNotFoundError(f"{what} {path} does not exist")
    size = path.stat().st_size

    def bad(reason: str) -> DeltaFileError:
        return DeltaFileError(f"{path} is not a valid {what} ({reason}); pass a run's delta.safetensors as written "
                              f"by `ablate train`")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise bad("truncated or not safetensors: the header length exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise bad(f"tensor {key!r} has no data offsets")
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        raise bad(f"truncated: {size} bytes, the header needs {8 + n + end}")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a delta file: (tensors, metadata). Warns when the file is not an `ablation-delta/1`.

    Raises:
        DeltaNotFoundError: no such file.
        DeltaFileError: not a readable safetensors file (truncated, random bytes, ...).
    """
    path = Path(path)
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise DeltaFileError(f"{path} is not a valid delta file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != FORMAT:
        if any(k.startswith("lora_") or ".lora_" in k for k in tensors):
            raise DeltaFileError(f"{path} is a LoRA weights file, not a delta: pass the LoRA folder that holds "
                                 f"pytorch_lora_weights.safetensors (a kohya file is for AUTOMATIC1111/ComfyUI)")
        logger.warning("%s is not an %s file (format=%r); applying it anyway", path, FORMAT, metadata.get("format"))
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a delta file, or of an exported directory's `ablation.json` ({} when absent).

    Raises:
        DeltaFileError: `path` is a file that is not valid safetensors.
    """
    path = Path(path)
    if path.is_file():
        return check_safetensors_file(path)
    sidecar = path / METADATA_FILENAME
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise DeltaFileError(f"{sidecar} is not valid JSON ({e}); delete it or export the run again") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------------
# applying a delta
# --------------------------------------------------------------------------------------------------


def apply_delta(pipe, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a delta's tensors into the pipeline's components (in place, cast to each parameter's dtype/device).

    Args:
        pipe: target pipeline.
        tensors: from `load_delta` / `trained_tensors`.
        strict: when True, any missing key or shape mismatch raises before anything is changed. When
            False they are skipped with a warning (e.g. `conv_in` of a `full-weight` delta on a 9-channel
            inpainting UNet); a delta of which nothing fits still raises.

    Raises:
        ValueError: missing components/parameters or shape mismatches (strict), or nothing applicable.
    """
    comps = components(pipe)
    states = {name: {alias(k): v for k, v in m.state_dict(keep_vars=True).items() if ".lora_" not in k}
              for name, m in comps.items()}
    plan: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # key, target, value, index
    missing: list[str] = []
    mismatched: list[str] = []
    for key, value in tensors.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        comp, _, name = key.partition(".")
        is_rows = name.endswith(ROWS_SUFFIX)
        name = alias(name.removesuffix(ROWS_SUFFIX))
        target = states.get(comp, {}).get(name)
        if target is None:
            missing.append(key)
            continue
        index = None
        if is_rows:
            index = tensors.get(key.removesuffix(ROWS_SUFFIX) + INDEX_SUFFIX)
            if index is None:
                missing.append(key.removesuffix(ROWS_SUFFIX) + INDEX_SUFFIX)
                continue
            ok = (value.ndim == 2 and value.shape[1:] == target.shape[1:] and len(index) == len(value)
                  and (len(index) == 0 or int(index.max()) < target.shape[0]))
        else:
            ok = tuple(value.shape) == tuple(target.shape)
        if not ok:
            mismatched.append(f"{key}: delta {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        plan.append((key, target, value, index))
    problems = _describe(missing, mismatched, comps)
    if problems and strict:
        raise ValueError(f"delta does not fit {type(pipe).__name__}: {problems}. Is it a delta for another model "
                         f"architecture? (use strict=False to skip these keys)")
    if not plan and tensors:
        raise ValueError(f"no tensor of the delta fits {type(pipe).__name__}: {problems}")
    if problems:
        logger.warning("skipped part of the delta: %s", problems)
    with torch.no_grad():
        for _, target, value, index in plan:
            value = value.to(device=target.device, dtype=target.dtype)
            if index is None:
                target.copy_(value)
            else:
                target[index.to(target.device)] = value


def _describe(missing: list[str], mismatched: list[str], comps: Mapping[str, Any]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) not in the model (components: {sorted(comps)}): {missing[:5]}"
                     + (" ..." if len(missing) > 5 else ""))
    if mismatched:
        more = " ..." if len(mismatched) > 5 else ""
        parts.append(f"{len(mismatched)} shape mismatch(es): {mismatched[:5]}{more}")
    return "; ".join(parts)
