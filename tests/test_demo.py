"""`ablate demo` without a browser: the models, the JSON API over real HTTP, input checks, the CLI's errors."""

import json
import threading
import urllib.error
import urllib.request

import pytest

import ablation
from ablation.config import ConfigError
from ablation.demo import Demo, DemoSettings, main, make_server
from ablation.testing import tiny_pipeline

FAST = DemoSettings(steps=2, num_images=2)


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, model_dir):
    """An ablated run that changes only the target's token rows (so unrelated prompts must be unchanged)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    root = tmp_path_factory.mktemp("demo")
    result = ablation.ablate(tiny_pipeline("sd1"), target="Grumpy Cat", anchor="Cat", params="embedding",
                             learning_rate=5e-2, max_steps=3, model=model_dir, output_dir=str(root / "grumpy-cat"),
                             cache_dir=str(root / "cache"), resolution=32, num_anchor_images=4, anchor_steps=2,
                             train_batch_size=2)
    return str(result.run_dir)


@pytest.fixture(scope="module")
def server(embedding_run):
    demo = Demo.load(None, [embedding_run], FAST, device="cpu")  # base model: the run's recorded one
    srv = make_server(demo, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", demo
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/api/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_info_and_page(server, model_dir):
    url, _ = server
    with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["base_model"] == model_dir and info["models"] == ["base", "grumpy-cat"]
    assert info["runs"][0]["concepts"][0]["target"] == "Grumpy Cat" and info["runs"][0]["eval"] is None
    assert "a photo of a grumpy cat" in info["examples"]
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        assert b'id="prompt"' in r.read() and r.headers["Content-Type"].startswith("text/html")


def test_same_seeds_differ_only_for_the_target(server):
    url, _ = server
    status, target = _post(url, {"prompt": "a photo of a grumpy cat", "seed": 5, "num_images": 2, "steps": 2})
    assert status == 200 and target["seeds"] == [5, 6]
    assert len(target["images"]["base"]) == 2 and all(u.startswith("data:image/png;base64,")
                                                       for u in target["images"]["base"])
    assert target["images"]["base"] != target["images"]["grumpy-cat"]
    status, other = _post(url, {"prompt": "a photo of a dog", "seed": 5, "num_images": 2, "steps": 2})
    assert status == 200 and other["images"]["base"] == other["images"]["grumpy-cat"]
    # the seed decides the noise: another seed gives other images, the same seed the same ones
    _, again = _post(url, {"prompt": "a photo of a dog", "seed": 5, "num_images": 2, "steps": 2})
    _, reseeded = _post(url, {"prompt": "a photo of a dog", "seed": 6, "num_images": 1, "steps": 2})
    assert again["images"] == other["images"] and reseeded["images"]["base"][0] == other["images"]["base"][1]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "  "}, "type a prompt"),
    ({"prompt": "x", "num_images": 50}, "num_images must be between 1 and 8"),
    ({"prompt": "x", "steps": "many"}, "steps must be a number"),
    ({"prompt": "x" * 501}, "longer than 500"),
])
def test_bad_requests_get_400(server, body, message):
    status, data = _post(server[0], body)
    assert status == 400 and message in data["error"]


def test_only_listed_files_are_served(server, embedding_run):
    url, demo = server
    for path in ("/files/0/config.yaml", "/files/0/../config.yaml", "/files/9/x.png", "/nothing"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=30)
        assert err.value.code == 404
    assert demo.file(0, "config.yaml") is None


def test_eval_table_and_grids_when_evaluated(embedding_run, tmp_path):
    import shutil

    run = tmp_path / "evaluated"
    shutil.copytree(embedding_run, run)
    (run / "eval").mkdir()
    (run / "eval" / "grid_evaluated_grumpy_cat.png").write_bytes(b"\x89PNG fake")
    rows = [{"task": "grumpy_cat", "concept": "grumpy cat", "role": "target", "metric": "clip_accuracy",
             "base": 1.0, "ablated": 0.0, "change": -1.0},
            {"task": "grumpy_cat", "concept": "grumpy cat", "role": "target", "metric": "kid_vs_base",
             "base": None, "ablated": 0.5, "change": None}]
    (run / "eval" / "report.json").write_text(json.dumps({
        "models": [{"name": "base", "delta": None}, {"name": "evaluated", "delta": str(run)}],
        "comparison": {"evaluated": rows}, "files": {"grids": ["grid_evaluated_grumpy_cat.png"], "chart": None}}))
    demo = Demo("base", None, [])
    from ablation.demo import DemoRun, _report

    demo.runs = [DemoRun("evaluated", str(run), None, [], _report(str(run)))]
    summary = demo.info()["runs"][0]["eval"]
    assert summary["metrics"] == {"clip_accuracy": "CLIP accuracy", "kid_vs_base": "KID vs base"}
    assert summary["rows"] == [{"concept": "grumpy cat", "role": "target",
                                "clip_accuracy": {"base": 1.0, "ablated": 0.0},
                                "kid_vs_base": {"base": None, "ablated": 0.5}}]
    assert summary["grids"] == ["/files/0/grid_evaluated_grumpy_cat.png"]
    assert demo.file(0, "grid_evaluated_grumpy_cat.png") == run / "eval" / "grid_evaluated_grumpy_cat.png"


def test_cli_errors_before_loading(tmp_path, capsys):
    assert main(["--ablated", str(tmp_path / "missing")]) == 2
    assert "error: --ablated" in capsys.readouterr().err
    assert main(["--ablated", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be between 1 and 100" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at least one --ablated"):
        Demo.load(None, [], FAST)


def test_cli_reports_a_busy_port(embedding_run, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--ablated", embedding_run, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_demo_is_an_ablate_subcommand():
    from ablation.cli import SUBCOMMANDS

    assert SUBCOMMANDS["demo"][0] == "ablation.demo:main"
