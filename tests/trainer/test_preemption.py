"""Preemption: SIGTERM stops every rank at the same step boundary, rank 0 writes a complete checkpoint of that
step, the process exits with the Preempted code, and the restarted run resumes at exactly that step with the
same data order and the same per-step losses as a run that was never interrupted. Torn checkpoints (no
completion marker) are never resumed from and are removed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kubetune_trainer import checkpoints, outcomes
from kubetune_trainer.errors import PreemptedError
from kubetune_trainer.launch import launch_exit_code
from kubetune_trainer.preemption import STOP_FILE_ENV, GracefulStop, child_pids, record_stop_request

from ._support import (build_model, free_port, losses, make_plan, read_summary, run_trainer, trainer_env,
                       use_trainer_env, write_dataset, write_plan)


# ----------------------------------------------------------------------------- pure pieces

@pytest.mark.unit
def test_stop_raises_before_training_and_is_remembered_inside_the_loop():
    stop = GracefulStop()
    assert not stop.requested
    with pytest.raises(PreemptedError) as err:
        stop.request(signal.SIGTERM)
    assert err.value.reason == "Preempted" and "before training started" in str(err.value)
    later = GracefulStop()
    with later.deferred():
        later.request(signal.SIGTERM)  # no exception: the loop reads the flag at the next step boundary
    assert later.requested and later.signum == signal.SIGTERM
    held = GracefulStop()
    held.hold()
    held.request(signal.SIGTERM)  # after setup: remembered for the rest of the run
    assert held.requested
    held.restore()
    with pytest.raises(PreemptedError):
        held.request(signal.SIGTERM)


@pytest.mark.unit
def test_a_stop_the_launcher_recorded_before_the_handler_existed_is_acted_on(tmp_path):
    path = str(tmp_path / "requested")
    fresh = GracefulStop()
    fresh.adopt_launcher_request(path)  # nothing recorded: nothing happens
    fresh.adopt_launcher_request(None)
    assert not fresh.requested
    record_stop_request(path, signal.SIGTERM)
    with pytest.raises(PreemptedError):
        GracefulStop().adopt_launcher_request(path)
    held = GracefulStop()
    held.hold()
    held.adopt_launcher_request(path)
    assert held.signum == signal.SIGTERM


@pytest.mark.unit
def test_child_pids_finds_a_real_child_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids(os.getpid())
        assert child_pids(child.pid) == []
    finally:
        child.kill()
        child.wait()


@pytest.mark.unit
@pytest.mark.parametrize("torchrun,reason,stopped,expected", [
    (0, "Completed", False, 0),
    (1, "InvalidPlan", False, 3),         # torchrun reports every worker failure as 1; the summary knows better
    (1, "NonFiniteLoss", False, 4),
    (1, "Preempted", True, 75),
    (1, "", True, 75),                    # a node other than 0 (no summary) that was asked to stop
    (1, "", False, 1),
    (-9, "", False, 137),
])
def test_launch_exit_code(torchrun, reason, stopped, expected):
    assert launch_exit_code(torchrun, reason, stopped) == expected
    if reason:
        assert expected == outcomes.exit_code_for(reason)


@pytest.mark.unit
def test_torn_checkpoints_are_found_and_removed(tmp_path):
    root = tmp_path / "checkpoints"
    good = checkpoints.step_dir(root, 3)
    good.mkdir(parents=True)
    (good / "weights.bin").write_bytes(b"w")
    checkpoints.sync_tree(good)
    checkpoints.write_state(good, {"step": 3})
    torn = checkpoints.step_dir(root, 6)
    shutil.copytree(good, torn)
    (torn / checkpoints.STATE_FILE).unlink()   # killed before the marker: never complete
    tmp = checkpoints.prepare_temp(root, 7)
    (tmp / "weights.bin").write_bytes(b"half")
    assert checkpoints.latest_checkpoint(root) == (3, good)
    assert checkpoints.torn_checkpoints(root) == [root / ".tmp-step-7", torn]
    assert checkpoints.remove_torn(root) == [root / ".tmp-step-7", torn]
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]


# ----------------------------------------------------------------------------- real runs of the tiny model

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("preempt-assets")
    return build_model(root / "model", hidden=32), write_dataset(root / "data.jsonl", n=48)


def _run_in_process(tmp: Path, monkeypatch, plan: dict) -> tuple[int, dict]:
    from kubetune_trainer import cli

    tmp.mkdir(parents=True, exist_ok=True)
    use_trainer_env(monkeypatch, tmp, write_plan(tmp / "plan.json", plan))
    code = cli.run_worker()
    return code, json.loads((tmp / "termination-log").read_text())


@pytest.mark.trainer
@pytest.mark.parametrize("stop_step", [3, 6])
def test_sigterm_mid_step_checkpoints_that_step_and_the_rerun_continues_exactly(assets, tmp_path, monkeypatch,
                                                                                stop_step):
    """No periodic checkpoint at all: everything the rerun resumes from was written on SIGTERM."""
    from kubetune_trainer import recipe as recipe_mod

    model_dir, data = assets
    gas = 2

    def plan_for(out: Path) -> dict:
        return make_plan(model_dir, data, out, "lora", maxSteps=8, checkpointEverySteps=1000, microBatchSize=4,
                         gradientAccumulationSteps=gas, learningRate=5e-3)

    code, ref = _run_in_process(tmp_path / "ref", monkeypatch, plan_for(tmp_path / "ref-out"))
    assert code == 0, ref
    straight = losses(json.loads((tmp_path / "ref-out" / "final" / "metrics.json").read_text()))

    out = tmp_path / "out"
    original_micro = recipe_mod.FineTuneRecipe.micro_batch
    seen_indices: list[int] = []

    def micro_with_sigterm(self, index):
        seen_indices.append(index)
        if index == (stop_step - 1) * gas + 1 and not self.stop.requested:  # second micro-batch of stop_step
            os.kill(os.getpid(), signal.SIGTERM)
        return original_micro(self, index)

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "micro_batch", micro_with_sigterm)
    code, first = _run_in_process(tmp_path / "first", monkeypatch, plan_for(out))
    assert code == outcomes.PREEMPTED_EXIT == 75
    assert first["reason"] == "Preempted" and first["status"] == "Failed"
    assert first["step"] == stop_step
    assert first["checkpoint"] == {"step": stop_step, "uri": f"{out}/checkpoints/step-{stop_step}"}
    assert seen_indices == list(range(stop_step * gas)), "the interrupted step was not finished consistently"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{stop_step}"]
    assert not (out / "final").exists()

    # A later save that was killed before its completion marker: a copy of the checkpoint without the state
    # file under a higher step. It must be ignored (not resumed from) and removed.
    torn = checkpoints.step_dir(out / "checkpoints", stop_step + 1)
    shutil.copytree(checkpoints.step_dir(out / "checkpoints", stop_step), torn)
    (torn / checkpoints.STATE_FILE).unlink()

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "micro_batch", original_micro)
    resumed_at: list[int] = []
    original_resume = recipe_mod.FineTuneRecipe._resume

    def resume_and_record(self):
        original_resume(self)
        resumed_at.append(self.step)

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "_resume", resume_and_record)
    code, second = _run_in_process(tmp_path / "second", monkeypatch, plan_for(out))
    assert code == 0, second
    assert resumed_at == [stop_step]
    assert not torn.exists()
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["resumedFromStep"] == stop_step
    assert [h["step"] for h in metrics["history"]] == list(range(1, 9))
    assert losses(metrics) == pytest.approx(straight, rel=1e-4, abs=1e-5)
    assert second["tokens"] == ref["tokens"]


def _progress(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


@pytest.mark.trainer
@pytest.mark.slow
@pytest.mark.parametrize("strategy,zero_stage", [("ddp", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_two_processes_sigterm_to_the_pod_entrypoint_resumes_exactly(assets, tmp_path, strategy, zero_stage):
    """`kubetune-train launch` (the container's main process) gets SIGTERM as a kubelet sends it; both ranks stop
    at the same step, the run exits 75 and the restarted run matches an uninterrupted run step for step."""
    pytest.importorskip("torch.distributed")
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    model_dir, data = assets
    steps = 40

    def start(root: Path, out: Path) -> tuple[subprocess.Popen, dict, int]:
        root.mkdir(parents=True, exist_ok=True)
        plan = make_plan(model_dir, data, out, "lora", maxSteps=steps, microBatchSize=4, checkpointEverySteps=1000,
                         learningRate=5e-3)
        plan["distributed"].update(strategy=strategy, zeroStage=zero_stage, procsPerNode=2)
        port = free_port()
        env = trainer_env(root, write_plan(root / "plan.json", plan), KUBETUNE_NUM_NODES="1",
                          KUBETUNE_NODE_RANK="0", KUBETUNE_PROCS_PER_NODE="2", KUBETUNE_MASTER_ADDR="127.0.0.1",
                          KUBETUNE_MASTER_PORT=str(free_port()), KUBETUNE_METRICS_PORT=str(port))
        proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer.cli", "launch"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc, env, port

    ref_out = tmp_path / "ref-out"
    proc, _, _ = start(tmp_path / "ref", ref_out)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log[-4000:]
    straight = losses(json.loads((ref_out / "final" / "metrics.json").read_text()))

    out = tmp_path / "out"
    proc, env, port = start(tmp_path / "first", out)
    deadline, last = time.monotonic() + 300, {}
    while time.monotonic() < deadline and proc.poll() is None:
        last = _progress(port) or last
        if last.get("phase") == "training" and int(last.get("step") or 0) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be preempted; last progress {last}"
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-4000:]
    summary = read_summary(tmp_path / "first")
    stopped = summary["step"]
    assert summary["reason"] == "Preempted" and 3 <= stopped < steps, summary
    assert summary["checkpoint"]["step"] == stopped
    state = checkpoints.read_state(checkpoints.step_dir(out / "checkpoints", stopped))
    assert state["worldSize"] == 2 and state["step"] == stopped
    assert (checkpoints.step_dir(out / "checkpoints", stopped) / "rng-rank1.pt").is_file()

    root2 = tmp_path / "second"
    root2.mkdir()
    shutil.copy(tmp_path / "first" / "plan.json", root2 / "plan.json")
    env.update(KUBETUNE_MASTER_PORT=str(free_port()), KUBETUNE_METRICS_PORT=str(free_port()),
               KUBETUNE_TERMINATION_LOG=str(root2 / "termination-log"), KUBETUNE_PLAN=str(root2 / "plan.json"))
    again = subprocess.run([sys.executable, "-m", "kubetune_trainer.cli", "launch"], env=env, capture_output=True,
                           text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-4000:]
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["resumedFromStep"] == stopped and metrics["worldSize"] == 2
    assert [h["step"] for h in metrics["history"]] == list(range(1, steps + 1))
    assert losses(metrics) == pytest.approx(straight, rel=1e-4, abs=1e-5)


@pytest.mark.trainer
def test_sigterm_before_the_workers_start_still_reaches_them(assets, tmp_path):
    """The kubelet's SIGTERM can arrive while torchrun is still starting the workers: they get it when they appear,
    stop before training (nothing to save) and the pod exits with the Preempted code."""
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=40, microBatchSize=4)
    plan["distributed"].update(strategy="ddp", procsPerNode=2)
    env = trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan), KUBETUNE_NUM_NODES="1",
                      KUBETUNE_NODE_RANK="0", KUBETUNE_PROCS_PER_NODE="2", KUBETUNE_MASTER_ADDR="127.0.0.1",
                      KUBETUNE_MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer.cli", "launch"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240  # importing torch on a loaded 2-core machine has taken over a minute
    while not child_pids(proc.pid) and time.monotonic() < deadline:  # torchrun exists: the handler is installed
        time.sleep(0.01)
    if proc.poll() is not None or not child_pids(proc.pid):
        proc.kill()
        log, _ = proc.communicate(timeout=60)
        pytest.fail(f"torchrun did not start within 240 s (launcher exit code {proc.returncode}):\n{log[-4000:]}")
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-4000:]
    summary = read_summary(tmp_path)
    assert summary["reason"] == "Preempted" and summary["step"] == 0, summary
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.trainer
def test_a_worker_that_missed_the_signal_reads_the_launchers_request(assets, tmp_path):
    """A SIGTERM sent to a worker between torchrun's fork and exec is lost; the launcher's recorded request
    stops that worker before training all the same."""
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=40, microBatchSize=4)
    stop_file = tmp_path / "requested"
    record_stop_request(str(stop_file), signal.SIGTERM)
    env = trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan), **{STOP_FILE_ENV: str(stop_file)})
    proc = run_trainer(["run"], env, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["reason"] == "Preempted" and summary["step"] == 0, summary
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.trainer
def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_in_use(assets, tmp_path):
    """A real SIGKILL of the trainer while it writes step 4's checkpoint (weights on disk, no completion marker; a
    test-only plan fault): the process dies with -9, step-2 stays the only complete checkpoint, the half-written
    step-4 directory is never resumed from and is removed, and the rerun ends with the uninterrupted run's losses."""
    model_dir, data = assets

    def plan_for(out: Path, **faults) -> Path:
        plan = make_plan(model_dir, data, out, "lora", maxSteps=6, checkpointEverySteps=2, microBatchSize=4,
                         learningRate=5e-3)
        if faults:
            plan["faults"] = faults
        return write_plan(out.parent / f"{out.name}-plan.json", plan)

    (tmp_path / "ref").mkdir()
    ref = run_trainer(["launch"], trainer_env(tmp_path / "ref", plan_for(tmp_path / "ref-out")), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    straight = losses(json.loads((tmp_path / "ref-out" / "final" / "metrics.json").read_text()))

    out = tmp_path / "out"
    (tmp_path / "run").mkdir()
    killed = run_trainer(["launch"], trainer_env(tmp_path / "run", plan_for(out, killWhileSavingStep=4)), timeout=600)
    assert killed.returncode != 0, killed.stderr[-3000:]
    root = out / "checkpoints"
    complete = [p.name for p in root.iterdir() if (p / checkpoints.STATE_FILE).exists()]
    torn = checkpoints.torn_checkpoints(root)
    assert complete == ["step-2"] and torn and all("4" in p.name for p in torn), (complete, torn)
    assert any(p.suffix != ".json" for p in torn[0].rglob("*") if p.is_file())  # the weights were on disk

    again = run_trainer(["launch"], trainer_env(tmp_path / "run", plan_for(out)), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["resumedFromStep"] == 2 and not any(p.exists() for p in torn)
    assert losses(metrics) == pytest.approx(straight, rel=1e-4, abs=1e-5)
