"""`ablate demo` in a real headless browser: Chromium from the distribution, driven by Playwright.

Runs when both are installed (`.ci/run` installs them: `apt-get install chromium`, `pip install playwright`; a
Playwright browser build cannot be downloaded here, so the system browser is used) and skips otherwise, unless
ABLATION_REQUIRE_BROWSER=1 (set by CI) turns the skip into a failure.
"""

import os
import shutil
import threading

import pytest

import ablation
from ablation.demo import Demo, DemoSettings, make_server
from ablation.testing import tiny_pipeline

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("ABLATION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# No sandbox (containers run as root), no GPU, and nothing that phones home: the test machine has no network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def _require_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in (("playwright", sync_playwright), ("chromium", CHROMIUM)) if not ok]
    if missing:
        message = f"browser test needs {' and '.join(missing)} (apt-get install chromium; pip install playwright)"
        if os.environ.get("ABLATION_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, model_dir):
    """The demo of a tiny ablated run (3 steps on the target's token rows), served on a free port."""
    from accelerate.state import AcceleratorState, GradientState

    _require_browser()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    root = tmp_path_factory.mktemp("browser")
    run = ablation.ablate(tiny_pipeline("sd1"), target="Grumpy Cat", anchor="Cat", params="embedding",
                          learning_rate=5e-2, max_steps=3, model=model_dir, output_dir=str(root / "grumpy-cat"),
                          cache_dir=str(root / "cache"), resolution=32, num_anchor_images=4, anchor_steps=2,
                          train_batch_size=2).run_dir
    demo = Demo.load(None, [str(run)], DemoSettings(steps=2, num_images=2), device="cpu")
    server = make_server(demo, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _images_for(page, prompt: str) -> dict[str, list[str]]:
    """Type `prompt`, press Generate, wait until every model's images have loaded; their PNG data per model."""
    page.fill("#prompt", prompt)
    page.click("#go")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('img.out')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)
    images: dict[str, list[str]] = {}
    for img in page.query_selector_all("img.out"):
        images.setdefault(img.get_attribute("data-model"), []).append(img.get_attribute("src"))
    return images


def test_page_shows_base_and_ablated_side_by_side(demo_url):
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(demo_url)
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            assert [h.inner_text() for h in page.query_selector_all(".model h2")] == ["base", "grumpy-cat"]
            assert "Grumpy Cat → Cat" in page.inner_text(".run h3")
            assert "not evaluated yet" in page.inner_text(".run")

            target = _images_for(page, "a photo of a grumpy cat")
            assert sorted(target) == ["base", "grumpy-cat"] and [len(v) for v in target.values()] == [2, 2]
            assert target["base"] != target["grumpy-cat"]  # the ablation changed the target's images
            seeds = [i.get_attribute("data-seed") for i in page.query_selector_all("img.out[data-model=base]")]
            assert seeds == ["0", "1"]

            unrelated = _images_for(page, "a photo of a dog")
            assert unrelated["base"] == unrelated["grumpy-cat"]  # same seeds, untouched prompt: identical
            assert unrelated["base"] != target["base"]

            page.fill("#prompt", "")
            page.click("#go")
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            assert "type a prompt" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()
