"""Every manifest in examples/ is accepted by the real apiserver (server-side dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune_dev.operator_process import install_crds

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def crds(cluster):
    install_crds(cluster.kubectl)


def test_expected_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "lora-llama-3.1-8b.yaml", "qlora-llama-3.1-70b.yaml",
            "full-llama-3.1-8b-zero3.yaml", "multi-node.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_accepted(cluster, namespace, path):
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "FineTuneJob"
    result = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode == 0, f"{path.name} rejected: {result.stderr}"
    assert "created (server dry run)" in result.stdout
