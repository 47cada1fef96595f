"""README truth: every shell command in README.md's ```bash blocks runs as written after the first command.

The commands run in a scratch folder that holds `ablate.py` and `recipes/` as the repository root does.
Fast mode (the default suite) appends tiny budgets to the training and sampling commands; the `slow` tests
run them exactly as written. Commands that install packages, need the Hugging Face hub or a GPU, or do
not terminate are skipped, each with its reason (`pytest -rs` lists them).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: appended in fast mode, per program (later flags override the recipe's and the earlier ones)
BUDGETS = {"train": ["--max-steps", "2", "--num-anchor-images", "4"], "generate": ["--steps", "2"]}

#: output a user cannot act on (issue 10 section 3); none may appear on the first command's stderr
NOISE = ("gemm_4bit_forward", "pip install kernels", "torch_dtype", "Loading pipeline components", "Loading weights",
         "requires torchvision", "Saving current state", "Optimizer state saved", "Random states saved",
         "FutureWarning", "Traceback")
LAUNCHER_DEFAULTS = "were not passed to `accelerate launch`"

SKIPS = [  # (pattern, reason): the first match decides
    (r"^python3 -m venv |^\. \.venv/bin/activate$|^pip install ", "installs packages: the tests run in the installed "
                                                                   "environment"),
    (r"^bash scripts/test\.sh$", "runs this test suite itself"),
    (r"^accelerate config$", "interactive accelerate setup"),
    (r"CompVis/|_sd14\.yaml", "Stable Diffusion 1.4 from the Hugging Face hub (network; a GPU for its size)"),
    (r"recipes/24gb/", "SDXL / SD3.5 from the Hugging Face hub (network; a GPU for its size)"),
    (r"^ablate demo ", "serves a web page until stopped; tests/test_demo_browser.py drives it"),
]
SLOW = [  # (pattern, reason): run only in the slow suite (as written, full length)
    (r"^ablate eval ", "generates hundreds of images with two models (minutes on a CPU)"),
    (r"^ablate attack ", "five attacks at their default budgets (minutes on a CPU); tests/test_attacks.py runs each "
                         "one fast on a tiny pipeline"),
    (r"^ablate train --target |^accelerate launch ablate\.py --config recipes/toy/",
     "another toy training run, the first command's code path (the fast suite keeps its budget in check)"),
]


@dataclass(frozen=True)
class Command:
    text: str
    index: int  # order in README

    @property
    def program(self) -> str | None:
        words = shlex.split(self.text)
        if "ablate.py" in words or words[:2] == ["ablate", "train"]:
            return "train"
        return words[1] if words[:1] == ["ablate"] and len(words) > 1 else None

    def match(self, rules) -> str | None:
        return next((reason for pattern, reason in rules if re.search(pattern, self.text)), None)

    def fast(self) -> str:
        budget = BUDGETS.get(self.program or "", [])
        return self.text if "--help" in self.text else " ".join([self.text, *budget])


def _split(line: str) -> list[str]:
    """One README line -> its commands: comments dropped, split on && and ; outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (not current or current[-1].isspace()):
            break
        elif line.startswith("&&", i) or ch == ";":
            parts.append(current)
            current = ""
            i += 2 if ch == "&" else 1
            continue
        current += ch
        i += 1
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of README.md's ```bash blocks, in order."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            commands += [Command(c, len(commands) + i) for i, c in enumerate(_split(line))]
    return commands


COMMANDS = readme_commands()
FIRST = next(c for c in COMMANDS if c.program == "train")  # the README's first command: its run feeds the others


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TQDM_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HOME=str(work / "hf"),
               ABLATION_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("ABLATION_VERBOSE", None)
    return env


def _workdir(tmp_path_factory, name: str) -> Path:
    work = tmp_path_factory.mktemp(name)
    (work / "ablate.py").symlink_to(ROOT / "ablate.py")
    (work / "recipes").symlink_to(ROOT / "recipes")
    return work


