"""Deltas, exports and loading an ablated pipeline.

A run's primary output is `delta.safetensors`: only the trained tensors (a few MB for the
cross-attention group instead of a 4 GB pipeline), keyed `"<component>.<parameter name>"`, with
string metadata (base model, its config hash, concepts, hyperparameters; see `make_metadata`).
From it, `export_outputs` / `ablate export` write a complete diffusers pipeline or a LoRA directory
loadable with `pipe.load_lora_weights`, and `load_ablated_pipeline` rebuilds the ablated model from
a base model plus any of these.

Token-embedding rows are stored sparsely: `"text_encoder.<embedding weight>::rows"` (the changed
rows) plus `"...::index"` (their int64 row ids), because SD's full 49408 x 768 matrix is 150 MB.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "ablation-delta/1"
DELTA_FILENAME = "delta.safetensors"
METADATA_FILENAME = "ablation.json"  # sidecar metadata next to exported pipelines and LoRA dirs
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name
ROWS_SUFFIX, INDEX_SUFFIX = "::rows", "::index"
EXPORT_KINDS = ("pipeline", "lora")
# Components that hold trainable weights of a text-to-image pipeline, in the order they are saved.
TRAINABLE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


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
    """`config_hash` of the pipeline's UNet config: what a delta's names and shapes depend on."""
    return config_hash(pipe.unet.config, ignore)


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
        extra: further str -> str entries.
    """
    from ablation import __version__

    def _default(obj):
        if hasattr(obj, "__dataclass_fields__"):
            import dataclasses

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
    meta.update({str(k): str(v) for k, v in (extra or {}).items()})
    return meta


# --------------------------------------------------------------------------------------------------
# peft helpers
# --------------------------------------------------------------------------------------------------


def _components(pipe) -> dict[str, nn.Module]:
    return {name: _unwrap(m) for name, m in pipe.components.items() if isinstance(m, nn.Module)}


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip torch.compile, DDP and `PeftModel` wrappers (their parameter names carry prefixes)."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "get_base_model") and hasattr(module, "peft_config"):
            module = module.get_base_model()
        else:
            return module


def _tuner_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def _layer_delta(layer) -> torch.Tensor | None:
    """The weight delta a LoRA layer adds in its current state (None when disabled or merged)."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    total = None
    for adapter in layer.active_adapters:
        if adapter not in getattr(layer, "lora_A", {}) and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("DoRA adapters cannot be merged into a delta; train plain LoRA")
        delta = layer.get_delta_weight(adapter)
        total = delta if total is None else total + delta
    return total


def _base_name(name: str) -> str:
    """Map a peft parameter name to the base weight it modifies (`x.to_k.lora_A.default.weight` -> `x.to_k.weight`)."""
    if ".lora_" in name:
        return name.split(".lora_")[0] + ".weight"
    return name.replace(".base_layer", "")


def dense_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict under base names with LoRA adapters merged (W + scale * B @ A); the module is untouched.

    Tensors not touched by adapters are the module's own (no copy), so this is cheap.
    """
    module = _unwrap(module)
    state = {k: v for k, v in module.state_dict().items() if ".lora_" not in k}
    layers = _tuner_layers(module)
    if not layers:
        return state
    out = {_base_name(k): v for k, v in state.items()}
    with torch.no_grad():
        for name, layer in layers.items():
            delta = _layer_delta(layer)
            if delta is not None:
                key = f"{name}.weight"
                out[key] = out[key] + delta.to(out[key].dtype)
    return out


