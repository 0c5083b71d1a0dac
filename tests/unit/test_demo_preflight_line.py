"""The demo prints the preflight line (examples, tokens, steps, estimated GPU-hours and cost) before training."""

from __future__ import annotations

import pytest

from kubetune_dev.demo import format_preflight

pytestmark = pytest.mark.unit


def test_the_line_appears_with_the_estimate_and_says_the_numbers():
    pre = {"examples": 480, "trainExamples": 432, "datasetSha256": "3748864dfc5f" + "0" * 52}
    assert format_preflight({"preflight": pre}) is None  # before the trainer Job is created
    est = {"steps": 120, "tokens": 19682, "gpuHours": 0.52, "cost": 1.3, "currency": "USD", "basis": "8.03B"}
    line = format_preflight({"preflight": pre, "estimate": est})
    assert line.startswith("preflight: 480 examples (432 trained), 19,682 tokens, 120 steps")
    assert "0.52 GPU-hours" in line and "cost 1.30 USD" in line and "3748864dfc5f" in line
