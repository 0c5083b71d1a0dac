"""The built wheel, installed non-editable into a clean virtualenv, is the product: it sizes a catalog model,
starts the operator's and the trainer's commands, and carries no development tools.

The operator image does `pip install .`; an editable install (what every other test uses) reads the source
tree, so only a real wheel shows what a user or the image gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MODEL = "hf://meta-llama/Llama-3.1-8B"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(tmp: Path) -> dict[str, str]:
    """No PYTHONPATH, no active virtualenv, HOME's pip cache (quick after the first run)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PIP_USER"}}
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    env.setdefault("PIP_CACHE_DIR", str(cache / "pip"))
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(tmp)})
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The kubetune wheel, built from a copy of what the package build reads (no stale build/ directory)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "operator" / "kubetune", src / "operator" / "kubetune", ignore=ignore)
    shutil.copytree(ROOT / "trainer_image" / "kubetune_trainer", src / "trainer_image" / "kubetune_trainer",
                    ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    env = _clean_env(out)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
         cwd=out, env=env)
    wheels = sorted(out.glob("kubetune-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel and its `operator` extra installed (not editable)."""
    home = tmp_path_factory.mktemp("venv")
    env = _clean_env(home)
    _run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], cwd=home, env=env)
    python = home / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", f"{wheel}[operator]"],
         cwd=home, env=env, timeout=600)
    return home / "venv"


def _in_venv(venv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command of the clean virtualenv from a directory outside the source tree."""
    cwd = venv.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    env = _clean_env(cwd)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return _run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, timeout=timeout)


def test_wheel_carries_the_catalog_and_every_module_but_no_dev_tools(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    catalog = sorted(p.name for p in (ROOT / "operator" / "kubetune" / "sizing" / "catalog").glob("*.yaml"))
    assert catalog, "the source tree has no catalog files"
    missing = [f for f in catalog if f"kubetune/sizing/catalog/{f}" not in names]
    assert not missing, f"catalog files not in the wheel: {missing}"
    for package, folder in (("kubetune", ROOT / "operator" / "kubetune"),
                            ("kubetune_trainer", ROOT / "trainer_image" / "kubetune_trainer")):
        modules = {f"{package}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert modules <= names, f"modules not in the wheel: {sorted(modules - names)}"
    top_level = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"kubetune", "kubetune_trainer"}, top_level


def test_installed_package_is_the_wheel_not_the_source_tree(venv):
    out = _in_venv(venv, "python", "-c", "import kubetune, kubetune_trainer; print(kubetune.__file__); "
                   "print(kubetune_trainer.__file__)").stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    probe = ("import importlib.util as u; print([m for m in ('kubetune_dev', 'tests.support', 'torch', 'pytest') "
             "if u.find_spec(m.split('.')[0]) is not None])")
    assert _in_venv(venv, "python", "-c", probe).stdout.strip() == "[]"


def test_installed_estimate_sizes_llama_from_the_installed_catalog(venv):
    result = _in_venv(venv, "kubetune", "estimate", MODEL, "--method", "lora", "--json")
    report = json.loads(result.stdout)
    assert report["model"] == "llama-3.1-8b", report
    params = report["estimate"]["total_params"]
    assert 8.0e9 < params < 8.1e9, params  # Llama 3.1 8B has 8.03 B parameters
    text = _in_venv(venv, "kubetune", "estimate", MODEL, "--method", "lora").stdout
    assert "llama-3.1-8b (catalog)" in text and f"parameters {params:,}" in text, text


def test_installed_commands_start(venv):
    operator_help = _in_venv(venv, "kubetune", "operator", "--help").stdout
    assert "usage:" in operator_help and "operator" in operator_help, operator_help
    train_help = _in_venv(venv, "kubetune-train", "--help").stdout
    assert "usage:" in train_help and "launch" in train_help, train_help
    commands = [line.split()[0] for line in _in_venv(venv, "kubetune", "--help").stdout.splitlines()
                if line.startswith("  ")]
    assert commands == ["estimate", "operator", "convert"], commands  # the development tools are `kubetune-dev`'s
    convert_help = _in_venv(venv, "kubetune", "convert", "--help").stdout
    assert "Axolotl" in convert_help and "--dataset-uri" in convert_help, convert_help