def dense_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with LoRA layers merged and removed; shares every untouched tensor with the original."""
    module = _unwrap(module)
    layers = _tuner_layers(module)
    if not layers:
        return module
    # Deep-copy the module tree but not the tensors: memo maps each tensor to itself.
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    clone = copy.deepcopy(module, memo)
    for name in sorted(layers, key=lambda n: n.count("."), reverse=True):  # innermost first
        layer = clone.get_submodule(name)
        base = layer.get_base_layer()
        delta = _layer_delta(layer)
        if delta is not None:
            with torch.no_grad():
                base.weight = nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in clone.__dict__:
            delattr(clone, attr)
    return clone


def dense_pipeline(pipe):
    """The pipeline itself, or a copy whose LoRA-wrapped components are replaced by merged dense copies."""
    comps = dict(pipe.components)
    changed = False
    for name, module in comps.items():
        if isinstance(module, nn.Module) and _tuner_layers(_unwrap(module)):
            comps[name] = dense_copy(module)
            changed = True
    if not changed:
        return pipe
    init_keys = _init_keys(pipe)
    # Non-component init arguments (requires_safety_checker, ...) live in the pipeline config.
    extra = {k: v for k, v in pipe.config.items() if k in init_keys and k not in comps and not k.startswith("_")}
    return type(pipe)(**{k: v for k, v in comps.items() if k in init_keys}, **extra)


def _init_keys(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__init__).parameters) - {"self"}


# --------------------------------------------------------------------------------------------------
# trained tensors and delta files
# --------------------------------------------------------------------------------------------------


def _embedding_weight_name(module: nn.Module) -> str | None:
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    weight = emb.get_base_layer().weight if hasattr(emb, "get_base_layer") else emb.weight
    for name, param in module.named_parameters():
        if param is weight:
            return _base_name(name)
    return None


def trained_tensors(
    pipe,
    param_names: Mapping[str, Sequence[str]],
    *,
    embedding_rows: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Collect the trained tensors of a pipeline for `save_delta`.

    Args:
        pipe: the trained pipeline (components may be LoRA-wrapped with `unet.add_adapter`).
        param_names: component -> names of the trained parameters. For LoRA components the adapter
            parameter names (`...to_k.lora_A.default.weight`) or the base names may be given; both map
            to the base weight, whose merged value (W + scale * B @ A) is returned.
        embedding_rows: token ids whose embedding rows were trained (a sequence, or component -> ids).
            When the token-embedding matrix is among the trained names, only these rows are stored
            (`::rows` / `::index` keys). Without it the full matrix is stored, with a warning.

    Returns:
        `"<component>.<name>"` -> CPU float32 contiguous copies.

    Raises:
        KeyError: a component or parameter name does not exist.
    """
    comps = _components(pipe)
    out: dict[str, torch.Tensor] = {}
    for comp, names in param_names.items():
        if not names:
            continue
        if comp not in comps:
            raise KeyError(f"pipeline {type(pipe).__name__} has no component {comp!r}; it has {sorted(comps)}")
        module = comps[comp]
        state = dense_state_dict(module)
        emb_name = _embedding_weight_name(module) if comp.startswith("text_encoder") else None
        aliases = {_alias(k): k for k in state}
        for given in dict.fromkeys(_base_name(n) for n in names):  # dedupe, keep order
            name = given if given in state else aliases.get(_alias(given))
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
    """Write tensors and metadata as safetensors, atomically (temporary name in the same dir, then `os.replace`).

    Raises:
        TypeError: a metadata key or value is not a str (safetensors only stores str -> str).
    """
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"delta metadata must map str to str; not str: {bad} (use make_metadata)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        save_file(data, str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a delta file: (tensors, metadata). Warns when the file is not an `ablation-delta/1`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if metadata.get("format") != FORMAT:
        logger.warning("%s is not an %s file (format=%r); applying it anyway", path, FORMAT, metadata.get("format"))
    return tensors, metadata


# --------------------------------------------------------------------------------------------------
# applying a delta
# --------------------------------------------------------------------------------------------------


