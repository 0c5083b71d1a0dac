"""Every FineTuneJob `kubetune convert` writes for the golden cases (tests/data/convert/*/expected.yaml) is accepted
by the real apiserver (schema, defaults, CEL rules), and the stored spec reads back as the same typed spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import parse_spec
from kubetune_dev.operator_process import install_crds

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "convert"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "expected.yaml").exists())


@pytest.fixture(scope="module", autouse=True)
def crds(cluster):
    install_crds(cluster.kubectl)


@pytest.mark.parametrize("case", CASES)
def test_converted_job_is_accepted_by_the_apiserver(cluster, namespace, case):
    text = (DATA / case / "expected.yaml").read_text()
    result = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-o", "json", "-f", "-", input=text,
                             check=False)
    assert result.returncode == 0, f"{case}: {result.stderr}"
    stored = json.loads(result.stdout)["spec"]
    written = yaml.safe_load(text)["spec"]
    assert parse_spec(stored).dump() == parse_spec(written).dump(), case
