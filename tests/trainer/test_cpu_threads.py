"""The trainer's CPU thread pool follows the pod's CPU request, not the host's core count."""

from __future__ import annotations

import pytest

from kubetune_trainer.threads import cpu_threads

pytestmark = pytest.mark.unit


def test_threads_follow_the_pods_cpu_request_shared_by_its_processes():
    assert cpu_threads("4", 1, 64) == 4  # a 4-CPU pod on a 64-core node: 4 threads, not 64
    assert cpu_threads("32", 8, 64) == 4  # 8 processes per pod share its 32 CPUs
    assert cpu_threads("2", 8, 64) == 1  # never below one thread
    assert cpu_threads("16", 1, 8) == 8  # never above the host's cores
    assert cpu_threads("3", 2, None) == 1


def test_without_a_request_torch_keeps_its_default():
    assert cpu_threads(None, 1, 8) is None and cpu_threads("", 1, 8) is None and cpu_threads("0", 1, 8) is None
    assert cpu_threads("abc", 1, 8) is None
