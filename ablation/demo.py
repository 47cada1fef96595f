"""`ablate demo`: a web page that shows the base model and each ablated run side by side.

    ablate demo --ablated outputs/grumpy-cat [--ablated outputs/van-gogh] [--base toy] [--port 7860]

Type a prompt: every model draws it with the same seeds, so the images differ only where the ablation
changed the model (a prompt without the target should give the base model's images). Under the images the
page shows each run's concepts and, when `ablate eval` has run, its evaluation table and grids.

A small standard-library HTTP server (`http.server`), not Gradio: it adds no dependency (Gradio pulls
dozens of packages) and the page is one HTML file (`ablation/demo_assets/index.html`) with a JSON API:

* `GET /api/info`: the models, their concepts and evaluation tables;
* `POST /api/generate` with `{"prompt", "seed", "num_images", "steps", "guidance"}`: PNG data URLs per model;
* `GET /files/<run index>/<grid name>`: an evaluation grid (only files the run's report lists).

One request generates at a time (a lock): the models share the machine. The server binds to 127.0.0.1 by
default; it has no authentication, so bind to another interface only on a trusted network.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ablation.config import GUIDANCE, ConfigError, Sampler
from ablation.flags import add_arguments, from_namespace, option

logger = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "demo_assets"
#: request bounds: a public demo must not be asked for 1,000 images of 1,000 steps
LIMITS = {"num_images": (1, 8), "steps": (1, 100), "guidance": (0.0, 30.0), "prompt_chars": 500}


@dataclass
class DemoRun:
    """One ablated run shown on the page."""

    name: str
    source: str
    pipeline: Any
    concepts: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None  # its report.json, when evaluated


@dataclass
class DemoSettings:
    """Defaults of the page's controls and how images are sampled."""

    steps: int = 25
    guidance: float = GUIDANCE
    num_images: int = 2
    seed: int = 0
    scheduler: Sampler = "ddim"


