"""The README's promises: it starts with the two commands, they exist, and the commands it shows work."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _first_block() -> list[str]:
    match = re.match(r"```sh\n(.*?)\n```", README, re.S)
    assert match, "README must start with a sh code block"
    return [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]


def test_readme_starts_with_exactly_two_commands_that_exist():
    commands = _first_block()
    assert commands == ["scripts/demo.sh", "scripts/test.sh"]
    for cmd in commands:
        assert (ROOT / cmd).is_file()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


@pytest.mark.parametrize("line", [l for l in README.splitlines() if l.startswith("kubetune estimate")])
def test_readme_estimate_commands_run(line):
    args = shlex.split(line.split("#", 1)[0])[1:]
    result = subprocess.run([sys.executable, "-m", "kubetune", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "GiB" in result.stdout or "GB" in result.stdout, result.stdout


# Markdown files a user or contributor reads from a clone: their relative links must land inside the repository.
DOCS = ["README.md", "docs/architecture.md", "docs/contracts.md", "devcluster/README.md", "bench/README.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_doc_links_exist_in_the_repository(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links {target}, outside the repository"
        assert resolved.exists(), f"{doc} links {target}, which does not exist"


def test_readme_links_the_architecture_and_the_contracts():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/architecture.md" in links and "docs/contracts.md" in links, links


def test_architecture_starts_with_the_map_of_every_top_level_folder():
    text = (ROOT / "docs" / "architecture.md").read_text()
    first_section = text.split("\n## ", 2)[1]
    assert first_section.startswith("The map"), first_section[:40]
    mapped = set(re.findall(r"^\| `([^`/]+)/", first_section, re.M))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    folders = {f.split("/", 1)[0] for f in tracked if "/" in f and not f.startswith(".")}
    assert folders <= mapped, f"folders missing from the map: {sorted(folders - mapped)}"


def _helm_lines() -> list[str]:
    text = README.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("helm install", "helm upgrade"))]


@pytest.mark.parametrize("line", _helm_lines())
def test_readme_helm_values_render(line):
    from kubetune_dev.devcluster.binaries import helm_binary

    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not found (devcluster/build.sh builds it into ~/.cache/kubetune/bin/current)")
    args = shlex.split(line.split("#", 1)[0])
    sets = [a for i, a in enumerate(args) if i > 0 and args[i - 1] == "--set"]
    assert sets or "helm install kubetune charts/kubetune -n kubetune --create-namespace" == " ".join(args)
    cmd = [helm, "template", "kubetune", str(ROOT / "charts" / "kubetune"), "-n", "kubetune", "--kube-version", "1.33.0"]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if "watchNamespaces" in line:
        assert "kind: Role\n" in result.stdout
    if "monitoring." in line:
        assert "kind: ServiceMonitor" in result.stdout and "kind: PrometheusRule" in result.stdout
