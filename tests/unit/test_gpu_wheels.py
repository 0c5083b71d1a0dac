"""scripts/gpu_wheels.py (what a device call must carry) and scripts/gpu-checks.sh (run on the device)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

ROOT = Path(__file__).resolve().parents[2]
gw = load_module_from_file("gpu_wheels_script", ROOT / "scripts" / "gpu_wheels.py")


def wheel(dest: Path, name: str, version: str, requires: list[str]) -> Path:
    path = dest / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def sdist(dest: Path, name: str, version: str, requires: list[str]) -> Path:
    path = dest / f"{name}-{version}.tar.gz"
    meta = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo(f"{name}-{version}/PKG-INFO")
        info.size = len(meta)
        t.addfile(info, io.BytesIO(meta))
    return path


@pytest.mark.unit
@pytest.mark.parametrize("file, name", [
    ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "bitsandbytes"),
    ("pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.whl", "pydantic-core"),
    ("liger_kernel-0.8.5-py3-none-any.whl", "liger-kernel"),
    ("deepspeed-0.19.8.tar.gz", "deepspeed"),
])
def test_dist_name(file, name):
    assert gw.dist_name(Path(file)) == name


@pytest.mark.unit
def test_requirements_left_to_carry_skip_the_image_extras_and_other_platforms(tmp_path):
    wheel(tmp_path, "datasets", "5.2.0", ["torch>=2", "dill<0.5", 'rich; extra == "cli"',
                                           'pywin32; sys_platform == "win32"', 'tomli; python_version < "3.11"'])
    sdist(tmp_path, "deepspeed", "0.19.8", ["hjson", "numpy", "pydantic>=2"])
    wheel(tmp_path, "pydantic", "2.14.3", [])
    missing = gw.missing_requirements(tmp_path)
    assert sorted(missing) == ["dill", "hjson"]  # torch and numpy are in the image, pydantic is carried


@pytest.mark.unit
def test_known_image_versions_are_checked(tmp_path):
    wheel(tmp_path, "peft", "9.0", ["transformers>=6.0", "accelerate>=1.0"])
    assert gw.version_conflicts(tmp_path) == [
        f"peft needs transformers>=6.0, the image has transformers {gw.DEVICE_VERSIONS['transformers']}"]
    wheel(tmp_path, "transformers", "6.1.0", [])  # carrying it resolves the conflict
    assert gw.version_conflicts(tmp_path) == []


@pytest.mark.unit
def test_carried_pins_exist_in_the_trainer_requirements():
    pins = gw.pins_from_requirements(ROOT / "trainer_image" / "requirements.txt")
    for name in gw.CARRY_PINNED:
        assert "==" in pins[gw.canonicalize_name(name)], name


@pytest.mark.unit
def test_every_trainer_requirement_is_in_the_image_carried_or_left_out_with_a_reason():
    """A package added to the trainer extra (torch-optimi was) must reach the GPU, or say why it need not."""
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    image = {gw.canonicalize_name(n) for n in gw.DEVICE_HAS}
    carried = {gw.canonicalize_name(n) for n in gw.CARRY_PINNED}
    left_out = {gw.canonicalize_name(n) for n in gw.NOT_CARRIED}
    unplaced = [r for r in extra if gw.canonicalize_name(Requirement(r).name) not in image | carried | left_out]
    assert unplaced == [], f"trainer requirements that would be missing on the GPU: {unplaced}"
    assert "torch-optimi" in carried
    assert all(gw.NOT_CARRIED.values())


def test_gpu_checks_script_runs_its_steps_and_records_them(tmp_path):
    """`local tests` on this machine: imports everything, runs tests/gpu (skipped without CUDA, run with it)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-checks.sh"), "local", "tests"], env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout + (tmp_path / "steps.log").read_text()[-3000:]
    assert "imports rc=0" in summary and "tests rc=0" in summary, summary
    assert (tmp_path / "tests.xml").is_file()
    assert "IMPORT FAILED" not in (tmp_path / "steps.log").read_text()


def test_gpu_checks_script_rejects_unknown_steps(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-checks.sh"), "nope"], env={**os.environ,
                          "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step: nope" in proc.stderr
