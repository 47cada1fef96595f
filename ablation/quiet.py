"""Silence library output a user cannot act on, keeping progress bars for long work and real warnings.

Each filter names one library or one message: loading bars of a local pipeline (done in a second), the
bitsandbytes note about an optional CPU kernel package, deprecation notices about arguments this package
passes, accelerate's per-checkpoint INFO lines, transformers' notes about optional image backends.
"""

from __future__ import annotations

import logging
import os
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_libraries(verbose: bool = False) -> None:
    """Configure logging for a command-line run (call first, before the heavy imports).

    Args:
        verbose: keep the libraries' INFO output and loading bars (debugging).
    """
    # Read when transformers is first imported; an explicit user setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ablation").setLevel(logging.INFO)  # our own progress messages
    if verbose:
        return
    # "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels": optional speed-up
    # of 4-bit inference, which this package never uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # "Saving current state to ..." per checkpoint
    # diffusers warns about the `torch_dtype` argument name; the package passes it (fixed in one place later).
    warnings.filterwarnings("ignore", message=r"`torch_dtype` is deprecated", category=FutureWarning)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components": local files, about a second
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # "Loading weights"
    except ImportError:
        pass
