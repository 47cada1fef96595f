"""Shared test setup: offline, deterministic, light on the 2-core CI machine, one tiny model per family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ablation.testing import TINY_KINDS, tiny_pipeline  # noqa: E402

# The tiny models are far too small for intra-op parallelism; on a shared 2-core machine two
# threads spin-wait on each other and ran ~30x slower than one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process training runs share accelerate's singletons; reset them between tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Every tiny pipeline family saved once per session: {"sd1": dir, "sd2": ..., "upscale": ...}."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for kind in TINY_KINDS:
        tiny_pipeline(kind).save_pretrained(root / kind)
        out[kind] = str(root / kind)
    return out


@pytest.fixture(scope="session")
def model_dir(model_dirs) -> str:
    """The tiny SD 1.x pipeline directory."""
    return model_dirs["sd1"]