class Demo:
    """The models behind the page and the work it asks for (no HTTP here, so it is testable on its own)."""

    def __init__(self, base_model: str, base_pipeline, runs: list[DemoRun], settings: DemoSettings | None = None):
        self.base_model = base_model
        self.base = base_pipeline
        self.runs = runs
        self.settings = settings or DemoSettings()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, base_model: str | None, sources: list[str], settings: DemoSettings | None = None,
             device: str | None = None) -> Demo:
        """Load the base model and each run with `load_ablated_pipeline`.

        Raises:
            ConfigError: no run, or a run folder / delta that does not exist (before any model is loaded).
        """
        from ablation.checkpoint import load_ablated_pipeline
        from ablation.evaluation.evaluate import run_name
        from ablation.models import load_pipeline
        from ablation.sampling.generate import set_scheduler

        settings = settings or DemoSettings()
        metas = check_sources(sources)
        base_model = base_model or next((m["base_model"] for m in metas if m.get("base_model")), "toy")
        import torch

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            base = load_pipeline(base_model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load --base {base_model}: {e}") from None
        taken: set[str] = set()
        runs = []
        for source, meta in zip(sources, metas, strict=True):
            pipe = load_ablated_pipeline(base_model, source)
            runs.append(DemoRun(run_name(source, taken), source, pipe, _concepts(source, meta), _report(source)))
        for pipe in [base, *(r.pipeline for r in runs)]:
            pipe.to(dev)
            set_scheduler(pipe, settings.scheduler)
            pipe.set_progress_bar_config(disable=True)
        return cls(base_model, base, runs, settings)

    # ---------------------------------------------------------------------------------------------
    # the API behind the page
    # ---------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the page shows before any prompt: models, concepts, example prompts, evaluation tables."""
        runs = []
        for i, run in enumerate(self.runs):
            runs.append({"name": run.name, "source": run.source, "concepts": run.concepts,
                         "eval": _eval_summary(run, i)})
        examples = []
        for run in self.runs:
            for c in run.concepts:
                examples += [f"a photo of a {c['target'].lower()}", f"a photo of a {c['anchor'].lower()}"]
        return {"base_model": self.base_model, "models": ["base", *(r.name for r in self.runs)], "runs": runs,
                "examples": list(dict.fromkeys(examples))[:6], "defaults": vars(self.settings), "limits": LIMITS}

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Images of every model for one prompt, same seeds (`seed`, `seed + 1`, ...), as PNG data URLs.

        Raises:
            ConfigError: a missing prompt or a value out of `LIMITS`.
        """
        import torch

        prompt = str(request.get("prompt") or "").strip()
        if not prompt:
            raise ConfigError("type a prompt")
        if len(prompt) > LIMITS["prompt_chars"]:
            raise ConfigError(f"the prompt is longer than {LIMITS['prompt_chars']} characters")
        s = self.settings
        num = _bounded(request, "num_images", s.num_images, int)
        steps = _bounded(request, "steps", s.steps, int)
        guidance = _bounded(request, "guidance", s.guidance, float)
        seed = _number(request, "seed", s.seed, int)
        seeds = [seed + i for i in range(num)]
        images: dict[str, list[str]] = {}
        start = time.perf_counter()
        with self._lock, torch.no_grad():
            for name, pipe in [("base", self.base), *((r.name, r.pipeline) for r in self.runs)]:
                # one CPU generator per image: the noise is the same for every model and independent of device
                generators = [torch.Generator("cpu").manual_seed(x) for x in seeds]
                out = pipe([prompt] * num, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
                images[name] = [_data_url(im) for im in out.images]
        return {"prompt": prompt, "seeds": seeds, "steps": steps, "guidance": guidance, "images": images,
                "seconds": round(time.perf_counter() - start, 2)}

    def file(self, run_index: int, name: str) -> Path | None:
        """An evaluation grid or chart of a run, only if its report lists it (no other path is served)."""
        if not 0 <= run_index < len(self.runs) or self.runs[run_index].report is None:
            return None
        report_path = self.runs[run_index].report
        files = json.loads(report_path.read_text()).get("files") or {}
        allowed = set(files.get("grids") or []) | ({files["chart"]} if files.get("chart") else set())
        return report_path.parent / name if name in allowed and (report_path.parent / name).is_file() else None


def check_sources(sources: list[str]) -> list[dict[str, str]]:
    """The metadata of each ablated run (cheap: no weights are read).

    Raises:
        ConfigError: no run, or one that is not a run folder, delta file, LoRA or pipeline folder.
    """
    from ablation.checkpoint import read_metadata, resolve_delta

    if not sources:
        raise ConfigError("give at least one --ablated run (a run folder, delta file, LoRA or pipeline folder)")
    metas = []
    for source in sources:
        try:
            metas.append(read_metadata(resolve_delta(source)[1]))
        except FileNotFoundError as e:
            raise ConfigError(f"--ablated {source}: {e}") from None
    return metas


def _number(request: dict[str, Any], key: str, default, kind):
    value = request.get(key, default)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def _bounded(request: dict[str, Any], key: str, default, kind):
    value = _number(request, key, default, kind)
    low, high = LIMITS[key]
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}, got {value}")
    return value


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _concepts(source: str, metadata: dict[str, str]) -> list[dict[str, Any]]:
    from ablation.evaluation.selection import pairs_from_run

    try:
        return [{"target": t, "anchor": a, "concept_type": k} for t, a, k, _ in pairs_from_run(source)]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return json.loads(metadata.get("concepts") or "[]")


def _report(source: str) -> Path | None:
    from ablation.model_card import find_report

    path = Path(source).expanduser()
    return find_report(path.parent if path.is_file() else path)


def _eval_summary(run: DemoRun, index: int) -> dict[str, Any] | None:
    """The run's rows of its report (one per concept, metric columns) and the URLs of its grids."""
    if run.report is None:
        return None
    from ablation.model_card import METRICS, _report_model, _safe

    report = json.loads(run.report.read_text())
    run_dir = Path(run.source).expanduser()
    name = _report_model(report, run_dir.parent if run_dir.is_file() else run_dir)
    rows = report.get("comparison", {}).get(name, []) if name else []
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        row = table.setdefault((r["concept"], r["role"]), {"concept": r["concept"], "role": r["role"]})
        row[r["metric"]] = {"base": r.get("base"), "ablated": r.get("ablated")}
    files = report.get("files") or {}
    grids = [g for g in files.get("grids") or [] if name and g.startswith(f"grid_{_safe(name)}_")]
    metrics = {k: v for k, v in METRICS.items() if any(r["metric"] == k for r in rows)}
    return {"report": str(run.report), "metrics": metrics, "rows": list(table.values()),
            "grids": [f"/files/{index}/{g}" for g in grids]}


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


def _handler(demo: Demo):
    page = (ASSETS / "index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "ablation-demo"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            logger.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlparse(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(HTTPStatus.OK, demo.info())
            elif path.startswith("/files/"):
                index, _, name = path.removeprefix("/files/").partition("/")
                found = demo.file(int(index), unquote(name)) if index.isdigit() else None
                if found is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such file"})
                else:
                    self._send(HTTPStatus.OK, found.read_bytes(), "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/api/generate":
                self._json(HTTPStatus.NOT_FOUND, {"error": "unknown endpoint"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > 10_000:
                    raise ConfigError("request too large")
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise ConfigError("send a JSON object")
                self._json(HTTPStatus.OK, demo.generate(request))
            except (ConfigError, json.JSONDecodeError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # a failed generation must reach the page, not only the server's log
                logger.exception("generation failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generation failed: {e}"})

    return Handler


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A server for `demo` (not started: call `serve_forever`, e.g. in a thread). Port 0 picks a free port.

    Raises:
        ConfigError: the address cannot be bound (port in use, unknown host).
    """
    try:
        server = ThreadingHTTPServer((host, port), _handler(demo))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server


@dataclass
class DemoOptions:
    """`ablate demo` (its flags: `ablation.flags`); the page's defaults are `DemoSettings`'."""

    ablated: list[str] = option("run folder, delta file, LoRA folder or pipeline folder (repeatable)",
                                default_factory=list, required=True, repeatable=True)
    base: str | None = option("base model (default: the run's recorded base model, else toy)", default=None)
    host: str = option("interface to bind (default: 127.0.0.1, this machine only)", default="127.0.0.1")
    port: int = option("port (default: 7860; 0 = any free port)", default=7860)
    steps: int = option("default sampling steps on the page", default=DemoSettings.steps)
    guidance: float = option("default classifier-free guidance", default=DemoSettings.guidance)
    num_images: int = option("default images per model", default=DemoSettings.num_images)
    scheduler: Sampler = option("sampler", default=DemoSettings.scheduler)
    device: str | None = option("cuda, cpu, ... (default: cuda when available)", default=None)

    def settings(self) -> DemoSettings:
        """The page's controls and sampling."""
        return DemoSettings(steps=self.steps, guidance=self.guidance, num_images=self.num_images,
                            scheduler=self.scheduler)


def parser() -> argparse.ArgumentParser:
    """Arguments of `ablate demo` (the fields of `DemoOptions`)."""
    p = argparse.ArgumentParser(prog="ablate demo", description="Serve a page that shows the base model and each "
                                "ablated run side by side for any prompt, with the same seeds, and the runs' "
                                "evaluation tables and grids.")
    add_arguments(p, DemoOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    """`ablate demo`: load the models, serve until Ctrl-C."""
    opts = from_namespace(DemoOptions, parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    settings = opts.settings()
    try:
        for key, value in (("steps", opts.steps), ("guidance", opts.guidance), ("num_images", opts.num_images)):
            low, high = LIMITS[key]
            if not low <= value <= high:
                raise ConfigError(f"--{key.replace('_', '-')} must be between {low} and {high}, got {value}")
        if not 0 <= opts.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {opts.port}")
        check_sources(opts.ablated)
        server = make_server(_Pending(), opts.host, opts.port)  # bind before loading: a busy port fails fast
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        demo = Demo.load(opts.base, opts.ablated, settings, opts.device)
    except ConfigError as e:
        server.server_close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.RequestHandlerClass = _handler(demo)
    host, port = server.server_address[:2]
    print(f"ablate demo: serving {demo.base_model} and {', '.join(r.name for r in demo.runs)} on "
          f"http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


class _Pending(Demo):
    """Placeholder while the models load (the socket is bound first so that a busy port fails fast)."""

    def __init__(self) -> None:
        super().__init__("loading", None, [])