def _alias(name: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level, peft inserts `.base_layer`: accept both spellings.
    return name.replace(".base_layer", "").removeprefix("text_model.")


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
    comps = _components(pipe)
    states = {name: {_alias(k): v for k, v in m.state_dict(keep_vars=True).items() if ".lora_" not in k}
              for name, m in comps.items()}
    plan: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # key, target, value, index
    missing: list[str] = []
    mismatched: list[str] = []
    for key, value in tensors.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        comp, _, name = key.partition(".")
        is_rows = name.endswith(ROWS_SUFFIX)
        name = _alias(name.removesuffix(ROWS_SUFFIX))
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
    problems = _describe(missing, mismatched, pipe)
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


def _describe(missing: list[str], mismatched: list[str], pipe) -> str:
    parts = []
    if missing:
        comps = sorted(_components(pipe))
        parts.append(f"{len(missing)} key(s) not in the model (components: {comps}): {missing[:5]}"
                     + (" ..." if len(missing) > 5 else ""))
    if mismatched:
        more = " ..." if len(mismatched) > 5 else ""
        parts.append(f"{len(mismatched)} shape mismatch(es): {mismatched[:5]}{more}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# exports
# --------------------------------------------------------------------------------------------------


def _atomic_dir(out_dir: Path, write) -> None:
    """Run `write(tmp_dir)` then move tmp_dir to out_dir, replacing it; never leaves a half-written out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _write_metadata(directory: Path, metadata: Mapping[str, str]) -> None:
    (directory / METADATA_FILENAME).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, out_dir: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save a complete diffusers pipeline (safetensors, LoRA merged) atomically, with `ablation.json` metadata."""
    dense = dense_pipeline(pipe)

    def write(tmp: Path) -> None:
        dense.save_pretrained(tmp, safe_serialization=True)
        if metadata:
            _write_metadata(tmp, metadata)

    _atomic_dir(Path(out_dir), write)


def lora_state_from_pipe(pipe, adapter_name: str = "default") -> dict[str, dict] | None:
    """LoRA adapters of a pipeline's components as `{component: {"state_dict": ..., "config": ...}}`.

    `state_dict` is in peft's saved format (`...to_k.lora_A.weight`, what `get_peft_model_state_dict`
    returns) and `config` the `LoraConfig` as a dict (carries `lora_alpha`, so the scale survives).
    Returns None when no component has adapters.
    """
    from peft.utils import get_peft_model_state_dict

    out = {}
    for comp, module in _components(pipe).items():
        layers = _tuner_layers(module)
        if not layers:
            continue
        config = getattr(module, "peft_config", {}).get(adapter_name)
        if config is not None:
            state = get_peft_model_state_dict(module, adapter_name=adapter_name)
            config = config.to_dict()
        else:  # adapters injected with peft.inject_adapter_in_model: rebuild what peft would save
            state, config = _manual_lora_state(layers, adapter_name)
        out[comp] = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()}, "config": config}
    return out or None


