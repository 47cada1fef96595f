"""Diagnosis for the toy world v2: is a cross-attention K/V ablation local, and how does that depend on the text
tower's width?

For each text tower (`shipped`: today's trained 64-wide toy CLIP tower; `<w>`: a randomly initialised, frozen
CLIPTextModel of width w, 4 layers, heads of 64 wide as in CLIP ViT-L/14's text tower, 16 at w = 64) the script
builds a pipeline from today's UNet with cross-attention K/V projections of the new width (every other weight
kept), fine-tunes the whole UNet for the same number of steps on the same renders (latents of the shipped VAE,
10% caption dropout), then runs the fidelity sweep of `scripts/fidelity_sweep.py` on it: the cross-attention
ablation grumpy cat -> cat (model-based, prior preservation, the toy's cross-attn rate), every toy concept's
held-out images judged by the toy classifier and the toy CLIP before and after. Only width changes between the
random towers; `shipped` against `64` separates "trained tower" from "width".

The new K/V start from a least-squares fit, not from noise (1,200 steps from noise left the 64-wide random
tower's model at 0.36 mean accuracy: too weak to measure locality on): one matrix M (w x 64, ridge) maps the new
tower's token states onto the shipped tower's over the training captions, and each layer's K/V become W M^T, so
the fine-tune starts from a model that already reads the new states as it read the old ones, as far as a linear
map of them can say it.

Every phase is resumable (rerun the same command): renders and latents are cached under --work, each tower's
UNet fine-tune saves every 250 steps, a finished tower's sweep line is kept in `<work>/results.jsonl`.

    nice python scripts/diagnose_locality.py --towers shipped,64,256,512,768 --steps 1500 \\
        > work_locality/log.txt 2>&1 &
    python scripts/diagnose_locality.py --report docs/images/locality_vs_width.png   # table + plot of results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _script(name: str):
    """The sibling script `name`.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tw = _script("train_toyworld")
sweep = _script("fidelity_sweep")

#: the paper's setting on the toy model (docs/paper-parity.md, "Measurements"): cross-attn K/V, model-based,
#: frozen teacher, prior preservation (auto for grumpy cat, which names its anchor), the toy cross-attn rate
ABLATION = {"params": "cross-attn", "learning_rate": 1e-4, "max_steps": 200, "num_anchor_images": 128,
            "anchor_steps": 25}


