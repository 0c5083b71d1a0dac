"""pytest fixture: Kueue's controller manager for one test module, on the session's local cluster.

    from tests.support.kueue_fixtures import kueue  # noqa: F401

`kueue` (module scope) builds Kueue from its pinned Go module when the pins changed (devcluster/build-kueue.sh,
cached like the control plane), installs its CRDs, starts the manager as a local process with its webhooks on
127.0.0.1 and registers them; at the end of the module it stops the manager and removes the webhooks and
CRDs again, so later modules see a cluster without Kueue. A failed build fails the tests; they are skipped
only when Go is not installed at all.
"""

from __future__ import annotations

import shutil
import time

import pytest

from kubetune_dev.devcluster.kueue import Kueue, build_kueue


@pytest.fixture(scope="module")
def kueue(cluster):
    """A running Kueue (kubetune_dev.devcluster.kueue.Kueue) for this module's tests."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: Kueue is built from its pinned Go module (devcluster/kueue/go.mod)")
    started = time.monotonic()
    build_dir = build_kueue()  # raises (the tests fail) when the build fails
    instance = Kueue(cluster, build_dir)
    instance.timings["build_s"] = time.monotonic() - started
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
