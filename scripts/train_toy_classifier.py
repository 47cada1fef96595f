"""Train the toy world's second judge: a 31-way CNN classifier over every toy concept.

    nice -n 10 python scripts/train_toy_classifier.py    # the shipped weights; seeded; 20 min on 2 busy cores
    python scripts/train_toy_classifier.py --out /tmp/clf --steps 200 --renders 4000 --recons 200   # quick look

Data (all from `ablation.toyworld`):
- renders of the training captions and seeds (`sample_training_example(seed, "train")`, balanced over
  concepts, memorized captions at a third of the rate);
- the toy VAE's reconstructions of some of them (posterior sample, then decode): the toy model draws
  through that decoder, so the judge must know its blur and colour shifts;
- on-the-fly augmentation: flips, mild Gaussian blur, mild Gaussian noise, small brightness/contrast shifts.

Held-out split: per concept, renders of the held-out templates and held-out seeds (>= 10^9, never seen
in training) and the VAE reconstructions of the same renders. Accuracies on both are printed and stored
in `config.json` next to the fp16 weights (`model.safetensors`), which `load_classifier(path)` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation.io import atomic_write_file, atomic_write_text  # noqa: E402
from ablation.toyworld import catalog, pipeline_dir  # noqa: E402
from ablation.toyworld.catalog import HELDOUT_SEED_OFFSET, sample_caption  # noqa: E402
from ablation.toyworld.classifier import CLASSIFIER_DIR, ToyConceptNet  # noqa: E402
from ablation.toyworld.render import render_caption, sample_training_example  # noqa: E402

WIDTHS = (32, 64, 96, 128)
#: held-out renders start here (above the toy model's own held-out seeds used by eval/toyworld_quality.py)
HELDOUT_BASE = HELDOUT_SEED_OFFSET + 50_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def to_uint8_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def heldout_set(classes: list[str], per_concept: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_concept` renders of every concept from held-out captions and seeds."""
    images, labels = [], []
    for ci, concept in enumerate(classes):
        rng = random.Random(seed * 1_000_003 + ci)
        for k in range(per_concept):
            caption, _ = sample_caption(concept, rng, "heldout")
            images.append(render_caption(caption, HELDOUT_BASE + 1000 * ci + k))
            labels.append(ci)
    return to_uint8_tensor(images), torch.tensor(labels)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, seed: int, batch: int = 64) -> torch.Tensor:
    """uint8 images -> the toy VAE's reconstructions (posterior sample, decode), uint8."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float() / 127.5 - 1
        z = vae.encode(x).latent_dist.sample(generator=gen)
        y = vae.decode(z).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Float images in [-1, 1]: flips, blur (p 0.3), noise (p 0.5), brightness/contrast (+-6%)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        sigma = 0.4 + 0.8 * torch.rand(1, generator=gen).item()
        k = torch.exp(-(torch.arange(5) - 2.0) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).to(x.dtype)
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
        blurred = F.conv2d(F.pad(x[blur], (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
        x = x.clone()
        x[blur] = blurred
    noisy = (torch.rand(n, generator=gen) < 0.5).to(x.dtype)[:, None, None, None]
    sigma = 0.06 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x + noisy * sigma * torch.randn(x.shape, generator=gen)
    scale = 1 + 0.06 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    shift = 0.06 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    return (x * scale + shift).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> tuple[float, dict]:
    model.eval()
    preds = torch.cat([model(images[i:i + 256].float() / 127.5 - 1).argmax(-1) for i in range(0, len(images), 256)])
    per = {c: round(float((preds[labels == i] == i).float().mean()), 3) for i, c in enumerate(classes)}
    return round(float((preds == labels).float().mean()), 4), per


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR, help="weights folder (default: the shipped one)")
    p.add_argument("--renders", type=int, default=12000, help="training renders")
    p.add_argument("--recons", type=int, default=800, help="training renders also seen through the toy VAE")
    p.add_argument("--heldout-per-concept", type=int, default=12, help="held-out renders per concept")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--recon-fraction", type=float, default=0.3, help="share of each batch drawn from recons")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights: 1)")
    args = p.parse_args(argv)
    if args.renders < args.recons or min(args.renders, args.steps, args.batch_size) < 1 or args.recons < 1:
        p.error("need --renders >= --recons >= 1 and positive --steps, --batch-size")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    classes = list(catalog().concepts)
    index = {c: i for i, c in enumerate(classes)}
    t0 = time.perf_counter()

    # ---- data
    examples = [sample_training_example(args.seed * 10_000_019 + i, "train") for i in range(args.renders)]
    renders = to_uint8_tensor([e[0] for e in examples])
    labels = torch.tensor([index[e[2]] for e in examples])
    held, held_labels = heldout_set(classes, args.heldout_per_concept, args.seed)
    log(f"rendered {len(renders)} training and {len(held)} held-out images in {time.perf_counter() - t0:.0f} s")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline_dir() / "vae", torch_dtype=torch.float32).eval()
    t1 = time.perf_counter()
    recons = reconstruct(vae, renders[:args.recons], args.seed)
    recon_labels = labels[:args.recons]
    held_recons = reconstruct(vae, held, args.seed + 1)
    del vae
    log(f"{len(recons) + len(held_recons)} VAE reconstructions in {time.perf_counter() - t1:.0f} s")

    # ---- training
    model = ToyConceptNet(len(classes), WIDTHS).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    n_recon = round(args.batch_size * args.recon_fraction)
    t2 = time.perf_counter()
    for step in range(args.steps):
        model.train()
        ir = torch.randint(len(renders), (args.batch_size - n_recon,), generator=gen)
        iv = torch.randint(len(recons), (n_recon,), generator=gen)
        x = torch.cat([renders[ir], recons[iv]]).float() / 127.5 - 1
        y = torch.cat([labels[ir], recon_labels[iv]])
        x = augment(x, gen).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t2:.0f} s)")

    # ---- held-out accuracy of the weights as shipped (fp16), then the files
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    acc_r, per_r = accuracy(model, held, held_labels, classes)
    acc_v, per_v = accuracy(model, held_recons, held_labels, classes)
    log(f"held-out accuracy: renders {acc_r:.4f} (min {min(per_r.values()):.3f}), "
        f"VAE reconstructions {acc_v:.4f} (min {min(per_v.values()):.3f})")
    config = {
        "format": "ablation-toy-classifier/1", "classes": classes, "widths": list(WIDTHS), "image_size": 64,
        "train": {"renders": args.renders, "recons": args.recons, "steps": args.steps, "batch_size": args.batch_size,
                  "recon_fraction": args.recon_fraction, "lr": args.lr, "seed": args.seed,
                  "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss.item(), 4)},
        "heldout": {"per_concept": args.heldout_per_concept, "accuracy_renders": acc_r,
                    "accuracy_reconstructions": acc_v, "per_concept_renders": per_r,
                    "per_concept_reconstructions": per_v},
    }
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_file(args.out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(args.out / "config.json", json.dumps(config, indent=2) + "\n")
    log(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s total")
    print(json.dumps(config["heldout"] | {"seconds": config["train"]["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
