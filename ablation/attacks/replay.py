"""`ablate attack --replay DIR`: render the prompts and embeddings an earlier attack run found, on another model.

Every attack run records, per attack, the items it rendered on the ablated model (`attack.json`, `replay`: the
prompt text, how it is shown, the plain prompt it attacks and the key of its learned vectors in
`<attack>.safetensors`). Replaying renders exactly those items, with the earlier run's seed, sampling settings
and images per prompt, on the base model and the `--ablated` model now given: no search, so an attack found on
one ablation can be tried on another (transfer), and a reported number can be checked by someone else.

`relearn` changes the model's weights rather than its input, so it has nothing to replay: it is run again with
the recorded budget and seed (it is a pure function of them and of the ablated model).
"""

from __future__ import annotations

import json
from pathlib import Path

from ablation.config import ConfigError

#: attacks whose result is a set of inputs (prompts, embeddings) that can be rendered on any model
REPLAYABLE = ("prompts", "text-search", "prefix", "inversion")


def tensor_file(attack: str) -> str:
    """The safetensors file of an attack's learned vectors inside the report folder."""
    return f"{attack.replace('-', '_')}.safetensors"


def read_source(folder: str) -> dict:
    """The earlier run's `attack.json`, checked to hold what a replay needs.

    Raises:
        ConfigError: not an attack report, or a report written before replays were recorded.
    """
    path = Path(folder).expanduser() / "attack.json"
    if not path.is_file():
        raise ConfigError(f"--replay {folder}: no attack.json there (pass the --out folder of an `ablate attack` run)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--replay {folder}: attack.json is not valid JSON ({err})") from err
    if not str(report.get("format", "")).startswith("ablation-attack/"):
        raise ConfigError(f"--replay {folder}: attack.json is not an `ablate attack` report")
    for a in report.get("attacks", []):
        if a.get("attack") in REPLAYABLE and "replay" not in a:
            raise ConfigError(f"--replay {folder}: the report predates replays (no `replay` entry for "
                              f"{a.get('attack')}); run the attack again")
        needs_tensors = any(e.get("vectors") for e in a.get("replay", []))
        if needs_tensors and not (path.parent / tensor_file(a["attack"])).is_file():
            raise ConfigError(f"--replay {folder}: {tensor_file(a['attack'])} is missing")
    return report


def entries(items: list, num_plain: int) -> tuple[list[dict], dict]:
    """Replay entries of rendered items and the tensors they name (vectors shared by items are stored once)."""
    rows, tensors, keys = [], {}, {}
    for j, item in enumerate(items):
        key = None
        if item.vectors is not None:
            key = keys.setdefault(id(item.vectors), f"vectors_{len(keys)}")
            tensors[key] = item.vectors.detach().float().cpu()
        rows.append({"prompt": item.prompt, "shown": item.display, "vectors": key,
                     "source": item.source if item.source is not None else j % num_plain})
    return rows, tensors


def items_of(attack_entry: dict, folder: str, device=None) -> list:
    """The recorded items of one attack, with their vectors loaded from the report folder (safetensors)."""
    from safetensors.torch import load_file

    from ablation.attacks.common import Item

    rows = attack_entry["replay"]
    tensors = {}
    if any(r.get("vectors") for r in rows):
        tensors = load_file(str(Path(folder).expanduser() / tensor_file(attack_entry["attack"])),
                            device=str(device or "cpu"))
    items = []
    for r in rows:
        key = r.get("vectors")
        if key is not None and key not in tensors:
            raise ConfigError(f"--replay {folder}: {key} is not in {tensor_file(attack_entry['attack'])}")
        # items naming one key share one tensor object, so they are rendered in shared batches
        items.append(Item(r["prompt"], tensors[key] if key is not None else None, r.get("shown"), r.get("source")))
    return items


def run(ctx, attack_entry: dict, folder: str) -> dict:
    """Render one recorded attack's items on both models; the report entry (`cost`: nothing searched)."""
    from ablation.attacks.common import Cost

    items = items_of(attack_entry, folder, ctx.pipe.unet.device)
    name = attack_entry["attack"].replace("-", "_")
    return {"asr": ctx.asr_both(items, name), "cost": Cost().as_dict(),
            "prompts": [{"prompt": it.display} for it in items],
            "details": {"replayed_from": str(folder), "items": len(items),
                        "asr_where_found": attack_entry.get("asr", {}).get("ablated")}}
