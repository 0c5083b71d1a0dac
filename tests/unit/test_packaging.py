"""Packaging: the trainer image installs the same pins that CI installs and tests (pyproject's `trainer` extra),
and the product packages keep their import boundaries."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _requirements(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower()
        out[name] = line
    return out


def test_trainer_requirements_match_pyproject_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["optional-dependencies"]["trainer"] + project["dependencies"])
    image = _requirements((ROOT / "trainer_image" / "requirements.txt").read_text().splitlines())
    assert image == wanted


def test_dockerfiles_install_the_pinned_files():
    trainer = (ROOT / "trainer_image" / "Dockerfile").read_text()
    assert "requirements.txt" in trainer
    deepspeed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["deepspeed"]
    assert deepspeed[0] in trainer, "the image installs the DeepSpeed pin CI tests"
    llama_cpp = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["llama-cpp"]
    assert llama_cpp[0] in trainer, "the image builds the llama-cpp-python pin CI tests"
    assert re.search(r'ENTRYPOINT \["kubetune-train"\]', trainer)
    assert "USER 1000" in trainer and "USER 1000" in (ROOT / "operator" / "Dockerfile").read_text()


# ---------------------------------------------------------------- import boundaries
# What each product package may not import, anywhere in a module (top level or inside a function).
# The development tools (kubetune_dev) and the test support import the product, never the other way round.
NOT_FOR_PRODUCT = ("kubetune_dev", "tests", "pytest", "_pytest")
FORBIDDEN_IMPORTS = {
    # The operator image has no torch and no trainer stack; the plan JSON is its only contract with the trainer.
    "kubetune": (*NOT_FOR_PRODUCT, "torch", "kubetune_trainer"),
    # The trainer image has no kubernetes client and no operator package.
    "kubetune_trainer": (*NOT_FOR_PRODUCT, "kubetune", "kopf", "kubernetes"),
}
PACKAGE_DIRS = {"kubetune": ROOT / "operator" / "kubetune", "kubetune_trainer": ROOT / "trainer_image" / "kubetune_trainer"}


def imported_modules(source: str) -> set[str]:
    """Absolute module names a module's source imports anywhere (relative imports stay inside the package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def boundary_violations(package: str, folder: Path) -> list[str]:
    """`file: module` for every import of the package's modules that FORBIDDEN_IMPORTS rules out."""
    banned = FORBIDDEN_IMPORTS[package]
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in sorted(imported_modules(path.read_text())):
            root = name.split(".", 1)[0]
            if root in banned:
                found.append(f"{path.relative_to(folder.parent)}: {name}")
    return found


def test_import_boundary_check_sees_every_kind_of_import():
    source = ("import torch.nn\nfrom tests.support import x\nfrom . import sibling\n"
              "def f():\n    import kubetune_dev.demo\n    importlib.import_module('pytest')\n")
    assert imported_modules(source) == {"torch.nn", "tests.support", "kubetune_dev.demo", "pytest"}


def test_import_boundary_check_flags_a_product_module_that_imports_the_dev_tools(tmp_path):
    (tmp_path / "kubetune").mkdir()
    (tmp_path / "kubetune" / "ok.py").write_text("import yaml\nfrom kubetune.api import FineTuneJobSpec\n")
    (tmp_path / "kubetune" / "bad.py").write_text("def f():\n    from kubetune_dev.devcluster import Cluster\n")
    assert boundary_violations("kubetune", tmp_path / "kubetune") == ["kubetune/bad.py: kubetune_dev.devcluster"]


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_product_packages_do_not_import_dev_tools_tests_or_the_other_side(package):
    folder = PACKAGE_DIRS[package]
    assert len(list(folder.rglob("*.py"))) > 5, f"no modules found under {folder}"
    assert boundary_violations(package, folder) == []


def test_dev_tools_live_outside_the_product_packages():
    moved = ["devcluster", "demo.py", "operator_process.py", "testing_helpers.py", "script_loader.py"]
    assert [m for m in moved if (PACKAGE_DIRS["kubetune"] / m).exists()] == []
    assert (ROOT / "devtools" / "kubetune_dev" / "devcluster" / "cluster.py").is_file()