def text_tower(name: str):
    """The frozen text tower `name`: 'shipped' or a width (random CLIPTextModel, seed 0)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ablation.toyworld import pipeline_dir

    if name == "shipped":
        return CLIPTextModel.from_pretrained(pipeline_dir() / "text_encoder").float().eval()
    width = int(name)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
                            num_attention_heads=max(4, width // 64), max_position_embeddings=tw.TEXT_LEN,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=width)
    return CLIPTextModel(config).eval()


def state_map(new: torch.Tensor, old: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """M (new width x old width) minimising ||new M - old||^2 + ridge * n * ||M||^2 over token-state rows."""
    gram = new.T @ new
    gram += ridge * len(new) * torch.eye(len(gram))
    return torch.linalg.solve(gram, new.T @ old)


def unet_for(width: int, mapping: torch.Tensor | None = None):
    """Today's UNet with `attn2.to_k` / `to_v` for text states `width` wide (W M^T, or fresh without `mapping`);
    everything else kept."""
    from diffusers import UNet2DConditionModel

    from ablation.toyworld import pipeline_dir

    shipped = UNet2DConditionModel.from_pretrained(pipeline_dir() / "unet").float()
    config = dict(shipped.config)
    config["cross_attention_dim"] = width
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(config)
    fresh = {k for k in unet.state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k}
    state = {k: v for k, v in shipped.state_dict().items() if k not in fresh}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if set(missing) != fresh or unexpected:
        raise RuntimeError(f"unexpected UNet keys: missing {sorted(set(missing) - fresh)[:4]}, {unexpected[:4]}")
    if mapping is not None:
        old = shipped.state_dict()
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if name in fresh:
                    param.copy_(old[name] @ mapping.T)
    return unet, fresh


def fine_tune(work: Path, tower: str, steps: int, batch: int, num_images: int) -> Path:
    """Fine-tune the UNet under `tower`'s text states; returns the assembled pipeline folder (resumable)."""
    out = work / f"pipeline_{tower}"
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL

    from ablation.toyworld import pipeline_dir

    device = torch.device("cpu")
    tw.stage_data(work, num_images, workers=2)
    images, captions, _ = tw.load_data(work, num_images)
    vae = AutoencoderKL.from_pretrained(pipeline_dir() / "vae").float().eval()
    mean, std = tw.cached_latents(vae, images, device, work / f"latents_{num_images}.pt")
    scale = vae.config.scaling_factor
    text = text_tower(tower)
    unique = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(unique)}
    hidden = tw.text_hidden(text, tw.tokenize(unique), device, batch=512)
    rows, empty = torch.tensor([index[c] for c in captions]), index[""]
    # the least-squares start (module docstring) over the token states of up to 3,000 captions
    sample = torch.randperm(len(unique), generator=torch.Generator().manual_seed(0))[:3000]
    old = tw.text_hidden(text_tower("shipped"), tw.tokenize([unique[i] for i in sample]), device, batch=512)
    mapping = state_map(hidden[sample].flatten(0, 1), old.flatten(0, 1))
    target = old.flatten(0, 1)
    residual = hidden[sample].flatten(0, 1) @ mapping - target
    fit = 1 - float(residual.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
    print(f"[{tower}] linear map of the new states onto the shipped ones: R^2 {fit:.3f}", flush=True)
    (work / f"fit_{tower}.json").write_text(json.dumps({"tower": tower, "r2": round(fit, 4)}))
    unet, fresh = unet_for(text.config.hidden_size, mapping)
    stage = tw.Stage(work, f"unet_{tower}", unet, steps, None, 250)
    # the fresh projections learn from scratch; the rest only adapts to them
    new = [p for n, p in unet.named_parameters() if n in fresh]
    kept = [p for n, p in unet.named_parameters() if n not in fresh]
    opt = torch.optim.AdamW([{"params": new, "lr": 3e-4}, {"params": kept, "lr": 1e-4}], weight_decay=1e-2)
    base_lrs = [3e-4, 1e-4]
    acp = tw.train_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(7000 + stage.step)
    unet.train()
    with tqdm(total=steps, initial=stage.step, desc=f"unet[{tower}]") as bar:
        while not stage.done():
            frac = min(1.0, stage.step / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(
                torch.pi * stage.step / steps)).item()))  # warm-up 100 steps, cosine to 10%
            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * frac
            idx = torch.randint(0, len(images), (batch,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
            c = rows[idx].clone()
            c[torch.rand(batch, generator=gen) < 0.1] = empty
            t = torch.randint(0, 1000, (batch,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=hidden[c]).sample
            stage.update(opt, F.mse_loss(pred, noise), bar)
    stage.save()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pipeline_dir(), tmp, symlinks=False)
    unet.eval().save_pretrained(tmp / "unet")
    text.save_pretrained(tmp / "text_encoder")
    tmp.rename(out)
    return out


def run_sweep(work: Path, tower: str, folder: Path, per_concept: int) -> dict:
    """The fidelity sweep's record for the cross-attn ablation on `folder`, plus base quality."""
    from diffusers import StableDiffusionPipeline

    from ablation.config import build_config
    from ablation.toyworld import catalog
    from ablation.trainer import train

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    fam = catalog().family_of_target("grumpy cat")
    prompts = sweep.concept_prompts(per_concept)
    judges = sweep.Judges()
    base_images = sweep.generate(pipe, prompts, 25, 6.0)
    base_labels = judges.judge(base_images)
    run = work / f"run_{tower}"
    shutil.rmtree(run, ignore_errors=True)
    # model "toy" with the given pipeline: the toy catalogue's prompts and the toy table for what is not set
    config = build_config(None, {"target": ["grumpy cat"], "anchor": ["cat"], "model": "toy", "output_dir": str(run),
                                 "checkpointing_steps": 0, "cache_dir": str(work / f"cache_{tower}"), **ABLATION})
    start = time.perf_counter()
    result = train(config, pipe=pipe)
    seconds = time.perf_counter() - start
    images = sweep.generate(result.pipeline, prompts, 25, 6.0)
    fit_file = work / f"fit_{tower}.json"
    fit = json.loads(fit_file.read_text())["r2"] if fit_file.exists() else None
    record = {"tower": tower, "width": text_tower_width(folder), "ablation": ABLATION, "per_concept": per_concept,
              "state_fit_r2": fit,
              "train_seconds": round(seconds, 1),
              **sweep.summarise(base_labels, judges.judge(images), set(fam.classes))}
    shutil.rmtree(run, ignore_errors=True)
    return record


@torch.no_grad()
def state_overlap(tower: str, energy: float = 0.99) -> dict:
    """How much of other prompts' text states lies where a K/V edit of the target acts.

    A cross-attention K/V update trained on the target's prompts changes W by sums of outer products with the
    target's token states, so it moves another prompt's keys and values by about the part of that prompt's states
    inside the target states' span. Returns the mean fraction of state energy (||P s||^2 / ||s||^2 over tokens) of
    the held-out prompts of every concept outside the grumpy-cat family, P the projector on the subspace holding
    `energy` of the grumpy-cat prompts' token states, and that subspace's dimension.
    """
    from ablation.toyworld import catalog

    cat = catalog()
    text = text_tower(tower)
    fam = cat.family_of_target("grumpy cat")

    def states(prompts):
        return tw.text_hidden(text, tw.tokenize(list(prompts)), torch.device("cpu")).flatten(0, 1)

    prompts = list(fam.prompts_for("grumpy cat", "train"))
    target = states(prompts)
    # what the edit must change: the target prompts' states minus those of the same prompts with the anchor
    difference = target - states([p.replace("grumpy cat", "cat") for p in prompts])
    controls = [states(family.prompts_for(c, "heldout")) for family in cat.families.values() for c in family.classes
                if c not in fam.classes]
    out = {"tower": tower, "width": text.config.hidden_size}
    for name, rows in (("target", target), ("difference", difference)):
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        k = int((s.pow(2).cumsum(0) / s.pow(2).sum() < energy).sum()) + 1
        basis = vh[:k]
        fractions = [float(((c @ basis.T).pow(2).sum(1) / c.pow(2).sum(1)).mean()) for c in controls]
        out |= {f"{name}_dim": k, f"{name}_overlap": round(sum(fractions) / len(fractions), 4)}
    return out


def text_tower_width(folder: Path) -> int:
    return json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]


def report(work: Path, plot: Path | None) -> None:
    """Markdown table of results.jsonl (classifier and toy CLIP), and the plot."""
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines() if line]
    print("| text tower | width | judge | grumpy cat | cat | surrounding (worst) | worst other | changed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        for judge in ("classifier", "toy_clip"):
            acc = r[judge]["accuracy"]
            surround = min(("tabby cat", "black cat", "siamese cat"), key=lambda c: acc[c][1] - acc[c][0])
            worst, drop = r[judge]["worst_other"]
            base_q = sum(a[0] for a in acc.values()) / len(acc)
            print(f"| {r['tower']} (base mean {base_q:.2f}) | {r['width']} | {judge} | {acc['grumpy cat'][0]:.2f} -> "
                  f"{acc['grumpy cat'][1]:.2f} | {acc['cat'][0]:.2f} -> {acc['cat'][1]:.2f} | {surround} "
                  f"{acc[surround][0]:.2f} -> {acc[surround][1]:.2f} | {worst} -{drop:.2f} | "
                  f"{100 * r[judge]['changed_fraction']:.1f}% |")
    if plot is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    random = sorted((r for r in records if r["tower"] != "shipped"), key=lambda r: r["width"])
    for judge, marker in (("classifier", "o"), ("toy_clip", "s")):
        ax.plot([r["width"] for r in random], [100 * r[judge]["changed_fraction"] for r in random],
                marker=marker, label=f"control images changed ({judge}), random tower")
        for r in records:
            if r["tower"] == "shipped":
                ax.scatter([r["width"]], [100 * r[judge]["changed_fraction"]], marker="*", s=120,
                           label=f"shipped trained tower ({judge})")
    ax.axhline(2.0, color="grey", linestyle=":", label="target: < 2%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("text tower width (cross_attention_dim)")
    ax.set_ylabel("% control images changed")
    ax.set_title("grumpy cat -> cat, cross-attn K/V ablation")
    ax.legend(fontsize=6)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=120)
    print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work_locality")
    parser.add_argument("--towers", default="shipped,64,256,512,768", help="comma-separated: shipped and/or widths")
    parser.add_argument("--steps", type=int, default=1500, help="UNet fine-tuning steps per tower (same for all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=30_000)
    parser.add_argument("--per-concept", type=int, default=16, help="held-out images per concept in the sweep")
    parser.add_argument("--overlap", action="store_true",
                        help="print each tower's state overlap (`state_overlap`; seconds, no training) and exit")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="PLOT",
                        help="print the table of results.jsonl (and write the plot to PLOT) instead of running")
    args = parser.parse_args(argv)
    towers = [t for t in args.towers.split(",") if t]
    for t in towers:
        if t != "shipped" and not (t.isdigit() and int(t) % 16 == 0):
            parser.error(f"--towers: {t!r} is neither 'shipped' nor a width divisible by 16")
    if args.overlap:
        for tower in towers:
            print(json.dumps(state_overlap(tower)), flush=True)
        return 0
    if args.report is not None:
        report(args.work, Path(args.report) if args.report else None)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    lines = results.read_text().splitlines() if results.exists() else []
    done = {json.loads(line)["tower"] for line in lines if line}
    for tower in towers:
        if tower in done:
            print(f"[{tower}] done, kept in {results}")
            continue
        folder = fine_tune(args.work, tower, args.steps, args.batch, args.num_images)
        record = run_sweep(args.work, tower, folder, args.per_concept)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("tower", "width", "train_seconds")}
                         | {j: record[j]["changed_fraction"] for j in ("classifier", "toy_clip") if j in record}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
