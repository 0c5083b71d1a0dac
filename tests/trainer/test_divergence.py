"""Divergence is caught: the smoothed train loss staying above factor x its best for `patience` steps stops
the run with reason Diverged and the numbers (the last good checkpoint stays), or only warns when
training.divergence.action is warn. A full fine-tune of the tiny model at learning rate 1.0 without gradient
clipping really diverges (its loss climbs from ~7.5 to ~20)."""

from __future__ import annotations

import json
import random
import re

import pytest

from kubetune_trainer.divergence import DivergenceDetector

from ._support import build_model, make_plan, read_summary, run_trainer, trainer_env, write_dataset, write_plan


@pytest.mark.unit
def test_noisy_falling_loss_and_single_spikes_are_not_divergence():
    rng = random.Random(0)
    det = DivergenceDetector(factor=3.0, patience=5)
    for step in range(1, 400):
        loss = 3.0 * 0.995 ** step + rng.uniform(0.0, 0.8)
        if step in (50, 120, 121):
            loss = 40.0  # a bad batch or two
        assert det.update(step, loss) == "", step


@pytest.mark.unit
def test_a_sustained_rise_is_reported_once_after_patience_steps():
    det = DivergenceDetector(factor=2.0, patience=4)
    messages = []
    for step, loss in enumerate([2.0] * 20 + [60.0] * 20, start=1):
        message = det.update(step, loss)
        if message:
            messages.append((step, message))
    assert len(messages) == 1
    step, message = messages[0]
    assert step == 24  # steps 21..24: four losses in a row above 2 x the best
    assert re.search(r"stayed above 2 x its best smoothed value 2 \(step \d+\) for 4 steps, up to 60 at step 24",
                     message), message


@pytest.mark.unit
def test_replay_rebuilds_the_state_a_resumed_run_needs():
    losses = [2.0] * 10 + [30.0] * 3
    straight = DivergenceDetector(factor=2.0, patience=5)
    for step, loss in enumerate(losses, start=1):
        straight.update(step, loss)
    resumed = DivergenceDetector(factor=2.0, patience=5)
    resumed.replay([{"step": s, "loss": v} for s, v in enumerate(losses, start=1)])
    assert (resumed.best, resumed.above, resumed.smoothed) == (straight.best, straight.above, straight.smoothed)
    assert straight.update(14, 30.0) == resumed.update(14, 30.0) == ""
    assert straight.update(15, 30.0) and resumed.update(15, 30.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("diverge-assets")
    return build_model(root / "model", hidden=32), write_dataset(root / "data.jsonl", n=48)


def _diverging_run(tmp_path, assets, action: str):
    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "full", maxSteps=30, learningRate=1.0, maxGradNorm=0.0,
                     checkpointEverySteps=2, divergence={"action": action, "factor": 2, "patience": 3})
    proc = run_trainer(["run"], trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan)))
    return proc, read_summary(tmp_path), out


@pytest.mark.trainer
def test_diverging_run_stops_with_reason_and_numbers(assets, tmp_path):
    proc, summary, out = _diverging_run(tmp_path, assets, "stop")
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert summary["reason"] == "Diverged" and summary["status"] == "Failed"
    m = re.search(r"stayed above 2 x its best smoothed value ([\d.]+) \(step \d+\) for 3 steps, up to ([\d.]+) at "
                  r"step (\d+)", summary["message"])
    assert m, summary["message"]
    assert float(m.group(2)) > 2 * float(m.group(1))
    assert int(m.group(3)) == summary["step"] < 30
    kept = summary["checkpoint"]["step"]
    assert 0 < kept <= summary["step"] and f"checkpoint step-{kept} is kept" in summary["message"]
    assert (out / "checkpoints" / f"step-{kept}" / "trainer_state.json").is_file()
    assert not (out / "final").exists()


@pytest.mark.trainer
def test_warn_only_finishes_and_says_so(assets, tmp_path):
    proc, summary, out = _diverging_run(tmp_path, assets, "warn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["status"] == "Succeeded" and summary["step"] == 30
    assert summary["message"].startswith("training loss diverged: the loss has stayed above 2 x")
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert len(metrics["warnings"]) == 1 and metrics["warnings"][0] == summary["message"]
    assert "continuing (training.divergence.action is warn)" in proc.stderr
    assert summary["divergence"] == metrics["warnings"][0]  # the operator's LossDiverged condition reads it