def _run(work: Path, text: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", text], cwd=work, env=_env(work), capture_output=True, text=True,
                          timeout=timeout)


def test_readme_commands_are_found_and_classified():
    texts = [c.text for c in COMMANDS]
    assert FIRST.text.endswith('--target "Grumpy Cat" --anchor "Cat"')
    assert texts.index(FIRST.text) < texts.index("ablate train --help")
    assert _split('a "x # y" && b; c  # note') == ['a "x # y"', "b", "c"]
    for command in COMMANDS:  # every command is run or skipped for a stated reason, never silently dropped
        assert command.program or command.match(SKIPS) or command.text.startswith(("accelerate", "ablate")), command


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The README's first command (fast: tiny budget appended), in a scratch repository root."""
    work = _workdir(tmp_path_factory, "readme")
    return work, _run(work, FIRST.fast())


def test_first_command_runs_quietly(first_run):
    work, proc = first_run
    assert proc.returncode == 0, proc.stderr
    assert (work / "outputs" / "grumpy-cat" / "delta.safetensors").is_file()
    assert "run directory: outputs/grumpy-cat" in proc.stdout
    found = [s for s in NOISE if s in proc.stderr]
    assert not found, f"non-actionable output on stderr: {found}\n{proc.stderr}"
    if not FIRST.text.startswith("accelerate launch ablate.py"):  # `ablate train`, or the launcher given its values
        assert LAUNCHER_DEFAULTS not in proc.stderr, proc.stderr


FAST = [c for c in COMMANDS if c is not FIRST and not c.match(SKIPS) and not c.match(SLOW)]


@pytest.mark.parametrize("command", FAST, ids=[c.text[:60] for c in FAST])
def test_readme_command_runs(first_run, command):
    work, first = first_run
    assert first.returncode == 0, "the first command failed"
    proc = _run(work, command.fast())
    assert proc.returncode == 0, f"{command.fast()}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    if command.program == "train" and "--num_processes" in command.text:  # the README's quiet launch
        assert LAUNCHER_DEFAULTS not in proc.stderr and "error" not in proc.stderr.lower()
    if command.program == "generate":
        out = shlex.split(command.text)[shlex.split(command.text).index("--out") + 1]
        assert len(list((work / out).glob("*.png"))) == 8


def test_every_skip_rule_is_used():
    """A skip rule that no README command matches any more is stale: it would silently skip a new command."""
    unused = [reason for pattern, reason in SKIPS + SLOW if not any(re.search(pattern, c.text) for c in COMMANDS)]
    assert not unused


HUB_TRAIN = [c for c in COMMANDS if c.program == "train" and c.match(SKIPS)]


@pytest.mark.parametrize("command", HUB_TRAIN, ids=[c.text[:60] for c in HUB_TRAIN])
def test_skipped_training_commands_parse(command, monkeypatch):
    """The hub-model training commands cannot run here, but their flags and recipes must be valid as written
    (recipes resolve from the repository root, where README's commands run)."""
    from ablation.train_cli import parse_config

    monkeypatch.chdir(ROOT)
    words = shlex.split(command.text)
    argv = words[words.index("ablate.py") + 1:] if "ablate.py" in words else words[2:]
    config = parse_config(argv)
    assert config.concept_specs() and config.model != "toy", command.text


@pytest.mark.slow
def test_readme_commands_as_written(tmp_path_factory):
    """Everything runnable here, exactly as written, in README order (the full-length first run included)."""
    work = _workdir(tmp_path_factory, "readme-full")
    for command in COMMANDS:
        if command.match(SKIPS):
            continue
        proc = _run(work, command.text, timeout=7200)  # `ablate eval` at full volume takes long on a CPU
        assert proc.returncode == 0, f"{command.text}\n{proc.stderr[-3000:]}"
    assert (work / "outputs" / "grumpy-cat" / "eval" / "report.md").is_file()