def _manual_lora_state(layers: Mapping[str, nn.Module], adapter: str) -> tuple[dict, dict]:
    from peft import LoraConfig

    state, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        if adapter not in getattr(layer, "lora_A", {}):
            continue
        state[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight
        state[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight
        ranks[name] = layer.r[adapter]
        alphas[name] = layer.scaling[adapter] * layer.r[adapter]
    r = max(ranks.values())
    config = LoraConfig(r=r, lora_alpha=alphas[max(ranks, key=ranks.get)], target_modules=sorted(layers),
                        rank_pattern=ranks, alpha_pattern=alphas)
    return state, config.to_dict()


def svd_lora_state(
    base_pipe, new_tensors: Mapping[str, torch.Tensor], rank: int = 16
) -> tuple[dict[str, dict], float]:
    """Approximate a dense delta with LoRA factors by truncated SVD (lossy below full rank).

    Each 2-D `nn.Linear` weight in `new_tensors` whose value differs from the base becomes
    `B @ A ~= new - base` with `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T` (alpha = rank, so scale 1).
    Matrices whose rank is below `rank` are zero-padded, which is exact. Changed non-Linear tensors
    (biases, norms, convolutions, embedding rows) cannot be expressed and are dropped with a warning.

    Args:
        base_pipe: the base model the delta was trained from.
        new_tensors: `"<component>.<name>"` -> trained values (a delta file's tensors).
        rank: LoRA rank.

    Returns:
        (lora_state as in `lora_state_from_pipe`, overall relative Frobenius reconstruction error).

    Raises:
        ValueError: nothing in the delta is representable as LoRA.
    """
    from peft import LoraConfig

    comps = _components(base_pipe)
    # alias -> (the model's own name, tensor): delta names may be spelled for another transformers version
    base_states = {comp: {_alias(k): (k, v) for k, v in dense_state_dict(m).items()} for comp, m in comps.items()
                   if comp in TRAINABLE_COMPONENTS}
    per_comp: dict[str, dict[str, torch.Tensor]] = {}
    dropped, err2, norm2 = [], 0.0, 0.0
    for key, new in new_tensors.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        comp, _, name = key.partition(".")
        name, base = base_states.get(comp, {}).get(_alias(name), (name, None))
        if key.endswith(ROWS_SUFFIX) or base is None:
            dropped.append(key)
            continue
        if tuple(base.shape) != tuple(new.shape):
            raise ValueError(f"{key}: delta shape {tuple(new.shape)} differs from the base's {tuple(base.shape)}; "
                             f"is --base the model this run was trained on?")
        delta = new.detach().to("cpu", torch.float64) - base.detach().to("cpu", torch.float64)
        norm = float(delta.norm())
        if norm == 0.0:
            continue  # untouched (the dense export path passes every weight)
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(comps[comp].get_submodule(module_name), nn.Linear):
            dropped.append(key)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        # Zero-pad to a uniform rank: exact, and one LoraConfig.r serves every matrix.
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        err2 += float((delta - b @ a).norm()) ** 2
        norm2 += norm**2
        state = per_comp.setdefault(comp, {})
        state[f"{module_name}.lora_A.weight"] = a.float().contiguous()
        state[f"{module_name}.lora_B.weight"] = b.float().contiguous()
    if dropped:
        logger.warning("LoRA export drops %d tensor(s) that are not Linear weights (lossy): %s", len(dropped),
                       dropped[:5])
    if not per_comp:
        raise ValueError("nothing in this delta can be expressed as LoRA (only Linear weights can); "
                         "export it as a pipeline instead")
    rel = (err2 / norm2) ** 0.5 if norm2 else 0.0
    logger.info("SVD LoRA export at rank %d: relative reconstruction error %.3g", rank, rel)
    out = {}
    for comp, state in per_comp.items():
        targets = sorted({k.split(".lora_")[0] for k in state})
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        out[comp] = {"state_dict": state, "config": config.to_dict()}
    return out, rel


def save_lora(pipe_cls, out_dir: str | Path, lora_state: Mapping[str, dict],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA directory with the pipeline class's `save_lora_weights` (atomic), plus `ablation.json`."""
    kwargs: dict[str, Any] = {}
    for comp, entry in lora_state.items():
        if comp not in TRAINABLE_COMPONENTS:
            raise ValueError(f"cannot save LoRA layers for component {comp!r}")
        kwargs[f"{comp}_lora_layers"] = entry["state_dict"]
        if entry.get("config") is not None:
            kwargs[f"{comp}_lora_adapter_metadata"] = dict(entry["config"])

    def write(tmp: Path) -> None:
        pipe_cls.save_lora_weights(str(tmp), **kwargs)
        if metadata:
            _write_metadata(tmp, metadata)

    _atomic_dir(Path(out_dir), write)


def export_outputs(
    pipe,
    output_dir: str | Path,
    exports: Sequence[str],
    lora_state: Mapping[str, dict] | None,
    metadata: Mapping[str, str],
    *,
    rank: int = 16,
    base_pipe=None,
) -> None:
    """Write the requested exports of a trained pipeline under `output_dir`.

    Args:
        pipe: the trained pipeline (dense, or with LoRA adapters).
        output_dir: run directory; exports go to `output_dir/pipeline` and `output_dir/lora`.
        exports: any of `pipeline` (complete diffusers pipeline with the ablation applied) and `lora`
            (directory for `pipe.load_lora_weights`).
        lora_state: the trained adapters (`lora_state_from_pipe`). When None and the pipeline carries no
            adapters (a dense run), the dense delta of every Linear weight is approximated by truncated
            SVD at `rank` -- lossy below full rank; the relative reconstruction error is logged.
        metadata: `make_metadata` output, also written as `ablation.json` in each export.
        rank: SVD rank for the dense -> LoRA conversion.
        base_pipe: the base model for that conversion; loaded from `metadata["base_model"]` when None.
    """
    unknown = set(exports) - set(EXPORT_KINDS)
    if unknown:
        raise ValueError(f"unknown export(s) {sorted(unknown)}; choose from {EXPORT_KINDS}")
    output_dir = Path(output_dir)
    if "pipeline" in exports:
        save_pipeline(pipe, output_dir / "pipeline", metadata)
        logger.info("wrote %s", output_dir / "pipeline")
    if "lora" in exports:
        state = lora_state or lora_state_from_pipe(pipe)
        if state is None:
            if base_pipe is None:
                from ablation.models import load_pipeline

                base_pipe = load_pipeline(metadata["base_model"])
            new = {f"{comp}.{k}": v for comp, m in _components(pipe).items() if comp in TRAINABLE_COMPONENTS
                   for k, v in m.state_dict().items() if k.endswith(".weight") and v.ndim == 2}
            state, _ = svd_lora_state(base_pipe, new, rank)
        save_lora(type(pipe), output_dir / "lora", state, metadata)
        logger.info("wrote %s", output_dir / "lora")


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a delta file, or of an exported directory's `ablation.json` ({} when absent)."""
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    sidecar = path / METADATA_FILENAME
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}


def resolve_delta(path: str | Path) -> tuple[str, Path]:
    """Classify what a delta path points at: ("delta", file), ("lora", dir) or ("pipeline", dir).

    A run's output directory resolves to its `delta.safetensors`, else its `lora/`, else its `pipeline/`.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return "delta", path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a delta file nor a directory")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / DELTA_FILENAME).is_file():
        return "delta", path / DELTA_FILENAME
    if (path / LORA_WEIGHT_NAME).is_file():
        return "lora", path
    if (path / "lora" / LORA_WEIGHT_NAME).is_file():
        return "lora", path / "lora"
    if (path / "pipeline" / "model_index.json").is_file():
        return "pipeline", path / "pipeline"
    raise FileNotFoundError(f"{path} has no {DELTA_FILENAME}, {LORA_WEIGHT_NAME}, lora/ or pipeline/")


def _load_base(base_model, torch_dtype, pipeline_cls, **kwargs):
    if not isinstance(base_model, str | Path):
        return base_model  # already a pipeline object
    from ablation.models import load_pipeline, resolve_model

    if pipeline_cls is None:
        return load_pipeline(str(base_model), torch_dtype=torch_dtype, **kwargs)
    kwargs.setdefault("use_safetensors", True)
    return pipeline_cls.from_pretrained(resolve_model(str(base_model)), torch_dtype=torch_dtype or torch.float32,
                                        **kwargs)


def check_base(pipe, metadata: Mapping[str, str], source: str | Path) -> None:
    """Warn when the delta was trained on a base model with another UNet config than `pipe`'s."""
    expected = metadata.get("base_config_hash")
    actual = pipeline_config_hash(pipe)
    if expected and expected != actual:
        logger.warning("%s was trained on base model %r whose UNet config differs from this pipeline's "
                       "(hash %s... vs %s...); the ablation may not transfer (expected for an inpainting variant "
                       "of the same family)", source, metadata.get("base_model", "?"), expected[:12], actual[:12])


def load_ablated_pipeline(
    base_model,
    delta_path: str | Path,
    *,
    torch_dtype=None,
    pipeline_cls=None,
    strict: bool | None = None,
    **kwargs,
):
    """Load a base pipeline with an ablation applied.

    Args:
        base_model: `toy`, a diffusers directory, a hub id, or an already loaded pipeline object.
        delta_path: a `delta.safetensors`, a run's output directory (its delta, else `lora/`, else
            `pipeline/`), a LoRA directory (applied with `load_lora_weights`, adapters kept unfused), or a
            complete pipeline directory (loaded directly; `base_model` is then ignored).
        torch_dtype: dtype to load in (default float32).
        pipeline_cls: pipeline class, e.g. `StableDiffusionInpaintPipeline` to use the delta of a
            text-to-image run for inpainting with the same family (attention weights share names and
            shapes; only `conv_in` differs).
        strict: passed to `apply_delta`. None: strict unless the UNet input channels differ from 4
            (inpainting, upscaling), where a `full-weight` delta's `conv_in` is skipped with a warning.
        **kwargs: forwarded to `from_pretrained`.

    Returns:
        The pipeline.
    """
    kind, path = resolve_delta(delta_path)
    if kind == "pipeline":
        return _load_base(path, torch_dtype, pipeline_cls, **kwargs)
    pipe = _load_base(base_model, torch_dtype, pipeline_cls, **kwargs)
    metadata = read_metadata(path)
    check_base(pipe, metadata, path)
    if kind == "lora":
        pipe.load_lora_weights(str(path))
        return pipe
    tensors, _ = load_delta(path)
    if strict is None:
        strict = getattr(pipe.unet.config, "in_channels", 4) == 4
    apply_delta(pipe, tensors, strict=strict)
    return pipe
