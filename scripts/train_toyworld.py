"""Train the embedded toy-world models from the procedural renderer and assemble the shipped folders.

Stages (each resumable: it saves `<work>/<stage>/model.safetensors` + `progress.json` every
`--save-every` steps and at the end, and continues from there when run again):

    data      render the training set (images, captions, concept names) with all CPU cores
    vae8      AutoencoderKL 64 px -> 8x8x4 latents (the diffusion model's autoencoder)
    vae4      AutoencoderKL 64 px -> 16x16x4 (the x4 upscaler's autoencoder)
    clip      toy CLIPModel, contrastive on renders, their VAE reconstructions and blurs (the judge;
              its frozen text tower is the diffusion model's text encoder, as in Stable Diffusion)
    unet      UNet2DConditionModel on 8x8x4 latents, caption dropout for classifier-free guidance
    upscaler  x4 upscaler UNet (16 px -> 64 px) for StableDiffusionUpscalePipeline
    assemble  write fp16 safetensors folders into ablation/toyworld/weights/{pipeline,clip,upscaler}
    vae4-decoder   fine-tune the x4 VAE's decoder alone (MSE), keeping the upscaler's latent space
    assemble-unet  replace only the pipeline's UNet file (after a UNet continuation)
    assemble-upscaler  replace only the upscaler's UNet and VAE files (after an upscaler continuation)
    share     store each shared file once (relative links); assemble ends with it
    from-weights   rebuild the stage checkpoints from the shipped folders (to continue a stage)

Examples:

    python scripts/train_toyworld.py all                 # everything, CPU preset (hours on 2 cores)
    python scripts/train_toyworld.py unet --time-limit 1800   # continue the UNet for 30 more minutes
    python scripts/train_toyworld.py all --preset gpu    # the preset that produced the shipped weights
    # the shipped UNet's continuation on reworded captions (docs/toyworld.md, "Reworded prompts"):
    python scripts/train_toyworld.py from-weights unet assemble-unet --work work_toy_reword \
        --unet-steps 3000 --lr-unet 1e-4 --reword 0.5

Optimizer state is not saved (only weights and the step count), so a resumed stage restarts AdamW's
moments; the difference is negligible for these small models and it keeps checkpoints as safetensors.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation.tokenizer_util import clip_tokenizer  # noqa: E402

TEXT_LEN = 32  # captions are short; the pipeline's tokenizer uses the same model_max_length
IMAGE = 64

# ------------------------------------------------------------------------------------------------
# model configurations (standard diffusers / transformers classes)
# ------------------------------------------------------------------------------------------------


def vae_config(factor: int) -> dict:
    blocks = {8: (32, 64, 128, 128), 4: (32, 64, 128)}[factor]
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * len(blocks),
                up_block_types=["UpDecoderBlock2D"] * len(blocks),
                norm_num_groups=32, sample_size=IMAGE)


def clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=TEXT_LEN, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                projection_dim=64)
    vision = dict(image_size=IMAGE, patch_size=8, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def unet_config() -> dict:
    return dict(sample_size=IMAGE // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 128, 128), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def upscaler_unet_config() -> dict:
    return dict(sample_size=IMAGE // 4, in_channels=7, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
                num_class_embeds=1000,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False)


# ------------------------------------------------------------------------------------------------
# presets: steps and batch sizes; --time-limit caps any stage
# ------------------------------------------------------------------------------------------------


@dataclass
class Preset:
    num_images: int
    vae8_steps: int
    vae4_steps: int
    clip_steps: int
    unet_steps: int
    upscaler_steps: int
    batch_vae: int
    batch_clip: int
    batch_unet: int
    batch_upscaler: int
    lr_unet: float = 3e-4


PRESETS = {
    # 2 CPU cores, about 1.5 hours (measured end to end, docs/toyworld.md): s/step about 0.6 (vae8, vae4), 1.5
    # (clip), 0.35 (unet), 0.19 (upscaler), plus rendering and encoding the latents
    "cpu": Preset(num_images=60_000, vae8_steps=1_500, vae4_steps=600, clip_steps=1_000, unet_steps=7_000,
                  upscaler_steps=1_000, batch_vae=16, batch_clip=128, batch_unet=64, batch_upscaler=16),
    # one GPU (the shipped weights: one H200, about 9 minutes)
    "gpu": Preset(num_images=150_000, vae8_steps=20_000, vae4_steps=20_000, clip_steps=20_000, unet_steps=40_000,
                  upscaler_steps=20_000, batch_vae=64, batch_clip=512, batch_unet=512, batch_upscaler=128,
                  lr_unet=5e-4),
    # seconds-long smoke test of the whole script
    "smoke": Preset(num_images=512, vae8_steps=3, vae4_steps=3, clip_steps=3, unet_steps=3, upscaler_steps=3,
                    batch_vae=4, batch_clip=16, batch_unet=16, batch_upscaler=4),
}


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _render_chunk(args: tuple[int, int, str]):
    from ablation.toyworld.render import sample_training_example

    start, count, split = args
    out = [sample_training_example(seed, split) for seed in range(start, start + count)]
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def stage_data(work: Path, num_images: int, workers: int) -> None:
    path = work / "data" / f"train_{num_images}.npz"
    if path.exists():
        print(f"[data] reusing {path}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(s, min(chunk, num_images - s), "train") for s in range(0, num_images, chunk)]
    images, captions, concepts = [], [], []
    with Pool(workers) as pool:
        for img, cap, con in tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render"):
            images.append(img)
            captions += cap
            concepts += con
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=np.concatenate(images), captions=np.array(captions), concepts=np.array(concepts))
    os.replace(tmp, path)


def load_data(work: Path, num_images: int):
    data = np.load(work / "data" / f"train_{num_images}.npz")
    return data["images"], list(data["captions"]), list(data["concepts"])


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return clip_tokenizer(TEXT_LEN)  # one instance: its BPE cache makes repeated words cheap (1 s -> ms per call)


def tokenize(captions: list[str]) -> torch.Tensor:
    tok = _tokenizer()
    unique = sorted(set(captions))
    ids = tok(unique, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt").input_ids
    index = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([index[c] for c in captions])]


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------
# a resumable stage runner
# ------------------------------------------------------------------------------------------------


class Stage:
    """Weights + step counter under <work>/<name>/, saved every `save_every` steps and at the end."""

    def __init__(self, work: Path, name: str, model: torch.nn.Module, total_steps: int, time_limit: float | None,
                 save_every: int):
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model, self.total, self.time_limit, self.save_every = model, total_steps, time_limit, save_every
        self.step = 0
        self.meta: dict = {}  # what a stage recorded about its weights (a VAE's scaling factor), kept on resume
        progress = self.dir / "progress.json"
        if (self.dir / "model.safetensors").exists() and progress.exists():
            state = load_file(self.dir / "model.safetensors")
            model.load_state_dict({k: v.float() for k, v in state.items()})
            info = json.loads(progress.read_text())
            self.step = info["step"]
            self.meta = {k: v for k, v in info.items() if k not in ("step", "loss_last50", "seconds_this_run")}
            print(f"[{name}] resumed at step {self.step}")
        self.start = time.time()
        self.losses: list[float] = []

    def progress(self) -> float:
        """Fraction of the stage done, by steps or by this run's time limit, whichever is further."""
        by_time = (time.time() - self.start) / self.time_limit if self.time_limit else 0.0
        return min(1.0, max(self.step / self.total, by_time))

    def done(self) -> bool:
        over_time = self.time_limit is not None and time.time() - self.start > self.time_limit
        return self.step >= self.total or over_time

    def update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, bar) -> None:
        """One optimizer step on `loss` (gradient norm clipped to 1), then count it."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        self.tick(loss.item(), bar)

    def tick(self, loss: float, bar) -> None:
        self.step += 1
        self.losses.append(loss)
        bar.update(1)
        if self.step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
        if self.step % self.save_every == 0:
            self.save()

    def save(self, extra: dict | None = None) -> None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, self.dir / "model.tmp.safetensors")
        os.replace(self.dir / "model.tmp.safetensors", self.dir / "model.safetensors")
        self.meta.update(extra or {})
        info = {"step": self.step, "loss_last50": float(np.mean(self.losses[-50:])) if self.losses else None,
                "seconds_this_run": round(time.time() - self.start, 1), **self.meta}
        (self.dir / "progress.json").write_text(json.dumps(info, indent=2))


def cosine_lr(opt, base: float, st: Stage, warmup: int = 200) -> None:
    """Linear warm-up, then cosine decay to 10% over the stage's progress (steps or time)."""
    lr = base * min(1.0, (st.step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * st.progress())))
    for g in opt.param_groups:
        g["lr"] = lr


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------


