"""The sizer's host-RAM note belongs to the job that produced it, also when jobs are sized in parallel.

Catalog architectures are shared singletons and the operator sizes jobs from a thread pool, so any note
kept beside the architecture (rather than returned with the search result) can land in another job's message.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from kubetune.api import parse_spec
from kubetune.sizing import fleet_from_nodes, size_job
from kubetune.sizing.fleet import parse_gpu_shorthand

pytestmark = pytest.mark.unit

HOST_NOTE = "GiB of host RAM"


def spec(**blocks):
    """A Llama-3.1-8B full fine-tuning spec (the catalog architecture object is shared by both jobs)."""
    return parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://d/x.jsonl"},
                       "output": {"uri": "pvc://o/x"}, "method": "full", **blocks})


def fleet():
    return fleet_from_nodes(parse_gpu_shorthand("H100-80GB:8x2"))


# Fits the GPUs only with the optimizer in host RAM, which the pod's 16Gi memory limit does not hold.
OFFLOAD_BLOCKED = spec(distributed={"strategy": "deepspeed", "zeroStage": 2, "offloadOptimizer": True},
                       resources={"memory": "16Gi"})
# Does not fit one GPU without offload; offload is not an option (DDP), so no host RAM is involved.
NO_OFFLOAD = spec(distributed={"strategy": "ddp"}, resources={"maxGpus": 1})


def test_host_note_is_reported_by_the_job_that_hit_the_host_limit():
    d = size_job(OFFLOAD_BLOCKED, fleet())
    assert not d.fits
    assert HOST_NOTE in d.message and "16.0 GiB is allocatable" in d.message


def test_host_note_does_not_leak_into_the_next_job_of_the_same_model():
    f = fleet()
    size_job(OFFLOAD_BLOCKED, f)
    d = size_job(NO_OFFLOAD, f)
    assert not d.fits and "needs at least" in d.message
    assert HOST_NOTE not in d.message, d.message


def test_jobs_sized_in_parallel_get_their_own_messages():
    f = fleet()
    expected = {"blocked": size_job(OFFLOAD_BLOCKED, f).message, "plain": size_job(NO_OFFLOAD, f).message}
    assert HOST_NOTE in expected["blocked"] and HOST_NOTE not in expected["plain"]
    work = [("blocked", OFFLOAD_BLOCKED), ("plain", NO_OFFLOAD)] * 24
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda item: (item[0], size_job(item[1], f).message), work))
    for kind, message in got:
        assert message == expected[kind], kind
