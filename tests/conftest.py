"""Shared pytest configuration: markers that need hardware skip with a reason."""

import pytest

# Fixtures `cluster`, `k8s`, `namespace`, `process_nodes` for the real local control plane.
pytest_plugins = ["tests.support.cluster_fixtures"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
        for item in gpu_items:
            item.add_marker(skip)


# In CI every tool the suite needs is installed by .ci/run, so a skip other than "no CUDA GPU" means a
# broken setup that would otherwise hide untested code: count such skips and fail the run (KUBETUNE_ALLOW_SKIPS=1
# turns this off on a partial local setup).
GPU_SKIP_PREFIX = "needs a CUDA GPU"
_unexpected_skips: list[str] = []


def _strict_skips() -> bool:
    import os

    return os.environ.get("CI", "").lower() == "true" and os.environ.get("KUBETUNE_ALLOW_SKIPS") != "1"


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(GPU_SKIP_PREFIX):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skipped for a reason other than a missing GPU")
        for line in _unexpected_skips:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and _strict_skips() and exitstatus == 0:
        session.exitstatus = 1