def stage_vae(work: Path, factor: int, images: np.ndarray, steps: int, batch: int, device, args) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(factor)).to(device)
    st = Stage(work, f"vae{factor}", vae, steps, args.time_limit, args.save_every)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = np.random.default_rng(1000 + st.step)
    with tqdm(total=steps, initial=st.step, desc=f"vae{factor}") as bar:
        while not st.done():
            cosine_lr(opt, 1e-3, st)
            x = to_tensor(images[gen.integers(0, len(images), batch)], device)
            with autocast(device):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample
            # L1 + MSE keeps edges sharper than MSE alone; a tiny KL keeps latents near N(0, s^2).
            loss = F.mse_loss(rec.float(), x) + 0.5 * F.l1_loss(rec.float(), x) + 1e-6 * post.kl().mean()
            st.update(opt, loss, bar)
    # scaling factor = 1 / std of the latents, as Stable Diffusion's 0.18215
    vae.eval()
    with torch.no_grad():
        x = to_tensor(images[:512], device)
        z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * torch.log10(4.0 / F.mse_loss(rec, x)).item()
    st.save({"scaling_factor": float(1.0 / z.std()), "psnr_db": round(psnr, 2)})
    print(f"[vae{factor}] step {st.step} psnr {psnr:.2f} dB scaling {1.0 / z.std().item():.4f}")


