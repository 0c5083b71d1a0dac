"""The trainer image installs the same pins that CI installs and tests (pyproject's `trainer` extra)."""

from __future__ import annotations

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
    assert re.search(r'ENTRYPOINT \["kubetune-train"\]', trainer)
    assert "USER 1000" in trainer and "USER 1000" in (ROOT / "operator" / "Dockerfile").read_text()
