"""Check `ablate train --plan` against measured peaks: SD1.5- and SDXL-shaped random models on this machine.

For each model and configuration (dense cross-attn K/V, LoRA rank 16) the script runs one short `ablate train`
(2 anchors, 1 step, the given resolution) in a fresh process and reads that process's peak memory, then puts it
beside the plan of the same run. On the CPU the plan counts everything in the one memory (nothing is offloaded)
and the measurement is the process's peak RSS (`VmHWM`, restarted once the weights are loaded: the loader's
mapped checkpoint pages are not the run's) up to the end of training, less its RSS after the imports (interpreter,
torch, diffusers); the peak including the delta's save (host memory: LoRA merges read base tensors back) apart.
On CUDA it is `torch.cuda.max_memory_allocated`. One JSON line per run, with the ratio.

    python scripts/check_memory_plan.py --models sd15 --resolution 128              # CPU, about 3 minutes
    python scripts/check_memory_plan.py --models sd15 sdxl --mixed-precision bf16   # SDXL: ~16 GB of RAM to build
    python scripts/check_memory_plan.py --plan-only --models sd35-medium sd35-large flux-dev --resolution 1024 \\
        --mixed-precision bf16 --lora-rank 16 --gradient-checkpointing                  # configs on the meta device
    python scripts/check_memory_plan.py --plan-only --models sd35-large flux-dev --resolution 1024 \\
        --mixed-precision bf16 --lora-rank 16 --gradient-checkpointing --offload-text-encoders --fp8-base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

_CHILD = textwrap.dedent("""
    import ctypes, gc, json, sys
    def rss_kb(field):
        return int(dict(l.split(":", 1) for l in open("/proc/self/status"))[field].split()[0])
    import torch, diffusers, transformers, accelerate  # the imports' memory is not the run's
    import ablation.models
    from ablation.train_cli import main
    load = ablation.models.load_pipeline
    def loaded(*args, **kwargs):
        # the loader maps the checkpoint files while it converts them: pages of the files, which peak RSS counts
        # and an accelerator never holds; the peak restarts (clear_refs 5) once the weights are in memory
        pipe = load(*args, **kwargs)
        gc.collect()
        # glibc keeps the heap pages the loader freed (fp32 tensors of a checkpoint cast to bf16 on the way in) and
        # RSS counts them until it is asked to give them back; a GPU allocator's peak would not see them either
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        loaded_kb.append(rss_kb("VmRSS"))
        return pipe
    loaded_kb, trained_kb = [], []
    ablation.models.load_pipeline = loaded
    import ablation.trainer
    mark = ablation.trainer._Phases.mark
    def marked(self, name):
        # the plan covers the run up to its last training step; writing the delta (base tensors read back from the
        # files, merged on the host) is reported apart, as host memory
        if name == "train":
            trained_kb.append(rss_kb("VmHWM"))
        return mark(self, name)
    ablation.trainer._Phases.mark = marked
    before = rss_kb("VmRSS")
    code = main(sys.argv[1:])
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"code": code, "rss_after_imports_kb": before, "rss_after_load_kb": loaded_kb[:1],
                      "peak_rss_kb": trained_kb[0] if trained_kb else rss_kb("VmHWM"),
                      "peak_rss_with_save_kb": rss_kb("VmHWM"),
                      "peak_cuda_bytes": peak_cuda}))
""")


def build(name: str, workdir: Path) -> Path:
    """The random-weight pipeline folder of `name` (built once into `workdir`)."""
    import benchmark_train as bt

    path = workdir / name
    if not path.exists():
        {"sd15": bt.build_sd15, "sdxl": bt.build_sdxl}[name](path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--lora-rank", type=int, default=None, help="only this rank (default: dense, then 16)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--offload-text-encoders", action="store_true")
    parser.add_argument("--fp8-base", action="store_true")
    parser.add_argument("--anchor-batch-size", type=int, default=2)
    parser.add_argument("--prior-preservation", action="store_true", help="plan with the prior term (batch x 2)")
    parser.add_argument("--plan-only", action="store_true", help="print plans, run nothing")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ablation-memory-check")
    args = parser.parse_args(argv)
    import torch

    from ablation.memory import GB, PlanSettings, plan_memory
    from ablation.published import config_folder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.workdir.mkdir(parents=True, exist_ok=True)
    ranks = [args.lora_rank] if args.lora_rank is not None else [0, 16]
    for name in args.models:
        if name in ("sd15", "sdxl") and not args.plan_only:
            path = build(name, args.workdir)
        else:
            path = config_folder(name, args.workdir / f"{name}-configs")
        family = "unet" if name in ("sd15", "sdxl") else "sd3" if name.startswith("sd3") else "flux"
        for rank in ranks:
            settings = PlanSettings(params="cross-attn", lora_rank=rank, batch_size=args.batch_size,
                                    prior_preservation=False, resolution=args.resolution,
                                    mixed_precision=args.mixed_precision,
                                    gradient_checkpointing=args.gradient_checkpointing, teacher="frozen",
                                    anchor_batch_size=args.anchor_batch_size, offload=device != "cpu" or args.plan_only,
                                    offload_text_encoders=args.offload_text_encoders, fp8_base=args.fp8_base)
            if args.prior_preservation:
                settings.prior_preservation = True
            plan = plan_memory(path, settings, family)
            row = {"model": name, "device": device, "lora_rank": rank, "plan": plan.to_dict()}
            if not args.plan_only:
                out = args.workdir / f"run-{name}-{rank}"
                cmd = [sys.executable, "-c", _CHILD, "--model", str(path), "--target", "Grumpy Cat", "--anchor",
                       "Cat", "--resolution", str(args.resolution), "--num-anchor-images", "2", "--anchor-steps",
                       "1", "--anchor-batch-size", str(args.anchor_batch_size), "--max-steps", "1",
                       "--train-batch-size",
                       str(args.batch_size), "--teacher", "frozen", "--params",
                       "cross-attn", "--lora-rank", str(rank), "--mixed-precision", args.mixed_precision,
                       "--checkpointing-steps", "0", "--output-dir", str(out), "--overwrite",
                       "--cache-dir", str(args.workdir / "cache")]
                if not args.prior_preservation:
                    cmd.append("--no-prior-preservation")
                switches = ("gradient_checkpointing", "offload_text_encoders", "fp8_base", "prior_preservation")
                cmd += [f"--{k.replace('_', '-')}" for k in switches if getattr(args, k)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row["error"] = proc.stderr[-1500:]
                else:
                    got = json.loads(proc.stdout.strip().splitlines()[-1])
                    measured = (got["peak_cuda_bytes"] if device == "cuda"
                                else 1024 * (got["peak_rss_kb"] - got["rss_after_imports_kb"]))
                    row.update(measured_gb=round(measured / GB, 3), plan_over_measured=round(plan.peak / measured, 3))
                    if device == "cpu" and got["rss_after_load_kb"]:  # the weights as loaded; the save's peak
                        row["loaded_gb"] = round(1024 * (got["rss_after_load_kb"][0] - got["rss_after_imports_kb"])
                                                 / GB, 3)
                        row["with_save_gb"] = round(1024 * (got["peak_rss_with_save_kb"] - got["rss_after_imports_kb"])
                                                    / GB, 3)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
