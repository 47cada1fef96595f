"""Train the toy MMDiT: a small `SD3Transformer2DModel` on the toy world, shipped as `toy-sd3`.

It reuses the UNet toy model's frozen parts (VAE, text tower, tokenizer) so that only the transformer is
trained, and it is assembled as a standard `StableDiffusion3Pipeline` folder whose shared parts are relative
links to the UNet toy model's files (stored once, issue 13):

    python scripts/train_toy_mmdit.py data                  # render + encode the training set (minutes)
    nice python scripts/train_toy_mmdit.py train --time-limit 3600   # resumable; run again to continue
    python scripts/train_toy_mmdit.py eval --samples 8      # toy CLIP accuracy per concept, held-out prompts
    python scripts/train_toy_mmdit.py assemble              # -> ablation/toyworld/weights/sd3

Pipeline shape: both CLIP encoders are the toy text tower (with an identity `text_projection`, so the pooled
embedding is the tower's pooled output), and there is no T5 (`text_encoder_3=None`): the pipeline then feeds
`max_sequence_length` (256) all-zero T5 tokens. Identical tokens stay identical through every joint block, so
256 of them act exactly like one token whose attention logit is raised by log(256). Training uses that one
token and the raised logit (a 4x cheaper step on CPU); sampling through the unmodified pipeline is the same
function (`check_equivalence` tests it on the model before training).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("train_toyworld", ROOT / "scripts" / "train_toyworld.py")
tw = importlib.util.module_from_spec(_spec)
sys.modules["train_toyworld"] = tw  # its dataclasses look their module up
_spec.loader.exec_module(tw)

from ablation.toyworld import WEIGHTS_DIR, pipeline_dir  # noqa: E402

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero tokens it feeds without T5


def transformer_config() -> dict:
    # 6 joint blocks of width 128 on 2x2 patches of the 8x8x4 latents (16 image tokens): 3.5 M parameters,
    # 0.43 s per step of 64 on one CPU thread. joint_attention_dim = the two 64-wide CLIP towers side by side.
    return dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                pooled_projection_dim=128, pos_embed_max_size=8)


# ------------------------------------------------------------------------------------------------
# the pipeline skeleton (frozen parts from the UNet toy model)
# ------------------------------------------------------------------------------------------------


def text_encoder():
    """The toy text tower as `CLIPTextModelWithProjection`, with an identity projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    src = pipeline_dir() / "text_encoder"
    config = CLIPTextConfig.from_pretrained(src)
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v.float()
             for k, v in load_file(src / "model.safetensors").items()}
    state["text_projection.weight"] = torch.eye(config.projection_dim, config.hidden_size)
    model.load_state_dict(state)
    return model.eval()