def stage_vae4_decoder(work: Path, images: np.ndarray, captions: list[str], steps: int, batch: int, device,
                       args) -> None:
    """Fine-tune the x4 VAE's decoder alone on MSE, from the upscaler stage's cached latents: the encoder, hence
    the latent space the upscaler UNet was trained in, stays as it is.

    With `--decoder-estimates P`, that fraction of each batch decodes the upscaler UNet's own estimate of the latent
    (its x0-prediction from the noised latent at a random step, half of them from pure noise: a one-step upscale)
    instead of the true latent, so the pipeline's output, not only the latent, is regressed onto the render: a
    decoder trained on true latents alone turns the blurry mean-like latents of a short sampler into artefacts.
    """
    from diffusers import UNet2DConditionModel

    if args.decoder_estimates > 0 and not best_weights(work / "upscaler").exists():  # before the minutes of encoding
        raise SystemExit(f"--decoder-estimates needs the upscaler stage's weights in {work / 'upscaler'}: "
                         "run the `upscaler` (or `from-weights`) stage first")
    vae = load_vae(work, 4, device).train()
    mean, std = cached_latents(vae, images, device, work / "upscaler" / f"latents_{len(images)}.pt")
    scale = vae.config.scaling_factor
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    if args.decoder_estimates > 0:
        text = caption_states(work, captions, device)
        unet = UNet2DConditionModel(**upscaler_unet_config())
        unet.load_state_dict(load_file(best_weights(work / "upscaler")))
        unet.to(device).eval().requires_grad_(False)
        sched, low_res_sched = upscaler_schedulers()
        acp = sched.alphas_cumprod.to(device)
    st = Stage(work, "vae4", vae, steps, args.time_limit, args.save_every)
    opt = torch.optim.AdamW(params, lr=args.lr_decoder, weight_decay=0.0)
    gen = torch.Generator().manual_seed(6000 + st.step)
    with tqdm(total=steps, initial=st.step, desc="vae4-decoder") as bar:
        while not st.done():
            cosine_lr(opt, args.lr_decoder, st)
            idx = torch.randint(0, len(images), (batch,), generator=gen)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device)
            x = to_tensor(images[idx.numpy()], device)
            rows = torch.rand(batch, generator=gen) < args.decoder_estimates
            if rows.any():
                n = int(rows.sum())
                with torch.no_grad():
                    noise_level = torch.full((n,), 20, device=device)  # the pipeline's default
                    low = F.interpolate(x[rows], scale_factor=0.25, mode="area")
                    low = low_res_sched.add_noise(low, torch.randn(low.shape, generator=gen).to(device), noise_level)
                    t = torch.randint(0, 1000, (n,), generator=gen)
                    t = torch.where(torch.rand(n, generator=gen) < 0.5, 999, t).to(device)
                    zt = sched.add_noise(z[rows] * scale, torch.randn(z[rows].shape, generator=gen).to(device), t)
                    v = unet(torch.cat([zt, low], 1), t, encoder_hidden_states=text.hidden[text.row[idx[rows]]],
                             class_labels=noise_level).sample
                    a = acp[t].view(-1, 1, 1, 1)
                    z[rows] = (a.sqrt() * zt - (1 - a).sqrt() * v) / scale  # x0 from v-prediction
            with autocast(device):
                rec = vae.decode(z).sample
            st.update(opt, F.mse_loss(rec.float(), x), bar)
    vae.eval()
    with torch.no_grad():
        x = to_tensor(images[:512], device)
        rec = vae.decode(mean[:512].to(device)).sample.clamp(-1, 1)
        psnr = 10 * torch.log10(4.0 / F.mse_loss(rec, x)).item()
    st.save({"scaling_factor": scale, "psnr_db": round(psnr, 2)})
    print(f"[vae4-decoder] step {st.step} psnr {psnr:.2f} dB")


def load_vae(work: Path, factor: int, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(factor))
    vae.load_state_dict(load_file(work / f"vae{factor}" / "model.safetensors"))
    info = json.loads((work / f"vae{factor}" / "progress.json").read_text())
    vae.register_to_config(scaling_factor=info["scaling_factor"])
    return vae.to(device).eval()


def blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random box blur / down-up sampling: the judge must see what the decoder can produce."""
    k = int(torch.randint(1, 4, (1,), generator=gen))
    return F.interpolate(F.avg_pool2d(x, 2 * k - 1 if k > 1 else 1, stride=1, padding=k - 1), size=x.shape[-2:])


def stage_clip(work: Path, images, ids, concepts, steps, batch, device, args) -> None:
    from transformers import CLIPModel

    model = CLIPModel(clip_config()).to(device)
    vae = load_vae(work, 8, device)
    st = Stage(work, "clip", model, steps, args.time_limit, args.save_every)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    labels_all = {c: i for i, c in enumerate(sorted(set(concepts)))}
    labels = torch.tensor([labels_all[c] for c in concepts])
    gen = np.random.default_rng(2000 + st.step)
    tgen = torch.Generator().manual_seed(2000 + st.step)
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=device).view(1, 3, 1, 1)
    with tqdm(total=steps, initial=st.step, desc="clip") as bar:
        while not st.done():
            cosine_lr(opt, 5e-4, st)
            idx = gen.integers(0, len(images), batch)
            x = to_tensor(images[idx], device)
            n = batch // 2  # half VAE reconstructions, a quarter blurred, a quarter clean
            with torch.no_grad():
                x[:n] = vae.decode(vae.encode(x[:n]).latent_dist.sample()).sample.clamp(-1, 1)
                x[n: n + n // 2] = blur(x[n: n + n // 2], tgen)
            pix = ((x + 1) / 2 - mean) / std
            y = labels[idx].to(device)
            with autocast(device):
                out = model(input_ids=ids[idx].to(device), pixel_values=pix)
            logits = out.logits_per_image.float()
            # Same-concept pairs are positives (many per batch): soft targets instead of the identity.
            pos = (y[:, None] == y[None, :]).float()
            target = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                          + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
            st.update(opt, loss, bar)
    st.save()


def load_clip(work: Path, device):
    from transformers import CLIPModel

    model = CLIPModel(clip_config())
    missing, unexpected = model.load_state_dict(load_file(work / "clip" / "model.safetensors"), strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:  # a silent partial load would be garbage
        raise RuntimeError(f"toy CLIP checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def cached_latents(vae, images: np.ndarray, device, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_latents`, saved at `path` once: a resumed stage skips the encoding (minutes on CPU)."""
    if path.exists():
        mean, std = torch.load(path, weights_only=True).values()
        return mean, std
    mean, std = encode_latents(vae, images, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return mean, std


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode"):
        d = vae.encode(to_tensor(images[i: i + batch], device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def text_hidden(text_model, ids: torch.Tensor, device, batch: int = 4096) -> torch.Tensor:
    """Frozen text-tower last hidden states (what the pipeline's CLIPTextModel returns)."""
    out = []
    for i in range(0, len(ids), batch):
        out.append(text_model(input_ids=ids[i: i + batch].to(device)).last_hidden_state.cpu())
    return torch.cat(out)


@dataclass
class CaptionStates:
    """The frozen text tower's hidden states of every distinct caption, computed once; `row[i]` is caption i's
    row of `hidden` and `empty` the row of "", the unconditional prompt of classifier-free guidance."""

    hidden: torch.Tensor
    row: torch.Tensor
    empty: int
    text_model: torch.nn.Module


def caption_states(work: Path, captions: list[str], device) -> CaptionStates:
    clip_model = load_clip(work, device)
    unique = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(unique)}
    hidden = text_hidden(clip_model.text_model, tokenize(unique), device).to(device)
    return CaptionStates(hidden, torch.tensor([index[c] for c in captions]), index[""], clip_model.text_model)


def parse_oversample(text: str) -> dict[str, float]:
    """'angelfish=4,nemo=2' -> {'angelfish': 4.0, 'nemo': 2.0}, checked against the catalogue before any work."""
    from ablation.toyworld import catalog

    out = {}
    for item in (kv for kv in text.split(",") if kv):
        name, sep, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not sep or value <= 0:
            raise SystemExit(f"--oversample: {item!r} is not concept=factor with a factor > 0, e.g. 'angelfish=4'")
        if name not in catalog().concepts:
            raise SystemExit(f"--oversample: unknown concept {name!r}; known: {', '.join(sorted(catalog().concepts))}")
        out[name] = value
    return out


def sampling_weights(concepts: list[str], oversample: dict[str, float]) -> torch.Tensor | None:
    """Per-image sampling weights that draw the named concepts `factor` times as often (None: uniform)."""
    if not oversample:
        return None
    unknown = set(oversample) - set(concepts)
    if unknown:
        raise SystemExit(f"--oversample names concepts not in the data: {sorted(unknown)}")
    names = np.array(concepts)
    weights = np.ones(len(names))
    for concept, factor in oversample.items():
        weights[names == concept] *= factor
    return torch.from_numpy(weights)


def stage_unet(work: Path, images, captions, concepts, steps, batch, lr, device, args) -> None:
    from diffusers import UNet2DConditionModel

    vae = load_vae(work, 8, device)
    mean, std = cached_latents(vae, images, device, work / "unet" / f"latents_{len(images)}.pt")
    scale = vae.config.scaling_factor
    text = caption_states(work, captions, device)
    hidden, cap_idx, empty = text.hidden, text.row, text.empty
    # --reword: that fraction of captions is replaced by a rewording drawn each step (other frames, word order,
    # synonyms, fillers; ablation.toyworld.rewording), encoded by the same frozen text tower
    text_model = text.text_model if args.reword > 0 else None
    from ablation.toyworld.rewording import reword
    unet = UNet2DConditionModel(**unet_config()).to(device)
    st = Stage(work, "unet", unet, steps, args.time_limit, args.save_every)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = train_scheduler()
    acp = sched.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(3000 + st.step)
    word_rng = random.Random(5000 + st.step)
    ema = Ema(unet, UNet2DConditionModel(**unet_config()), work / "unet" / "ema.safetensors")
    # --oversample: a continuation that drills concepts the generator still confuses (docs/toyworld.md)
    weights = sampling_weights(concepts, args.oversample)
    with tqdm(total=steps, initial=st.step, desc="unet") as bar:
        while not st.done():
            cosine_lr(opt, lr, st, warmup=500)
            if weights is None:
                idx = torch.randint(0, len(images), (batch,), generator=gen)
            else:
                idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device) * scale
            c = cap_idx[idx].clone()
            c[torch.rand(batch, generator=gen) < 0.1] = empty  # caption dropout for classifier-free guidance
            t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            a = acp[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            cond = hidden[c.to(device)]
            if text_model is not None:
                rows = [i for i in range(batch) if c[i] != empty and word_rng.random() < args.reword]
                if rows:
                    texts = [reword(concepts[idx[i]], captions[idx[i]], word_rng) for i in rows]
                    with torch.no_grad():
                        cond[rows] = text_hidden(text_model, tokenize(texts), device).to(device)
            with autocast(device):
                pred = unet(zt, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), noise)
            st.update(opt, loss, bar)
            ema.update(st.step, save=st.step % st.save_every == 0)
    st.save()
    ema.save()


class Ema:
    """Exponential moving average of a model's weights (what gets shipped), kept in `shadow` and saved to `path`;
    resumes from `path` when it exists, else starts from the model's weights (a continuation: the trained model)."""

    def __init__(self, model: torch.nn.Module, shadow: torch.nn.Module, path: Path, decay: float = 0.999):
        self.model, self.shadow, self.path, self.decay = model, shadow, path, decay
        shadow.load_state_dict(load_file(path) if path.exists() else model.state_dict())
        shadow.to(next(model.parameters()).device)
        self.params = [p.detach() for p in shadow.parameters()]

    @torch.no_grad()
    def update(self, step: int, save: bool = False) -> None:
        d = min(self.decay, step / (9 + step))  # warm-up: early weights do not linger
        torch._foreach_lerp_(self.params, [p.detach() for p in self.model.parameters()], 1 - d)
        if save:
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp.safetensors")
        save_file({k: v.float().cpu().contiguous() for k, v in self.shadow.state_dict().items()}, tmp)
        os.replace(tmp, self.path)


def upscaler_schedulers():
    """The upscaler's training noise schedule (v-prediction) and its low-resolution input's noise schedule."""
    from diffusers import DDPMScheduler

    return (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                          prediction_type="v_prediction"),
            DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02))


