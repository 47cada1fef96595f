"""Model cards of run folders and `push_to_hub`'s failure paths (no network here) and upload selection."""

import socket

import pytest
from huggingface_hub import ModelCard

import ablation
from ablation.config import ConfigError
from ablation.model_card import files_to_upload, is_hub_id, push_to_hub, write_model_card
from ablation.testing import tiny_pipeline

SMALL = dict(resolution=32, num_anchor_images=4, anchor_steps=2, anchor_scheduler="ddim", train_batch_size=2,
             prior_preservation=False, max_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir):
    """A finished LoRA run with its LoRA export (1 step on the tiny pipeline)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    root = tmp_path_factory.mktemp("card")
    result = ablation.ablate(tiny_pipeline("sd1"), target="Grumpy Cat", anchor="Cat", lora_rank=2, export=["lora"],
                             model=model_dir, output_dir=str(root / "run"), cache_dir=str(root / "cache"), **SMALL)
    return result.run_dir


def test_card_describes_the_run(lora_run, model_dir):
    path = write_model_card(lora_run)
    assert path == lora_run / "README.md"
    assert not [p for p in lora_run.iterdir() if ".tmp-" in p.name]  # atomic: no temporary left
    card = ModelCard.load(path)  # the Hub's own parser reads the header
    assert card.data.library_name == "diffusers"
    assert {"diffusers", "text-to-image", "concept-ablation", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is not a Hub id: the Hub would reject the card
    assert getattr(card.data, "license", None) is None  # left to the user
    text = path.read_text()
    assert "| Grumpy Cat | Cat | instance |" in text
    assert "| LoRA rank | 2 |" in text and "| parameter group | cross-attn |" in text and "| steps done | 1 |" in text
    assert 'pipe.load_lora_weights("path/to/this/folder", subfolder="lora")' in text
    assert f'load_ablated_pipeline("{model_dir}", "path/to/this/folder")' in text
    assert "Not evaluated yet" in text


def test_card_header_names_a_hub_base_model(tmp_path):
    (tmp_path / "config.yaml").write_text("model: CompVis/stable-diffusion-v1-4\ntarget: [Van Gogh]\n"
                                          "anchor: [Painting]\nconcept_type: style\nparams: cross-attn\n")
    card = ModelCard.load(write_model_card(tmp_path, repo_id="me/sd14-no-van-gogh"))
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert 'snapshot_download("me/sd14-no-van-gogh")' in card.text
    assert "| Van Gogh | Painting | style |" in card.text


def test_unreadable_report_does_not_fail_the_card(tmp_path):
    (tmp_path / "config.yaml").write_text("model: toy\ntarget: [Grumpy Cat]\nanchor: [Cat]\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{not json")
    assert "`eval/report.json` could not be read" in write_model_card(tmp_path).read_text()


def test_hub_ids():
    assert is_hub_id("CompVis/stable-diffusion-v1-4") and is_hub_id("gpt2")
    assert not any(is_hub_id(m) for m in ("toy", "in-memory", "/abs/dir", "./rel", "~/x", "a/b/c"))


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="is it a run folder"):
        write_model_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_upload_selection(lora_run):
    for name in ("checkpoints/checkpoint-1/state.bin", "logs/events", "eval/images/abc/0.png", ".delta.tmp-1"):
        (lora_run / name).parent.mkdir(parents=True, exist_ok=True)
        (lora_run / name).write_bytes(b"x")
    (lora_run / "eval" / "report.json").write_text("{}")
    write_model_card(lora_run)
    files = files_to_upload(lora_run)
    assert {"README.md", "config.yaml", "delta.safetensors", "lora/pytorch_lora_weights.safetensors",
            "eval/report.json"} <= set(files)
    assert not [f for f in files if f.startswith(("checkpoints/", "logs/", "eval/images/", "."))]


def test_push_without_token_fails_in_one_line(lora_run, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token") as err:
        push_to_hub(lora_run, "me/no-grumpy-cat")
    assert "\n" not in str(err.value)


def test_push_offline_or_unreachable_fails_in_one_line(lora_run, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="offline mode is on"):
        push_to_hub(lora_run, "me/no-grumpy-cat", token="hf_test")
    # no network: a closed local port stands in for an unreachable Hub (a real connection error)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="cannot push to the Hub repository 'me/no-grumpy-cat'") as err:
        push_to_hub(lora_run, "me/no-grumpy-cat", token="hf_test")
    assert "\n" not in str(err.value)
    assert 'snapshot_download("me/no-grumpy-cat")' in (lora_run / "README.md").read_text()


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "/x"])
def test_push_rejects_bad_repo_ids(lora_run, repo):
    with pytest.raises(ConfigError, match="user/name"):
        push_to_hub(lora_run, repo, token="hf_test")


def test_export_cli_push_fails_in_one_line_and_refreshes_the_card(lora_run, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    from ablation.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (lora_run / "README.md").unlink()
    assert main(["export", "--run", str(lora_run), "--push-to-hub", "me/no-grumpy-cat", "--hub-token", "hf_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "offline mode is on" in err and "\n" not in err
    assert "me/no-grumpy-cat" in (lora_run / "README.md").read_text()  # the card it would have uploaded
