"""Apply an ablation to an already loaded base pipeline and take it off again, without reloading.

Evaluating several runs against one base model loads the base once: for each run, the base values
of exactly the tensors its delta touches are copied aside, the delta is applied in place, and the
copies are written back afterwards (`ablated(pipe, source)`). LoRA directories are loaded as a
named adapter and deleted afterwards (unfused adapters never modify the base weights). A complete
pipeline directory is turned into a delta once by comparing its weights with the base's.

Inpainting models: a delta of a text-to-image run applies to the inpainting UNet of the same family
because attention weights share names and shapes; only `conv_in` (4 vs 9 input channels) differs,
and non-strict application skips it (`strict=None` below: strict only for 4-channel UNets).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ablation.checkpoint import INDEX_SUFFIX, ROWS_SUFFIX, apply_delta, check_base, load_delta, resolve_delta

logger = logging.getLogger(__name__)
#: components whose weights an ablation can change
WEIGHT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_ADAPTER = "ablation_eval"


def _name_variants(name: str) -> tuple[str, ...]:
    # Same tolerance as `apply_delta`: transformers 5 has no `text_model.` level in CLIPTextModel's
    # state dict, transformers 4 had; peft inserts `.base_layer`.
    bare = name.replace(".base_layer", "").removeprefix("text_model.")
    return (name, bare, "text_model." + bare)


def _find(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    for variant in _name_variants(name):
        if variant in state:
            return state[variant]
    return None


def snapshot(pipe, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the pipeline's current values of the tensors a delta touches, in the delta's format.

    Applying the result with `apply_delta(pipe, saved, strict=False)` undoes the delta. Sparse
    embedding rows (`::rows` / `::index`) are saved as the same rows.
    """
    states = {name: m.state_dict(keep_vars=True) for name, m in pipe.components.items() if isinstance(m, nn.Module)}
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            if key.endswith(INDEX_SUFFIX):
                continue
            comp, _, name = key.partition(".")
            current = _find(states.get(comp, {}), name.removesuffix(ROWS_SUFFIX))
            if current is None:
                continue  # not in this model: apply_delta(strict=False) skips it as well
            if key.endswith(ROWS_SUFFIX):
                index_key = key.removesuffix(ROWS_SUFFIX) + INDEX_SUFFIX
                index = tensors[index_key]
                saved[key] = current[index.to(current.device)].detach().to("cpu", copy=True)
                saved[index_key] = index
            elif tuple(current.shape) == tuple(value.shape):
                saved[key] = current.detach().to("cpu", copy=True)
    return saved


def diff_tensors(base, other) -> dict[str, torch.Tensor]:
    """The tensors in which two pipelines of the same architecture differ, as a delta (`component.name`).

    Args:
        base: the base pipeline.
        other: a pipeline loaded from an ablated pipeline directory.

    Raises:
        ValueError: a component's parameter names or shapes differ (another architecture).
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for comp in WEIGHT_COMPONENTS:
            a, b = getattr(base, comp, None), getattr(other, comp, None)
            if not isinstance(a, nn.Module) or not isinstance(b, nn.Module):
                continue
            sa, sb = a.state_dict(), b.state_dict()
            if sa.keys() != sb.keys():
                raise ValueError(f"{comp} of the ablated pipeline has other parameters than the base model's")
            for name, va in sa.items():
                vb = sb[name]
                if va.shape != vb.shape:
                    raise ValueError(f"{comp}.{name}: shape {tuple(vb.shape)} vs base {tuple(va.shape)}")
                if not torch.equal(va, vb.to(va.device, va.dtype)):
                    out[f"{comp}.{name}"] = vb.detach().to("cpu", copy=True)
    return out


class DeltaCache:
    """Loads each ablation source once (delta file, run dir, LoRA dir or pipeline dir) per evaluation."""

    def __init__(self) -> None:
        self._tensors: dict[str, tuple[str, object]] = {}

    def get(self, pipe, source: str | Path) -> tuple[str, object]:
        """`("delta", tensors)` or `("lora", path)` for a source (see `ablation.checkpoint.resolve_delta`)."""
        key = str(Path(source).expanduser().resolve())
        if key not in self._tensors:
            kind, path = resolve_delta(source)
            if kind == "delta":
                tensors, metadata = load_delta(path)
                check_base(pipe, metadata, path, keys=tensors)  # refuses a delta trained on other base weights
                self._tensors[key] = ("delta", tensors)
            elif kind == "lora":
                self._tensors[key] = ("lora", path)
            else:
                from ablation.models import load_pipeline

                other = load_pipeline(str(path))
                self._tensors[key] = ("delta", diff_tensors(pipe, other))
                del other
        return self._tensors[key]


@contextlib.contextmanager
def ablated(pipe, source: str | Path | None, *, cache: DeltaCache | None = None,
            strict: bool | None = None) -> Iterator:
    """Context manager: the pipeline with the ablation of `source` applied, restored on exit.

    Args:
        pipe: a loaded base pipeline (any of text-to-image, inpainting, upscaling of the same family).
        source: delta file, run output dir, LoRA dir or pipeline dir; None yields the base unchanged.
        cache: reuse loaded deltas across calls.
        strict: passed to `apply_delta`; None: strict for 4-channel UNets only, so that a text-to-image
            delta applies to a 9-channel inpainting UNet without its `conv_in`.
    """
    if source is None:
        yield pipe
        return
    kind, payload = (cache or DeltaCache()).get(pipe, source)
    if kind == "lora":
        pipe.load_lora_weights(str(payload), adapter_name=_ADAPTER)
        try:
            yield pipe
        finally:
            pipe.delete_adapters(_ADAPTER)
        return
    if strict is None:  # MMDiT pipelines have no UNet and no inpainting variant here: strict
        unet = getattr(pipe, "unet", None)
        strict = unet is None or getattr(unet.config, "in_channels", 4) == 4
    saved = snapshot(pipe, payload)
    apply_delta(pipe, payload, strict=strict)
    try:
        yield pipe
    finally:
        apply_delta(pipe, saved, strict=False)
