"""Disk and write errors in plain words: a full or read-only output is found before training starts, a disk that
fills during a checkpoint save is reported as "no space left on <output> (... needs ~N MB, M MB free)" with the
permanent exit code, and the half-written checkpoint is removed while the previous one stays usable.

The end-to-end cases run the real trainer on a small tmpfs mounted in a private mount namespace (`unshare`),
so they need user namespaces (skipped with the reason where the kernel does not allow them)."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer import diskspace, outcomes
from kubetune_trainer.errors import NoSpaceError, PermissionDeniedError

from ._support import build_model, make_plan, trainer_env, write_dataset, write_plan


# ----------------------------------------------------------------------------- pure pieces

@pytest.mark.unit
def test_torch_full_disk_error_is_translated_with_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError) as raw:  # what torch.save says when the disk fills (errno is lost)
        torch.save({"w": torch.zeros(100_000)}, "/dev/full")
    free = diskspace.free_bytes(tmp_path)
    plain = diskspace.write_error(raw.value, tmp_path, "pvc://outputs/run", need_bytes=free + 50 * diskspace.MB)
    assert isinstance(plain, NoSpaceError) and plain.reason == "NoSpaceLeft"
    assert str(plain).startswith(f"no space left on pvc://outputs/run ({tmp_path}): a checkpoint needs ~")
    assert f"needs ~{diskspace.size_text(free + 50 * diskspace.MB)}, {diskspace.size_text(free)} free" in str(plain)
    # The same serializer message with plenty of room is not called a full disk.
    assert diskspace.write_error(raw.value, tmp_path, "pvc://outputs/run", need_bytes=1) is None


@pytest.mark.unit
def test_os_errors_are_named():
    where = Path("/mnt/pvc/outputs/run")
    full = diskspace.write_error(OSError(errno.ENOSPC, "No space left on device"), where, "pvc://outputs/run", 10)
    assert isinstance(full, NoSpaceError)
    ro = diskspace.write_error(OSError(errno.EROFS, "Read-only file system"), where, "pvc://outputs/run", 10)
    assert isinstance(ro, PermissionDeniedError) and "read-only" in str(ro) and ro.reason == "PermissionDenied"
    denied = diskspace.write_error(PermissionError(errno.EACCES, "Permission denied"), where, "s3://b/run", 10)
    assert isinstance(denied, PermissionDeniedError) and "not writable" in str(denied)
    assert diskspace.write_error(ValueError("bad"), where, "pvc://outputs/run", 10) is None
    for exc in (full, ro, denied):
        assert outcomes.is_permanent(exc.reason)


@pytest.mark.unit
def test_check_output_passes_and_leaves_nothing_behind(tmp_path):
    diskspace.check_output(tmp_path / "out", "file:///out", need_bytes=1024)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(NoSpaceError, match=r"a checkpoint needs ~\d+ [KMG]B, \d+ [KMG]B free"):
        diskspace.check_output(tmp_path / "out", "file:///out", need_bytes=diskspace.free_bytes(tmp_path) * 4)


# ----------------------------------------------------------------------------- the real trainer on a small tmpfs

def _namespaces_work() -> str:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"no private mount namespace here: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("disk-assets")
    return build_model(root / "model", hidden=32), write_dataset(root / "data.jsonl", n=48)


def _run_on_tmpfs(tmp: Path, assets, size: str, *, read_only: bool = False, **training):
    """Run `kubetune-train run` with the output on a fresh tmpfs of `size`; returns (exit code, summary,
    listing of checkpoints/ taken inside the namespace before the tmpfs goes away, log)."""
    model_dir, data = assets
    out = tmp / "out"
    out.mkdir(parents=True)
    plan = make_plan(model_dir, data, out, "lora", microBatchSize=4, **training)
    env = trainer_env(tmp, write_plan(tmp / "plan.json", plan))
    listing = tmp / "listing.txt"
    options = f"size={size}" + (",ro" if read_only else "")
    script = (f'mount -t tmpfs -o {options} tmpfs "{out}" || exit 99; '
              f'"{sys.executable}" -m kubetune_trainer.cli run; code=$?; '
              f'ls -a "{out}/checkpoints" > "{listing}" 2>/dev/null; exit $code')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 99, proc.stderr
    summary = json.loads((tmp / "termination-log").read_text())
    names = sorted(listing.read_text().split()) if listing.exists() else []
    return proc.returncode, summary, [n for n in names if n not in (".", "..")], proc.stderr


@pytest.mark.trainer
def test_full_output_is_refused_before_training(assets, tmp_path):
    code, summary, _, log = _run_on_tmpfs(tmp_path, assets, "16k", maxSteps=4, checkpointEverySteps=2)
    assert code == outcomes.EXIT_CODES["NoSpaceLeft"] == 7, log[-3000:]
    assert summary["reason"] == "NoSpaceLeft" and summary["step"] == 0
    assert summary["message"].startswith(f"no space left on {tmp_path / 'out'}")
    assert re.search(r"a checkpoint needs ~\d+ KB, \d+ KB free", summary["message"]), summary["message"]


@pytest.mark.trainer
def test_read_only_output_is_refused_before_training(assets, tmp_path):
    code, summary, _, log = _run_on_tmpfs(tmp_path, assets, "1m", read_only=True, maxSteps=4,
                                          checkpointEverySteps=2)
    assert code == outcomes.EXIT_CODES["PermissionDenied"] == 6, log[-3000:]
    assert summary["reason"] == "PermissionDenied" and "read-only" in summary["message"]


@pytest.mark.trainer
def test_disk_filling_during_a_save_keeps_the_previous_checkpoint(assets, tmp_path):
    """Room for one checkpoint of the tiny run (~150 KB) but not two: the step-4 save fails mid-write."""
    code, summary, names, log = _run_on_tmpfs(tmp_path, assets, "220k", maxSteps=8, checkpointEverySteps=2)
    assert code == 7, log[-3000:]
    assert summary["reason"] == "NoSpaceLeft", summary
    assert summary["message"].startswith(f"no space left on {tmp_path / 'out'}")
    assert re.search(r"a checkpoint needs ~1\d\d KB, \d+ KB free", summary["message"]), summary["message"]
    assert "unexpected pos" not in summary["message"] and "inline_container" not in summary["message"]
    assert summary["step"] == 4 and summary["checkpoint"]["step"] == 2
    assert names == ["step-2"], "the failed save's temp dir must be removed and the previous checkpoint kept"