def skeleton(transformer=None):
    """A `StableDiffusion3Pipeline` of the toy parts; a fresh transformer unless one is given."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(pipeline_dir() / "vae")
    vae.register_to_config(shift_factor=0.0)  # SD3's decode adds it; the toy VAE has none
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir() / "tokenizer")
    encoder = text_encoder()
    if transformer is None:
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**transformer_config())
    # shift 1: 8x8 latents are far below the 128x128 that SD3's shift 3 was chosen for
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoder,
                                    tokenizer=tokenizer, text_encoder_2=encoder, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------
# 256 zero tokens == 1 token with its logit raised by log(256)
# ------------------------------------------------------------------------------------------------


class _ZeroTokenSDPA:
    """Stands in for `torch.nn.functional` inside diffusers' attention processors while `on`: the last key
    (the single T5 zero token) gets an additive logit of log(256)."""

    on = False

    def __getattr__(self, name):
        return getattr(F, name)

    def scaled_dot_product_attention(self, q, k, v, attn_mask=None, **kwargs):
        if self.on:
            bias = torch.zeros(1, 1, 1, k.shape[-2], dtype=q.dtype, device=q.device)
            bias[..., -1] = math.log(T5_TOKENS)
            attn_mask = bias if attn_mask is None else attn_mask + bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


ZERO_TOKEN = _ZeroTokenSDPA()


def install_zero_token_sdpa() -> None:
    # hand-written because diffusers has no attention-bias hook for the joint processor; training only
    import diffusers.models.attention_processor as ap

    ap.F = ZERO_TOKEN


@torch.no_grad()
def check_equivalence(pipe) -> float:
    """Max |difference| between the transformer on 256 zero T5 tokens and on 1 token with the raised logit."""
    install_zero_token_sdpa()
    full, _, pooled, _ = pipe.encode_prompt(["a photo of a cat"], None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=T5_TOKENS)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    ref = pipe.transformer(x, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
    ZERO_TOKEN.on = True
    try:
        short = pipe.transformer(x, encoder_hidden_states=full[:, :-T5_TOKENS + 1], pooled_projections=pooled,
                                 timestep=t).sample
    finally:
        ZERO_TOKEN.on = False
    return float((ref - short).abs().max())


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------


def stage_data(work: Path, num_images: int, workers: int) -> None:
    out = work / "mmdit_data.pt"
    if out.exists():
        print(f"[data] reusing {out}")
        return
    tw.stage_data(work, num_images, workers)
    images, captions, _ = tw.load_data(work, num_images)
    pipe = skeleton()
    mean, std = tw.encode_latents(pipe.vae, images, "cpu", batch=512)
    unique = sorted(set(captions) | {""})
    embeds, pooled = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(unique), 1024), desc="text"):
            e, _, p, _ = pipe.encode_prompt(unique[i:i + 1024], None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=1)
            embeds.append(e)
            pooled.append(p)
    index = {c: i for i, c in enumerate(unique)}
    data = {"mean": mean.half(), "std": std.half(), "embeds": torch.cat(embeds), "pooled": torch.cat(pooled),
            "caption": torch.tensor([index[c] for c in captions]), "empty": torch.tensor(index[""]),
            "scaling": torch.tensor(pipe.vae.config.scaling_factor)}
    torch.save(data, out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)


def stage_train(work: Path, steps: int, batch: int, lr: float, args) -> None:
    from diffusers import SD3Transformer2DModel

    data = torch.load(work / "mmdit_data.pt")
    model = SD3Transformer2DModel(**transformer_config())
    pipe = skeleton(model)
    print(f"[mmdit] 256 zero tokens vs 1 raised token: max |diff| {check_equivalence(pipe):.2e}")
    st = tw.Stage(work, "mmdit", model, steps, args.time_limit, args.save_every)
    ema_path = work / "mmdit" / "ema.safetensors"
    ema = SD3Transformer2DModel(**transformer_config())
    ema.load_state_dict(load_file(ema_path) if ema_path.exists() else model.state_dict())
    ema_params = [p.detach() for p in ema.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(5000 + st.step)
    mean, std, scale = data["mean"].float(), data["std"].float(), float(data["scaling"])
    install_zero_token_sdpa()
    ZERO_TOKEN.on = True
    last_ema_save = time.time()
    with tqdm(total=steps, initial=st.step, desc="mmdit") as bar:
        while not st.done():
            tw.cosine_lr(opt, lr, st, warmup=500)
            idx = torch.randint(0, len(mean), (batch,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
            c = data["caption"][idx].clone()
            c[torch.rand(batch, generator=gen) < 0.1] = data["empty"]  # caption dropout for guidance
            # logit-normal sigmas as SD3 was trained; z_t = (1 - s) z0 + s eps, velocity eps - z0
            sigma = torch.sigmoid(torch.randn(batch, generator=gen))
            noise = torch.randn(z0.shape, generator=gen)
            s = sigma.view(-1, 1, 1, 1)
            pred = model((1 - s) * z0 + s * noise, encoder_hidden_states=data["embeds"][c],
                         pooled_projections=data["pooled"][c], timestep=sigma * 1000).sample
            loss = F.mse_loss(pred, noise - z0)
            st.update(opt, loss, bar)
            with torch.no_grad():
                d = min(0.999, st.step / (9 + st.step))
                torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - d)
            if st.step % args.save_every == 0 or time.time() - last_ema_save > 600:
                _save_ema(ema, ema_path)
                last_ema_save = time.time()
    st.save()
    _save_ema(ema, ema_path)


def _save_ema(ema, path: Path) -> None:
    save_file({k: v.float().contiguous() for k, v in ema.state_dict().items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_trained(work: Path, use_ema: bool = True):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**transformer_config())
    path = work / "mmdit" / ("ema.safetensors" if use_ema else "model.safetensors")
    model.load_state_dict(load_file(path))
    return model.eval()


def stage_eval(pipe, samples: int, families: list[str], steps: int, guidance: float) -> dict:
    """Toy-CLIP accuracy of generated images per concept on held-out prompts (the issue's >= 0.85 bar)."""
    sys.path.insert(0, str(ROOT / "eval"))
    from toyworld_quality import judged_families, prompts

    from ablation.evaluation.clip_judge import ClipJudge
    from ablation.evaluation.metrics import family_accuracy
    from ablation.toyworld import catalog, clip_dir
    from ablation.toyworld.catalog import HELDOUT_SEED_OFFSET

    judge, cat, result = ClipJudge(clip_dir(), device="cpu"), catalog(), {}
    for family, classes in judged_families().items():
        if families and family not in families:
            continue
        texts = judge.text_features([cat.concepts[c].judge_text for c in classes])
        for ci, concept in enumerate(classes):
            ps = prompts(concept, family, samples)
            gens = [torch.Generator().manual_seed(HELDOUT_SEED_OFFSET + i) for i in range(len(ps))]
            images = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
            result[concept] = round(family_accuracy(judge.image_features(images), texts, ci), 3)
            print(f"{family:12s} {concept:18s} {result[concept]:.2f}", file=sys.stderr, flush=True)
    return result


def stage_assemble(work: Path, out: Path) -> None:
    """Write the `StableDiffusion3Pipeline` folder; shared parts become relative links to the UNet toy model."""
    pipe = skeleton(load_trained(work))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    cfg = tmp / "transformer" / "config.json"
    cfg.write_text(cfg.read_text())  # diffusers' config carries no dtype; weights load into fp32 by default
    # text tower: a two-shard checkpoint whose first shard is the UNet toy model's text encoder file
    te = tmp / "text_encoder"
    (te / "model.safetensors").unlink()
    tw.link(te / "model-00001-of-00002.safetensors", "../../pipeline/text_encoder/model.safetensors")
    proj = {"text_projection.weight": pipe.text_encoder.text_projection.weight.detach().half().contiguous()}
    save_file(proj, te / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    shared = load_file(pipeline_dir() / "text_encoder" / "model.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shared} | {
        "text_projection.weight": "model-00002-of-00002.safetensors"}
    (te / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                indent=2, sort_keys=True) + "\n")
    config = json.loads((te / "config.json").read_text())
    (te / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    tw.link(tmp / "text_encoder_2", "text_encoder")
    tw.link(tmp / "tokenizer", "../pipeline/tokenizer")  # the same tokenizer folder as the UNet toy model's
    tw.link(tmp / "tokenizer_2", "tokenizer")
    vae = "diffusion_pytorch_model.safetensors"
    tw.link(tmp / "vae" / vae, "../../pipeline/vae/" + vae)
    for f in tmp.rglob("*.safetensors"):
        if not f.is_symlink():
            f.chmod(0o644)  # readable after an install by another user
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[assemble] {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["data", "train", "eval", "assemble", "check"])
    parser.add_argument("--work", type=Path, default=ROOT / "work_toy")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "sd3")
    parser.add_argument("--num-images", type=int, default=60_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for this run (then it saves)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--samples", type=int, default=8, help="eval: images per concept")
    parser.add_argument("--families", default="", help="eval: comma-separated families only")
    parser.add_argument("--sample-steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--json", type=Path, default=None, help="eval: write the accuracies here")
    args = parser.parse_args()
    if args.stage == "data":
        stage_data(args.work, args.num_images, args.workers)
    elif args.stage == "train":
        stage_train(args.work, args.steps, args.batch, args.lr, args)
    elif args.stage == "check":
        print(json.dumps({"max_abs_diff": check_equivalence(skeleton())}))
    elif args.stage == "assemble":
        stage_assemble(args.work, args.out)
    else:
        pipe = skeleton(load_trained(args.work))
        t0 = time.time()
        result = stage_eval(pipe, args.samples, [f for f in args.families.split(",") if f], args.sample_steps,
                            args.guidance)
        summary = {"per_concept": result, "min": min(result.values()), "mean": round(float(np.mean(
            list(result.values()))), 3), "below_0.85": sorted(k for k, v in result.items() if v < 0.85),
            "seconds": round(time.time() - t0, 1)}
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
