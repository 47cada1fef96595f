"""Where a pipeline's components sit during a run: `--offload-text-encoders`.

By default every component is on the accelerator until the prompts are encoded; then the text encoders leave it
(`ablation.trainer`). Anchor sampling happens before that, so it holds the denoiser and every text encoder at once:
SD3.5-large's 15 GB transformer beside 10.4 GB of text encoders, FLUX.1-dev's beside its 9.1 GB T5. With
offloading the text encoders stay in CPU memory and only visit the accelerator to encode, while the denoiser waits
in CPU memory (`encoding`): the two never share it.

Why not diffusers' `enable_model_cpu_offload` (accelerate's hooks): it moves every component in and out around
each pipeline call, i.e. the text encoders and the denoiser once per anchor batch (SD3.5-large: ~25 GB over PCIe
per anchor at batch 1). Here the prompts of every batch are encoded in one visit
(`Architecture.sampling_conditioning`), so a sampled anchor set moves the denoiser out and back once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def place(pipe, device, offload_text_encoders: bool) -> None:
    """Every component on `device`, except the text encoders when they are offloaded (they stay in CPU memory).

    Component by component, so no moment holds what `pipe.to(device)` then moving the encoders back would."""
    for name, module in _modules(pipe).items():
        module.to("cpu" if offload_text_encoders and name in TEXT_ENCODERS else device)


@contextlib.contextmanager
def encoding(pipe, device, offload_text_encoders: bool) -> Iterator[None]:
    """Prompts are encoded inside: with offloading, the denoiser waits in CPU memory and the text encoders are on
    `device`; on exit the reverse. Without offloading nothing moves."""
    if not offload_text_encoders:
        yield
        return
    denoisers = [m for n, m in _modules(pipe).items() if n in ("unet", "transformer")]
    for module in denoisers:
        module.to("cpu")
    for name in TEXT_ENCODERS:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device)
    try:
        yield
    finally:
        for name in TEXT_ENCODERS:
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to("cpu")
        for module in denoisers:
            module.to(device)
