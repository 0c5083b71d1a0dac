"""Shared pytest configuration: markers that need hardware skip with a reason."""

import pytest

# Fixtures `cluster`, `k8s`, `namespace`, `process_nodes` for the real local control plane.
pytest_plugins = ["kubetune.devcluster.pytest_plugin"]


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