def stage_upscaler(work: Path, images, captions, steps, batch, lr, device, args) -> None:
    from diffusers import UNet2DConditionModel

    vae = load_vae(work, 4, device)
    mean, std = cached_latents(vae, images, device, work / "upscaler" / f"latents_{len(images)}.pt")
    scale = vae.config.scaling_factor
    del vae
    text = caption_states(work, captions, device)
    unet = UNet2DConditionModel(**upscaler_unet_config()).to(device)
    st = Stage(work, "upscaler", unet, steps, args.time_limit, args.save_every)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    ema = Ema(unet, UNet2DConditionModel(**upscaler_unet_config()), work / "upscaler" / "ema.safetensors")
    sched, low_res_sched = upscaler_schedulers()
    gen = torch.Generator().manual_seed(4000 + st.step)
    with tqdm(total=steps, initial=st.step, desc="upscaler") as bar:
        while not st.done():
            cosine_lr(opt, lr, st)
            idx = torch.randint(0, len(images), (batch,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device) * scale
            low = F.interpolate(to_tensor(images[idx.numpy()], device), scale_factor=0.25, mode="area")
            # --low-noise-share: that fraction of inputs is noised below level 50 (the pipeline's default is 20), the
            # rest up to the pipeline's max_noise_level 350; --high-t-share: that fraction of steps from the last 200,
            # where the UNet's estimate is the posterior mean (what a one-step upscale returns)
            noise_level = torch.randint(0, 350, (batch,), generator=gen)
            low_noise = torch.rand(batch, generator=gen) < args.low_noise_share
            noise_level = torch.where(low_noise, noise_level % 50, noise_level).to(device)
            low = low_res_sched.add_noise(low, torch.randn(low.shape, generator=gen).to(device), noise_level)
            c = text.row[idx].clone()
            c[torch.rand(batch, generator=gen) < 0.1] = text.empty
            t = torch.randint(0, 1000, (batch,), generator=gen)
            t = torch.where(torch.rand(batch, generator=gen) < args.high_t_share, 800 + t % 200, t).to(device)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            zt = sched.add_noise(z0, noise, t)
            with autocast(device):
                pred = unet(torch.cat([zt, low], 1), t, encoder_hidden_states=text.hidden[c.to(device)],
                            class_labels=noise_level).sample
            loss = F.mse_loss(pred.float(), sched.get_velocity(z0, noise, t))
            st.update(opt, loss, bar)
            ema.update(st.step, save=st.step % st.save_every == 0)
    st.save()
    ema.save()


# ------------------------------------------------------------------------------------------------
# assembling the shipped folders (fp16 safetensors, standard layouts)
# ------------------------------------------------------------------------------------------------


#: StableDiffusionUpscalePipeline resets any other VAE scaling factor to this value (diffusers 0.42).
UPSCALER_SCALING_FACTOR = 0.08333


def fold_scaling_factor(vae, target: float):
    """Give `vae` the scaling factor `target` without changing what the scaled latents mean.

    The upscaler's UNet was trained on `z * s` (s = the trained factor) and the pipeline decodes
    `latents / target`; scaling the latent space by c = target / s inside the VAE (encoder mean and
    std divided by c, decoder input multiplied by c) makes both agree.
    """
    c = target / vae.config.scaling_factor
    ch = vae.config.latent_channels
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(c)
        vae.quant_conv.weight[:ch].div_(c)
        vae.quant_conv.bias[:ch].div_(c)
        vae.quant_conv.bias[ch:].sub_(2 * math.log(c))  # log-variance of z / c
    vae.register_to_config(scaling_factor=target)
    return vae


def _slim_tokenizer(folder: Path) -> None:
    """Ship vocab.json + merges.txt (1.5 MB) instead of the 3.6 MB tokenizer.json transformers writes;
    `CLIPTokenizer.from_pretrained` builds the same tokenizer from either."""
    from ablation.tokenizer_util import TOKENIZER_DIR

    (folder / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)


def _atomic_dir(dest: Path, write) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for tokenizer_json in tmp.rglob("tokenizer.json"):
        _slim_tokenizer(tokenizer_json.parent)
    # Weights are stored in fp16 for size, but transformers 5 loads in the config's dtype by default:
    # declare float32 so that a plain `from_pretrained` gives fp32 text encoders, like diffusers' models.
    for config in tmp.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.get("dtype") == "float16":
            config.write_text(json.dumps({**data, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def best_weights(stage_dir: Path, use_ema: bool = True) -> Path:
    """A stage's EMA weights when it keeps them (unet, upscaler), else its trained weights."""
    ema = stage_dir / "ema.safetensors"
    return ema if use_ema and ema.exists() else stage_dir / "model.safetensors"


def stage_assemble(work: Path, out: Path, use_ema: bool = True) -> None:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTextModel

    tok = clip_tokenizer(TEXT_LEN)
    clip_model = load_clip(work, "cpu")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}),
        tokenizer=tok)
    _atomic_dir(out / "clip", lambda d: (clip_model.half().save_pretrained(d), processor.save_pretrained(d)))
    text_encoder = CLIPTextModel(clip_model.config.text_config)
    text_encoder.load_state_dict(clip_model.float().text_model.state_dict())
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
    unet = UNet2DConditionModel(**unet_config())
    unet.load_state_dict(load_file(best_weights(work / "unet", use_ema)))
    pipe = StableDiffusionPipeline(vae=load_vae(work, 8, "cpu"), text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**sched_kw), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _atomic_dir(out / "pipeline", lambda d: pipe.to(torch.float16).save_pretrained(d))
    if (work / "upscaler" / "model.safetensors").exists():
        up_unet = UNet2DConditionModel(**upscaler_unet_config())
        up_unet.load_state_dict(load_file(best_weights(work / "upscaler", use_ema)))
        up = StableDiffusionUpscalePipeline(
            vae=fold_scaling_factor(load_vae(work, 4, "cpu"), UPSCALER_SCALING_FACTOR),
            text_encoder=CLIPTextModel(clip_model.config.text_config), tokenizer=tok,
            unet=up_unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                                  prediction_type="v_prediction", clip_sample=False,
                                                  timestep_spacing="trailing"),  # 1 step: t = 999, not 0
            low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
            max_noise_level=350)
        up.text_encoder.load_state_dict(text_encoder.state_dict())
        _atomic_dir(out / "upscaler", lambda d: up.to(torch.float16).save_pretrained(d))
    print(f"[assemble] wrote {out}")


