"""The package's import graph: the training path never imports the attack programs, and training and
evaluation / attacks are not tangled in one cycle (imports inside functions count: they run too)."""

import ast
from pathlib import Path

import ablation

ROOT = Path(ablation.__file__).parent
#: modules only training uses (the architecture adapters and anchor sampling are shared with evaluation)
TRAINING = {"ablation.trainer", "ablation.objective", "ablation.training_data", "ablation.data",
            "ablation.adversary", "ablation.preserve"}


def _graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (the bare package is left out: its `__getattr__` is lazy)."""
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(("ablation", *f.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        mods[name] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ablation"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ablation")}
        graph[name] = {d for d in deps if d in mods and d not in (name, "ablation")}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_is_read():
    graph = _graph()
    assert TRAINING | {"ablation.sampling.anchors"} <= set(graph)
    assert "ablation.sampling.anchors" in graph["ablation.data"]  # a known edge: the reader works


def test_training_does_not_import_attacks_and_nothing_it_imports_comes_back():
    graph = _graph()
    for module in TRAINING:
        reached = _reach(graph, module)
        assert not {m for m in reached if m.startswith("ablation.attacks")}, module
        # evaluation modules the training path uses (the CLIP model of the copy filter) must not lead back to it
        for m in {m for m in reached if m.startswith(("ablation.evaluation", "ablation.attacks"))}:
            assert not _reach(graph, m) & TRAINING, (module, m)
