"""Weights I/O under stress: fp32 LoRA merges under bf16, failed exports, other bases, damaged deltas, bad ids."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from ablation import checkpoint as ckpt
from ablation import models
from ablation.cli import main as cli_main
from ablation.config import ConfigError
from ablation.merge import layer_delta
from ablation.testing import delta_metadata as _meta
from ablation.testing import parameter_names as _names
from ablation.testing import perturb as _perturb
from ablation.testing import tiny_pipeline
from ablation.testing import unet_output as _unet_out


def _one_error_line(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and match in err[0], err
    return err[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must be rejected before any model's weights are loaded."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was rejected")

    monkeypatch.setattr(models, "load_pipeline", forbidden)


# --------------------------------------------------------------------------------------------------
# LoRA merged from float32 under mixed precision
# --------------------------------------------------------------------------------------------------


def test_lora_delta_under_bf16_is_the_fp32_merge(caplog):
    pipe = tiny_pipeline("sd1")
    base_names = _names(pipe.unet, (".to_k.weight", ".to_v.weight"))
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.002 * torch.randn(p.shape, generator=gen))  # a small update, as after a short run
    expected = ckpt.trained_tensors(pipe, {"unet": base_names})  # everything float32: the reference
    base = tiny_pipeline("sd1")
    base_w = {f"unet.{k}": v for k, v in base.unet.state_dict().items()}
    # what mixed-precision training does: frozen weights in bf16, adapters in fp32
    for p in pipe.unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    got = ckpt.trained_tensors(pipe, {"unet": base_names}, base_pipe=base)
    assert set(got) == set(expected) and all(t.dtype == torch.float32 for t in got.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-7, rtol=0)
    # the old merge (W + BA formed in bf16) lost a large part of the update: the tolerance above matters
    key = next(iter(expected))
    layer = pipe.unet.get_submodule(key.removeprefix("unet.").removesuffix(".weight"))
    old = (layer.get_base_layer().weight + layer_delta(layer).to(torch.bfloat16)).detach()
    update, old_update = expected[key] - base_w[key], old.float() - base_w[key]
    assert float((old_update - update).norm() / update.norm()) > 0.1
    # without the fp32 base the merge still runs in fp32, says why it is inexact, and stays closer than before
    with caplog.at_level(logging.WARNING, logger="ablation.checkpoint"):
        approx = ckpt.trained_tensors(pipe, {"unet": base_names})
    assert "without their float32 originals" in caplog.text
    assert float((approx[key] - base_w[key] - update).norm()) < float((old_update - update).norm())


# --------------------------------------------------------------------------------------------------
# exports survive a failed rename; orphans of a killed export are removed
# --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_kept_when_the_final_rename_fails(tmp_path, monkeypatch):
    pipe = tiny_pipeline("sd1")
    ckpt.export_outputs(pipe, tmp_path, ["pipeline"], None, _meta(pipe))
    before = _snapshot(tmp_path / "pipeline")
    changed = tiny_pipeline("sd1")
    _perturb(changed.unet, _names(changed.unet))
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "pipeline" and ".tmp-" in Path(src).name:
            raise OSError("simulated failure of the final rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        ckpt.export_outputs(changed, tmp_path, ["pipeline"], None, _meta(changed))
    monkeypatch.undo()
    assert _snapshot(tmp_path / "pipeline") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no .tmp-/.old- left behind

    orphan = tmp_path / ".pipeline.tmp-12345-deadbeef"  # what a killed export leaves
    (orphan / "unet").mkdir(parents=True)
    (orphan / "unet" / "half.safetensors").write_bytes(b"partial")
    ckpt.export_outputs(changed, tmp_path, ["pipeline"], None, _meta(changed))
    assert not orphan.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    assert _snapshot(tmp_path / "pipeline") != before


# --------------------------------------------------------------------------------------------------
# base-weights fingerprint
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def seeded_run(tmp_path):
    """A delta trained on the seed-0 tiny sd1, with the fingerprint of its base."""
    base = tiny_pipeline("sd1", seed=0)
    names = _names(base.unet)
    fingerprint = ckpt.base_weights_fingerprint(base, {"unet": names})
    _perturb(base.unet, names)
    tensors = ckpt.trained_tensors(base, {"unet": names})
    run = tmp_path / "run"
    ckpt.save_delta(run / "delta.safetensors", tensors, _meta(base, base_fingerprint=fingerprint))
    return run, tensors, fingerprint


def test_fingerprint_tells_seeds_apart_and_survives_dtype(seeded_run):
    _, _, fingerprint = seeded_run
    names = {"unet": _names(tiny_pipeline("sd1").unet)}
    assert ckpt.base_weights_fingerprint(tiny_pipeline("sd1", seed=0), names) == fingerprint
    other = ckpt.base_weights_fingerprint(tiny_pipeline("sd1", seed=1), names)
    assert ckpt.fingerprints_match(fingerprint, other) is False
    half = ckpt.base_weights_fingerprint(tiny_pipeline("sd1", seed=0).to(torch.bfloat16), names)
    assert half != fingerprint and ckpt.fingerprints_match(fingerprint, half) is True
    half_other = ckpt.base_weights_fingerprint(tiny_pipeline("sd1", seed=1).to(torch.bfloat16), names)
    assert ckpt.fingerprints_match(fingerprint, half_other) is False
    # adapter names map to the base weights; LoRA layers attached later do not change the fingerprint
    pipe = tiny_pipeline("sd1", seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    lora_names = [n for n, _ in pipe.unet.named_parameters() if "attn2" in n and "lora_" in n]
    assert ckpt.fingerprints_match(fingerprint, ckpt.base_weights_fingerprint(pipe, {"unet": lora_names}))


def test_delta_refused_on_other_base_weights_unless_forced(seeded_run, tmp_path, caplog):
    run, tensors, _ = seeded_run
    expected = _unet_out(ckpt.load_ablated_pipeline(tiny_pipeline("sd1", seed=0), run))
    with pytest.raises(ckpt.BaseMismatchError, match="other base weights.*--force"):
        ckpt.load_ablated_pipeline(tiny_pipeline("sd1", seed=1), run)
    with caplog.at_level(logging.WARNING, logger="ablation.checkpoint"):
        forced = ckpt.load_ablated_pipeline(tiny_pipeline("sd1", seed=1), run, force=True)
    assert "applying anyway" in caplog.text
    assert not torch.allclose(_unet_out(forced), expected)
    # a LoRA export of the delta carries the fingerprint too (ablation.json) and covers a subset of tensors
    state, _ = ckpt.svd_lora_state(tiny_pipeline("sd1", seed=0), tensors, rank=32)
    ckpt.save_lora(forced, tmp_path / "lora", state, ckpt.read_metadata(run / "delta.safetensors"))
    torch.testing.assert_close(_unet_out(ckpt.load_ablated_pipeline(tiny_pipeline("sd1", seed=0), tmp_path / "lora")),
                               expected, atol=1e-5, rtol=0)
    with pytest.raises(ckpt.BaseMismatchError):
        ckpt.load_ablated_pipeline(tiny_pipeline("sd1", seed=1), tmp_path / "lora")


def test_cli_apply_refuses_other_base_weights(seeded_run, tmp_path, capsys):
    run, _, _ = seeded_run
    other = tmp_path / "seed1"
    tiny_pipeline("sd1", seed=1).save_pretrained(other)
    out = tmp_path / "applied"
    assert cli_main(["apply", "--base", str(other), "--delta", str(run), "--out", str(out)]) == 2
    _one_error_line(capsys, "other base weights")
    assert not out.exists()
    assert cli_main(["apply", "--base", str(other), "--delta", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "model_index.json").is_file()
    assert cli_main(["export", "--run", str(run), "--base", str(other), "--format", "lora", "--rank", "4"]) == 2
    _one_error_line(capsys, "other base weights")
    assert not (run / "lora").exists()


# --------------------------------------------------------------------------------------------------
# damaged delta files: one line, exit 2, nothing written, no model loaded
# --------------------------------------------------------------------------------------------------


def _damaged(run: Path, how: str) -> Path:
    path = run / "delta.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_damaged_delta_is_one_line_exit_2(how, seeded_run, tmp_path, capsys, model_dir, no_model_loads):
    run, _, _ = seeded_run
    path = _damaged(run, how)
    with pytest.raises(ckpt.DeltaFileError, match="is not a valid delta file"):
        ckpt.load_delta(path)
    with pytest.raises(ckpt.DeltaFileError):
        ckpt.resolve_delta(run)
    with pytest.raises(ckpt.DeltaFileError):
        ckpt.load_ablated_pipeline(model_dir, run)  # before the base would be loaded (no_model_loads)
    out = tmp_path / "out"
    assert cli_main(["apply", "--base", model_dir, "--delta", str(run), "--out", str(out)]) == 2
    _one_error_line(capsys, "is not a valid delta file")
    for fmt in ("pipeline", "lora", "single-file"):
        assert cli_main(["export", "--run", str(run), "--format", fmt, "--base", model_dir, "--out", str(out)]) == 2
        _one_error_line(capsys, "is not a valid delta file")
    assert not out.exists() and sorted(p.name for p in run.iterdir()) == ["delta.safetensors"]


def test_damaged_delta_in_eval_is_one_line(seeded_run, tmp_path, capsys, model_dir, no_model_loads):
    run, _, _ = seeded_run
    _damaged(run, "truncated")
    assert cli_main(["eval", "--ablated", str(run), "--target", "grumpy cat", "--anchor", "cat",
                     "--out", str(tmp_path / "eval")]) == 2
    _one_error_line(capsys, "is not a valid delta file")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_generate_with_bad_delta_fails_before_loading(how, seeded_run, tmp_path, capsys, model_dir, no_model_loads):
    run, _, _ = seeded_run
    delta = tmp_path / "nope" if how == "missing" else _damaged(run, how)
    out = tmp_path / "images"
    assert cli_main(["generate", "--model", model_dir, "--delta", str(delta), "--prompt", "a cat",
                     "--out", str(out)]) == 2
    _one_error_line(capsys, "does not exist" if how == "missing" else "is not a valid delta file")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# model ids that are not models
# --------------------------------------------------------------------------------------------------


def test_model_that_is_a_file_says_what_it_is(tmp_path, seeded_run):
    text = tmp_path / "afile.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match=r"afile.txt is a \.txt file, not a model") as err:
        models.resolve_model(str(text))
    assert "does not exist" not in str(err.value)
    with pytest.raises(ConfigError, match="pickle"):
        (tmp_path / "m.ckpt").write_bytes(b"x")
        models.resolve_model(str(tmp_path / "m.ckpt"))
    run, _, _ = seeded_run
    with pytest.raises(ConfigError, match="is an ablation delta, not a model: pass it as --delta"):
        models.resolve_model(str(run / "delta.safetensors"))
    with pytest.raises(ConfigError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):  # older callers catch FileNotFoundError
        models.resolve_model(str(tmp_path / "missing"))


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.HubUnavailableError, match="offline mode is on.*local diffusers folder or a single-file"):
        models.resolve_model("someone/not-cached-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    import socket

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(models.HubUnavailableError, match="hub .* is unreachable .*works offline"):
        models.resolve_model("someone/not-cached-model", check_hub=True)