def replace_weights(src: Path, dest: Path) -> None:
    """Write the fp16 copy of the safetensors file `src` over the shipped weights file `dest` (same architecture:
    the folder's config and every link other folders keep to it stay as they are)."""
    state = {k: v.half().contiguous() for k, v in load_file(src).items()}
    tmp = dest.with_suffix(".tmp.safetensors")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, dest)
    print(f"[assemble] wrote {dest}")


def stage_assemble_unet(work: Path, out: Path) -> None:
    """Replace only the shipped pipeline's UNet by the stage's EMA weights (a continuation of the UNet alone:
    the text encoder, VAE, judge and upscaler files, and the links other folders keep to them, stay as they are)."""
    replace_weights(best_weights(work / "unet"), out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def stage_assemble_upscaler(work: Path, out: Path) -> None:
    """Replace only the shipped upscaler's UNet (EMA) and x4 VAE (a continuation of the `upscaler` and
    `vae4-decoder` stages); the VAE keeps the pipeline's scaling factor, which the work directory's VAE has when it
    was rebuilt with `from-weights`."""
    scaling = json.loads((work / "vae4" / "progress.json").read_text())["scaling_factor"]
    if abs(scaling - UPSCALER_SCALING_FACTOR) > 1e-6:
        raise SystemExit(f"work vae4 has scaling factor {scaling}, not the pipeline's {UPSCALER_SCALING_FACTOR}: "
                         "use `assemble` (it folds the factor into the weights)")
    weights = "diffusion_pytorch_model.safetensors"
    replace_weights(best_weights(work / "upscaler"), out / "upscaler" / "unet" / weights)
    replace_weights(work / "vae4" / "model.safetensors", out / "upscaler" / "vae" / weights)


def link(path: Path, target: str) -> None:
    """Replace `path` by a relative symbolic link to `target` (which must exist)."""
    if not (path.parent / target).exists():
        raise FileNotFoundError(f"{path} would link to a missing {target}")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


def stage_share(out: Path) -> None:
    """Store every file the shipped folders share once: relative links to one copy (idempotent).

    * tokenizer files -> the package's `ablation/tokenizer` (the pipeline's slimmed tokenizer_config is the
      judge's and the upscaler's);
    * the upscaler's text encoder -> the pipeline's;
    * the judge's text tower: the pipeline's text-encoder file, with its keys named `text_model.*` (which
      `CLIPTextModel` loads as well), is the first shard of the judge's two-shard `CLIPModel` checkpoint; the
      second holds the vision tower, the projections and the logit scale. Checked to be the same tensors first.
    """
    pipeline, clip, up = out / "pipeline", out / "clip", out / "upscaler"
    for folder, depth in ((pipeline / "tokenizer", "../../../../"), (up / "tokenizer", "../../../../"),
                          (clip, "../../../")):
        for name in ("merges.txt", "special_tokens_map.json", "vocab.json"):
            link(folder / name, depth + "tokenizer/" + name)
    link(up / "tokenizer" / "tokenizer_config.json", "../../pipeline/tokenizer/tokenizer_config.json")
    link(clip / "tokenizer_config.json", "../pipeline/tokenizer/tokenizer_config.json")
    for name in ("config.json", "model.safetensors"):
        link(up / "text_encoder" / name, "../../pipeline/text_encoder/" + name)
    te_file, single = pipeline / "text_encoder" / "model.safetensors", clip / "model.safetensors"
    if single.exists():
        text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in load_file(te_file).items()}
        judge = load_file(single)
        for key, value in text.items():
            if not torch.equal(judge[key], value):
                raise ValueError(f"the judge's {key} differs from the pipeline's text encoder: not shareable")
        rest = {k: v for k, v in judge.items() if k not in text}
        for path, tensors in ((te_file, text), (clip / "model-00002-of-00002.safetensors", rest)):
            tmp = path.with_suffix(".tmp")
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.replace(tmp, path)
        link(clip / "model-00001-of-00002.safetensors", "../pipeline/text_encoder/model.safetensors")
        weight_map = {k: "model-00001-of-00002.safetensors" for k in text} | {
            k: "model-00002-of-00002.safetensors" for k in rest}
        (clip / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        single.unlink()
        # the toy MMDiT's text tower links to the same file: its shard index names the renamed keys
        index = out / "sd3" / "text_encoder" / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            shared = "model-00001-of-00002.safetensors"
            data["weight_map"] = {("text_model." + k if v == shared and not k.startswith("text_model.") else k): v
                                  for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"[share] {out}: shared files are links")


def stage_pack(work: Path, dest: Path) -> None:
    """Copy every stage's weights as fp16 (small enough to move) plus one progress.json to `dest`.

    `unpack` reverses it into a work directory from which every stage resumes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    progress = {}
    for name in ("vae8", "vae4", "clip", "unet", "upscaler"):
        src = best_weights(work / name)
        if src.exists():
            save_file({k: v.half().contiguous() for k, v in load_file(src).items()}, dest / f"{name}.safetensors")
            progress[name] = json.loads((work / name / "progress.json").read_text())
    (dest / "progress.json").write_text(json.dumps(progress, indent=2))


def stage_from_weights(weights: Path, work: Path) -> None:
    """Rebuild the stage checkpoints from the shipped folders, to continue training them."""
    sources = {"vae8": weights / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors",
               "vae4": weights / "upscaler" / "vae" / "diffusion_pytorch_model.safetensors",
               "clip": weights / "clip",
               "unet": weights / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors",
               "upscaler": weights / "upscaler" / "unet" / "diffusion_pytorch_model.safetensors"}
    for name, src in sources.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        if src.is_dir():  # the judge: a two-shard CLIPModel checkpoint (its text tower is the pipeline's file)
            from transformers import CLIPModel

            state = {k: v.float().contiguous() for k, v in CLIPModel.from_pretrained(src).state_dict().items()}
        else:
            state = {k: v.float() for k, v in load_file(src).items()}
        save_file(state, work / name / "model.safetensors")
        if name == "unet":
            save_file(state, work / name / "ema.safetensors")
        info = {"step": 0, "from_weights": str(src)}
        if name.startswith("vae"):
            info["scaling_factor"] = json.loads((src.parent / "config.json").read_text())["scaling_factor"]
        (work / name / "progress.json").write_text(json.dumps(info, indent=2))


def stage_unpack(src: Path, work: Path) -> None:
    progress = json.loads((src / "progress.json").read_text())
    for name, info in progress.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        weights = {k: v.float() for k, v in load_file(src / f"{name}.safetensors").items()}
        save_file(weights, work / name / "model.safetensors")
        if name == "unet":
            save_file(weights, work / name / "ema.safetensors")
        (work / name / "progress.json").write_text(json.dumps(info, indent=2))


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", choices=["all", "data", "vae8", "vae4", "vae4-decoder", "clip", "unet",
                                                      "upscaler",
                                                      "assemble", "assemble-unet", "assemble-upscaler", "share",
                                                      "pack",
                                                      "unpack", "from-weights"])
    parser.add_argument("--pack-dir", type=Path, default=None, help="for pack/unpack: the fp16 transfer folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / "work_toy", help="checkpoints and the rendered data")
    parser.add_argument("--out", type=Path, default=ROOT / "ablation" / "toyworld" / "weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per stage (this run)")
    parser.add_argument("--stage-seconds", default="", help="per-stage time limits, e.g. vae8=90,unet=240")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    for field in ("vae8_steps", "vae4_steps", "clip_steps", "unet_steps", "upscaler_steps", "num_images"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=None, help="override the preset")
    parser.add_argument("--lr-unet", type=float, default=None, help="override the preset (e.g. lower to continue)")
    parser.add_argument("--lr-decoder", type=float, default=2e-4, help="vae4-decoder stage: learning rate")
    parser.add_argument("--low-noise-share", type=float, default=0.0,
                        help="upscaler stage: fraction of low-resolution inputs noised below level 50 (else 0-350)")
    parser.add_argument("--high-t-share", type=float, default=0.0,
                        help="upscaler stage: fraction of training steps drawn from the last 200 timesteps")
    parser.add_argument("--decoder-estimates", type=float, default=0.0,
                        help="vae4-decoder stage: fraction of each batch that decodes the upscaler UNet's estimates")
    parser.add_argument("--reword", type=float, default=0.0,
                        help="unet stage: fraction of captions replaced by a fresh rewording each step (e.g. 0.5)")
    parser.add_argument("--oversample", default="",
                        help="unet stage: draw these concepts more often, e.g. 'angelfish=4,nemo=2'")
    args = parser.parse_args()
    args.oversample = parse_oversample(args.oversample)
    for share in ("reword", "low_noise_share", "high_t_share", "decoder_estimates"):
        if not 0.0 <= getattr(args, share) <= 1.0:
            parser.error(f"--{share.replace('_', '-')} is a fraction: give a value in [0, 1]")
    preset = PRESETS[args.preset]
    for field in ("vae8_steps", "vae4_steps", "clip_steps", "unet_steps", "upscaler_steps", "num_images", "lr_unet"):
        if getattr(args, field) is not None:
            setattr(preset, field, getattr(args, field))
    stages = ["data", "vae8", "vae4", "clip", "unet", "upscaler", "assemble"] if "all" in args.stages else args.stages
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timings = {}
    limits = dict(kv.split("=") for kv in args.stage_seconds.split(",") if kv)
    default_limit = args.time_limit
    for stage in stages:
        t0 = time.time()
        args.time_limit = float(limits[stage]) if stage in limits else default_limit
        if stage == "data":
            stage_data(args.work, preset.num_images, args.workers)
        elif stage == "pack":
            stage_pack(args.work, args.pack_dir)
        elif stage == "unpack":
            stage_unpack(args.pack_dir, args.work)
        elif stage == "from-weights":
            stage_from_weights(args.out, args.work)
        elif stage == "assemble":
            stage_assemble(args.work, args.out)
            stage_share(args.out)
        elif stage == "share":
            stage_share(args.out)
        elif stage == "assemble-unet":
            stage_assemble_unet(args.work, args.out)
        elif stage == "assemble-upscaler":
            stage_assemble_upscaler(args.work, args.out)
        else:
            images, captions, concepts = load_data(args.work, preset.num_images)
            if stage in ("vae8", "vae4"):
                steps = preset.vae8_steps if stage == "vae8" else preset.vae4_steps
                stage_vae(args.work, int(stage[-1]), images, steps, preset.batch_vae, device, args)
            elif stage == "vae4-decoder":
                stage_vae4_decoder(args.work, images, captions, preset.vae4_steps, preset.batch_vae, device, args)
            elif stage == "clip":
                stage_clip(args.work, images, tokenize(captions), concepts, preset.clip_steps, preset.batch_clip,
                           device, args)
            elif stage == "unet":
                stage_unet(args.work, images, captions, concepts, preset.unet_steps, preset.batch_unet, preset.lr_unet,
                           device, args)
            elif stage == "upscaler":
                stage_upscaler(args.work, images, captions, preset.upscaler_steps, preset.batch_upscaler,
                               preset.lr_unet, device, args)
        timings[stage] = round(time.time() - t0, 1)
        print(json.dumps({"stage": stage, "seconds": timings[stage], "device": str(device)}), flush=True)
    print(json.dumps({"timings": timings, "preset": args.preset, "device": str(device)}))


if __name__ == "__main__":
    main()
