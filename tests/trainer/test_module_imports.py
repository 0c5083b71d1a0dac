"""The trainer package's import structure: no import circles (counting imports inside functions), every
module imports on its own in a fresh interpreter, and `kubetune-train --help` needs no torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kubetune_trainer

pytestmark = pytest.mark.unit

PACKAGE = "kubetune_trainer"
PACKAGE_DIR = Path(kubetune_trainer.__file__).resolve().parent
# What `kubetune-train --help` must not need: the training stack and the storage clients.
HEAVY = ("torch", "numpy", "transformers", "peft", "deepspeed", "datasets", "bitsandbytes", "accelerate", "trl",
         "liger_kernel", "huggingface_hub", "minio", "prometheus_client", "pyarrow", "safetensors", "tokenizers")


def module_name(path: Path, root: Path) -> str:
    """`kubetune_trainer.data.pipeline` for root/kubetune_trainer/data/pipeline.py (packages name their __init__)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def trainer_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module → the package's modules it imports anywhere in its body (top level or inside functions)."""
    modules = trainer_modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node, name, is_package)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_sees_lazy_circles(tmp_path):
    """The graph counts imports inside functions, so a circle like cli → launch → cli is found."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def main():\n    from kubetune_trainer.launch import launch\n")
    (pkg / "launch.py").write_text("def launch():\n    from kubetune_trainer import cli\n")
    (pkg / "worker.py").write_text("from .cli import main\n")
    graph = import_graph(pkg)
    assert graph == {PACKAGE: set(), f"{PACKAGE}.cli": {f"{PACKAGE}.launch"},
                     f"{PACKAGE}.launch": {f"{PACKAGE}.cli"}, f"{PACKAGE}.worker": {f"{PACKAGE}.cli"}}
    assert find_cycle(graph) == [f"{PACKAGE}.cli", f"{PACKAGE}.launch", f"{PACKAGE}.cli"]


def test_trainer_has_no_import_circle():
    graph = import_graph()
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.launch" in graph and f"{PACKAGE}.data.pipeline" in graph
    assert f"{PACKAGE}.worker" in graph[f"{PACKAGE}.launch"]  # launch runs the worker, never the CLI
    assert f"{PACKAGE}.cli" not in graph[f"{PACKAGE}.launch"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle or [])


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), env.get("PYTHONPATH")]))
    env.pop("PYTHONSTARTUP", None)
    return env


def _import_alone(module: str) -> tuple[str, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=_subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    return module, proc


def test_every_trainer_module_imports_alone_in_a_fresh_interpreter():
    """An import order that only works because another module was imported first fails here."""
    modules = sorted(trainer_modules())
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_alone, modules))
    failures = {m: p.stderr.strip().splitlines()[-1] for m, p in results if p.returncode != 0}
    missing = {m: e for m, e in failures.items() if e.startswith("ModuleNotFoundError")
               and f"'{PACKAGE}" not in e}
    broken = {m: e for m, e in failures.items() if m not in missing}
    assert not broken, broken
    if missing:
        pytest.skip(f"a third-party package is not installed here: {missing}")


HELP_WITHOUT_HEAVY = f"""
import importlib.abc, sys
HEAVY = {HEAVY!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)")
        return None
sys.meta_path.insert(0, Refuse())
from kubetune_trainer.cli import main
for argv in (["--help"], ["launch", "--help"], ["run", "--help"], ["validate-plan", "--help"],
             ["validate-data", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
    else:
        raise AssertionError(f"{{argv}} did not exit")
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
"""


def test_kubetune_train_help_needs_no_torch():
    """`kubetune-train --help` (and each command's --help) works where torch and the training stack are absent."""
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_HEAVY], env=_subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: kubetune-train" in proc.stdout
    for command in ("launch", "run", "validate-plan", "validate-data"):
        assert f"usage: kubetune-train {command}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
