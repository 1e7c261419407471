"""Package boundaries: the CLI's module graph has no cycle, the metrics import without torch, and the
CLI prints a user error as one line while a real bug keeps its traceback."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "export", "training")


def _module_level_imports(path: Path, module: str) -> set[str]:
    """Project modules imported at import time (not inside functions) by the module at `path`."""
    out = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports pkg.mod when that is a module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES and _path(n) is not None and n != module}
    return out


def _path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _graph(start: str, extra: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import-time graph reachable from `start`; `extra`: edges made by importlib."""
    graph, todo = {}, [start]
    while todo:
        m = todo.pop()
        if m not in graph:
            graph[m] = _module_level_imports(_path(m), m) | extra.get(m, set())
            todo += graph[m]
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack + [m, n]
            if n not in state and (found := visit(n, stack + [m])):
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


def test_cli_module_graph_has_no_cycle():
    from sdk.cli import COMMAND_MODULES

    graph = _graph("sdk.cli", {"sdk.cli": set(COMMAND_MODULES)})
    assert {"sdk.cli_train", "sdk.cli_export", "sdk.cli_serve"} <= set(graph)
    assert _cycle(graph) is None, _cycle(graph)
    # command modules never import the app back, nor training/export at import time
    assert not any("sdk.cli" in deps for m, deps in graph.items())
    assert not [m for m in graph if m.startswith(("training", "export"))]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_any_package_at_import_time():
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            graph[module] = _module_level_imports(p, module)
    for deps in graph.values():
        deps &= set(graph)
    assert _cycle(graph) is None, _cycle(graph)


# A meta-path hook that makes `import torch` (and timm/torchvision) fail in the subprocess.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "timm", "torchvision"):
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, Block())
""")


def test_metrics_import_and_run_without_torch():
    code = BLOCK_TORCH + textwrap.dedent("""
        import numpy as np
        import training, training.evaluate as ev
        x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]
        r = ev.labelled_eval(x, np.array([0, 0, 1, 1]), x, np.array([0, 0, 1, 1]), ks=(1,), exclude_self=True)
        print("map", r.map, sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "map 1.0 []", proc.stdout


def _cli(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess after `code` (to plant a bug), with `args`."""
    full = code + f"\nfrom sdk.cli import app\napp({list(args)!r})\n"
    return subprocess.run([sys.executable, "-c", full], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    user = _cli("", "index", "info", str(tmp_path / "missing"))
    assert user.returncode == 2
    assert user.stderr.strip().splitlines() == [f"error: no index at {tmp_path / 'missing'} (no index.sqlite); "
                                                "create one with `retrieval-sdk index build BUNDLE IMAGES --index PATH`"]
    # the same command with a bug inside it (a ValueError that is no SdkError, and an AttributeError)
    for exc in ("ValueError('a bug, not bad input')", "AttributeError('no such attribute')"):
        plant = ("import sdk.index\n"
                 f"def broken(*a, **k): raise {exc}\n"
                 "sdk.index.GalleryIndex.open = broken\n")
        bug = _cli(plant, "index", "info", str(tmp_path))
        assert bug.returncode == 1, bug.stderr
        assert "Traceback (most recent call last)" in bug.stderr and exc.split("(")[0] in bug.stderr
        assert "error:" not in bug.stderr
