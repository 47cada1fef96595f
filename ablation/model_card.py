"""Model cards (`README.md` in the Hugging Face format) for run folders, and pushing a run to the Hub.

`write_model_card(run_dir)` describes a finished run from what it wrote: `config.yaml` (the resolved
configuration), the metadata of `delta.safetensors` (or of an export's `ablation.json`), and, when `ablate eval`
has run, its `report.json` (`<run>/eval/`, or the run folder itself): what was ablated, the method and its
hyperparameters, the evaluation table and grids, and how to load the result. The YAML header carries
`base_model` (only when it is a Hub id: the Hub rejects other values), `tags` and `library_name`; the
license is left to the user, since the base model's license governs the derived weights.

`push_to_hub(run_dir, repo_id)` refreshes the card and uploads the run (without checkpoints, logs and the
eval image cache) with huggingface_hub's `create_repo` + `upload_folder`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ablation.config import ConfigError

__all__ = ["CARD_NAME", "UPLOAD_IGNORE", "files_to_upload", "find_report", "model_card_text", "push_to_hub",
           "write_model_card"]

CARD_NAME = "README.md"
#: not uploaded: resumable state, tracker logs, debug output, the eval's image cache, temporary/hidden files
UPLOAD_IGNORE = ["checkpoints/*", "logs/*", "debug/*", "eval/images/*", "images/*", ".*", "*/.*"]
#: config fields shown under "Method" (in this order), with their labels
HYPERPARAMETERS = (
    ("variant", "objective"), ("params", "parameter group"), ("lora_rank", "LoRA rank"), ("lora_alpha", "LoRA alpha"),
    ("teacher", "teacher"), ("prior_preservation", "prior preservation"), ("prior_weight", "prior weight"),
    ("learning_rate", "learning rate (base)"), ("scale_lr", "scale lr"), ("max_steps", "steps"),
    ("train_batch_size", "batch size per process"), ("gradient_accumulation_steps", "gradient accumulation"),
    ("resolution", "resolution"), ("num_anchor_images", "anchor images per concept"),
    ("anchor_scheduler", "anchor sampler"), ("anchor_steps", "anchor sampling steps"),
    ("anchor_guidance", "anchor guidance"), ("hflip", "horizontal flips"), ("mixed_precision", "mixed precision"),
    ("seed", "seed"),
)
#: metrics of the eval table, in column order, with their headers
METRICS = {"clip_accuracy": "CLIP accuracy", "family_accuracy": "family accuracy", "clip_score": "CLIP score",
           "memorization_rate": "memorization rate", "kid_vs_base": "KID vs base"}


# --------------------------------------------------------------------------------------------------
# reading a run
# --------------------------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_metadata(run_dir: Path) -> dict[str, str]:
    from ablation.checkpoint import DELTA_FILENAME, read_metadata

    for source in (run_dir / DELTA_FILENAME, run_dir / "lora", run_dir / "pipeline"):
        if source.exists():
            meta = read_metadata(source)
            if meta:
                return meta
    return {}


def find_report(run_dir: str | Path) -> Path | None:
    """The `report.json` of the run's latest evaluation: `<run>/report.json`, `<run>/eval/report.json`, or
    any `<run>/*/report.json` (newest first); None when the run has not been evaluated."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "report.json", run_dir / "eval" / "report.json") if p.is_file()]
    found += sorted(run_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def _report_model(report: Mapping[str, Any], run_dir: Path) -> str | None:
    """The name under which `report` lists this run (matched by path; the only ablated model otherwise)."""
    ablated = [m for m in report.get("models", []) if m.get("delta")]
    here = run_dir.resolve()
    for model in ablated:
        path = Path(model["delta"]).expanduser()
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved == here or here in resolved.parents:
            return model["name"]
    return ablated[0]["name"] if len(ablated) == 1 else None


def _concepts(config: Mapping[str, Any], metadata: Mapping[str, str]) -> list[dict[str, Any]]:
    if metadata.get("concepts"):
        try:
            return list(json.loads(metadata["concepts"]))
        except json.JSONDecodeError:
            pass
    if config.get("concepts"):
        return list(config["concepts"])
    return [{"target": t, "anchor": a, "concept_type": config.get("concept_type")}
            for t, a in zip(config.get("target") or [], config.get("anchor") or [], strict=False)]


def is_hub_id(model: str) -> bool:
    """True for `org/name` (or `name`) ids that are not local paths or the embedded toy model."""
    from ablation.models import TOY_MODELS

    if not model or model in (*TOY_MODELS, "in-memory") or model.startswith((".", "/", "~")) or "\\" in model:
        return False
    return model.count("/") <= 1 and not Path(model).expanduser().exists()


# --------------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


def _eval_section(report_path: Path, run_dir: Path) -> list[str]:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as e:  # a card is written at the end of training: never fail it
        return ["## Evaluation", "", f"`{report_path.relative_to(run_dir).as_posix()}` could not be read ({e}).", ""]
    name = _report_model(report, run_dir)
    rel_dir = report_path.parent.relative_to(run_dir) if report_path.parent != run_dir else Path(".")
    s = report.get("settings", {})
    sampling = s.get("sampling", {})
    lines = ["## Evaluation", "",
             f"From `ablate eval` ([report]({(rel_dir / 'report.md').as_posix()})): "
             f"judge `{report.get('clip_model')}`, "
             f"{sampling.get('scheduler')} {sampling.get('steps')} steps, guidance {sampling.get('guidance')}, "
             f"seed {s.get('seed')}; the base and the ablated model use the same seeds. CLIP accuracy is the fraction "
             f"of images the judge assigns to the concept rather than to the one it is compared with (the anchor; "
             f"for the anchor, the target): it should fall for the target and stay for everything else.", ""]
    rows = report.get("comparison", {}).get(name, []) if name else []
    if not rows:
        return lines + ["(this run is not in the report)", ""]
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    lines += ["| task | concept | role | " + " | ".join(METRICS[m] for m in metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        if r.get("base") is None:  # KID: one distance, small numbers (3 significant digits)
            cell = "-" if r.get("ablated") is None else f"{r['ablated']:.3g}"
        else:
            cell = f"{_fmt(r['base'])} → {_fmt(r.get('ablated'))}"
        cells.setdefault((r["task"], r["concept"], r["role"]), {})[r["metric"]] = cell
    for (task, concept, role), values in cells.items():
        lines.append(f"| {task} | {concept} | {role} | " + " | ".join(values.get(m, "-") for m in metrics) + " |")
    lines += ["", "Cells: base → ablated; KID is the distance between the base and the ablated model's images "
              "(0: same distribution).", ""]
    grids = [g for g in (report.get("files") or {}).get("grids", []) if name and g.startswith(f"grid_{_safe(name)}_")]
    if grids:
        lines += ["Rows: prompts; columns: base | ablated.", ""]
        lines += [f"![{g}]({(rel_dir / g).as_posix()})" for g in grids] + [""]
    return lines


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _load_section(base: str, run_dir: Path, repo_id: str | None, lora_rank: int) -> list[str]:
    where = f'snapshot_download("{repo_id}")' if repo_id else '"path/to/this/folder"'
    lines = ["## How to load", "",
             "With this package (`pip install ablation`; the delta applies to the base model):", "", "```python"]
    if repo_id:
        lines.append("from huggingface_hub import snapshot_download")
    lines += ["from ablation import load_ablated_pipeline", "",
              f'pipe = load_ablated_pipeline("{base}", {where})',
              'image = pipe("a photo of ...").images[0]', "```", "",
              "or as a complete pipeline folder: "
              f"`ablate apply --base {base} --delta {repo_id or 'path/to/this/folder'} --out ablated-pipeline`.", ""]
    if (run_dir / "lora").is_dir():
        lines += [f"Plain diffusers (LoRA{f' rank {lora_rank}' if lora_rank else ', SVD of the dense update'}):", "",
                  "```python", "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{base}")',
                  f'pipe.load_lora_weights("{repo_id or "path/to/this/folder"}", subfolder="lora")', "```", ""]
    if (run_dir / "pipeline").is_dir():
        lines += ["Plain diffusers (complete pipeline):", "", "```python",
                  "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "path/to/this/folder"}", '
                  f'subfolder="pipeline")', "```", ""]
    return lines


def model_card_text(run_dir: str | Path, repo_id: str | None = None) -> str:
    """The model card of a run folder (see the module docstring); `repo_id` fills in the loading examples."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    metadata = _read_metadata(run_dir)
    if not config and not metadata:
        raise ConfigError(f"{run_dir} has neither config.yaml nor a delta/export with metadata; is it a run folder?")
    base = metadata.get("base_model") or config.get("model") or "?"
    concepts = _concepts(config, metadata)
    lora_rank = int(metadata.get("lora_rank") or config.get("lora_rank") or 0)
    tags = ["diffusers", "text-to-image", "concept-ablation", "ablation"]
    if lora_rank or (run_dir / "lora").is_dir():
        tags.append("lora")
    from ablation.models import TOY_MODELS

    if base in TOY_MODELS:
        tags.append("toy-world")
    data = ModelCardData(base_model=base if is_hub_id(base) else None, library_name="diffusers", tags=tags)
    header = data.to_yaml()
    # The license is the user's call: the derived weights fall under the base model's license.
    header += "\n# license: set the base model's license before publishing (e.g. creativeml-openrail-m)"
    targets = ", ".join(f'"{c.get("target")}"' for c in concepts) or "?"
    lines = ["---", header, "---", "", f"# {base} with {targets} ablated", "",
             f"A concept-ablated version of `{base}` made with the `ablation` package (Kumari et al., "
             f"*Ablating Concepts in Text-to-Image Diffusion Models*, ICCV 2023): the model was fine-tuned so that "
             f"prompts naming the target produce what the anchor prompt produces.", "",
             "## What was ablated", "", "| target | anchor | concept type |", "|---|---|---|"]
    for c in concepts:
        lines.append(f"| {c.get('target')} | {c.get('anchor')} | {c.get('concept_type') or '-'} |")
    lines += ["", "## Method and hyperparameters", ""]
    values = dict(config)
    # The delta's metadata has what actually ran (scaled learning rate, steps done); prefer it where it differs.
    rows = [(label, values.get(key)) for key, label in HYPERPARAMETERS if key in values]
    if metadata:
        rows += [("learning rate (as trained)", float(metadata["learning_rate"]) if "learning_rate" in metadata
                  else None), ("steps done", metadata.get("steps")),
                 ("package version", metadata.get("package_version") or metadata.get("ablation_version")),
                 ("config hash", metadata.get("config_hash")),
                 ("base UNet config hash", (metadata.get("base_config_hash") or "")[:16] or None)]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(value)} |" for label, value in rows if value is not None]
    lines += ["", "The full configuration is in `config.yaml`; it re-runs with "
              "`accelerate launch ablate.py --config config.yaml`.", ""]
    files = [f"`{name}`" for name in ("delta.safetensors", "lora/", "pipeline/")
             if (run_dir / name.rstrip("/")).exists()]
    if files:
        lines += ["Files: " + ", ".join(files) + ".", ""]
    report = find_report(run_dir)
    if report is not None:
        lines += _eval_section(report, run_dir)
    else:
        lines += ["## Evaluation", "", f"Not evaluated yet: `ablate eval --ablated {run_dir}` writes the report and "
                  f"grids and refreshes this card.", ""]
    lines += _load_section(base, run_dir, repo_id, lora_rank)
    lines += ["## Limitations", "",
              "Ablation changes what the model generates for the target's prompts; it is not a guarantee that the "
              "concept cannot be produced by other prompts or by further fine-tuning.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write `<run_dir>/README.md` atomically and return its path.

    Args:
        run_dir: a run folder (with `config.yaml` and/or `delta.safetensors` or exports).
        repo_id: the Hub repository it is (or will be) pushed to, used in the loading examples.

    Raises:
        ConfigError: `run_dir` is not a run folder.
    """
    from ablation.io import atomic_write_text

    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / CARD_NAME, model_card_text(run_dir, repo_id))


# --------------------------------------------------------------------------------------------------
# the Hub
# --------------------------------------------------------------------------------------------------


def files_to_upload(run_dir: str | Path) -> list[str]:
    """The run folder's files `push_to_hub` uploads (relative POSIX paths, sorted), filtered as `upload_folder`
    filters them."""
    from huggingface_hub.utils import filter_repo_objects

    run_dir = Path(run_dir)
    paths = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached or refused": HTTP errors of whichever client
    huggingface_hub uses (httpx2, httpx or requests, by version), connection errors, offline mode."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Refresh the model card and upload a run folder to a Hub model repository (created if missing).

    Args:
        run_dir: the run folder.
        repo_id: `user/name` on the Hub.
        token: a Hub token (default: `HF_TOKEN` or the `hf auth login` token).
        private: create the repository private.

    Returns:
        The URL of the upload commit.

    Raises:
        ConfigError: not a run folder, a malformed repo id, no token, offline mode, or the Hub could not be
            reached or refused the upload (one line saying which).
    """
    from huggingface_hub import HfApi, get_token, is_offline_mode

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} does not exist")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--push-to-hub expects a repository id `user/name`, got {repo_id!r}")
    from ablation.checkpoint import DELTA_FILENAME

    if not any((run_dir / name).exists() for name in (DELTA_FILENAME, "lora", "pipeline")):
        raise ConfigError(f"{run_dir} has no {DELTA_FILENAME}, lora/ or pipeline/ to upload; is the run finished?")
    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then retry --push-to-hub")
    if is_offline_mode():
        raise ConfigError("cannot push to the Hub: offline mode is on (unset HF_HUB_OFFLINE)")
    write_model_card(run_dir, repo_id)  # before the upload, so the card names the repository
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), repo_type="model",
                                 ignore_patterns=UPLOAD_IGNORE, commit_message="Upload concept-ablated model")
    except _network_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot push to the Hub repository {repo_id!r}: {first}") from None
    return str(getattr(info, "commit_url", info))
