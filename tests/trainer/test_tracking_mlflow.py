"""spec.tracking for MLflow, against a real `mlflow server` started here (tests/support/mlflow_server.py): a CPU
training run (the real recipe, tiny model) leaves an MLflow run with its parameters, the resolved plan as plan.json,
per-step metrics, evaluation results and the output URIs; an unreachable server is a warning unless tracking is
required."""

from __future__ import annotations

import json

import pytest

from tests.support.mlflow_server import SKIP_REASON, free_port, get, mlflow_bin, running_server

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import cli  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402
from kubetune_trainer.recipe import FineTuneRecipe, RunEnv  # noqa: E402

from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    binary = mlflow_bin()
    if binary is None:
        pytest.skip(SKIP_REASON)
    with running_server(binary, tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _get(url: str, path: str, **query) -> dict:
    return get(url, path, **query)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking-assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl", n=60)


def _run(tmp_path, monkeypatch, plan: dict) -> tuple[FineTuneRecipe, dict]:
    plan_path = write_plan(tmp_path / "plan.json", plan)
    use_trainer_env(monkeypatch, tmp_path, plan_path)
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        recipe.train()
        arts = recipe.export()
        recipe.finish_tracking(arts, {"passed": True, "metrics": [{"metric": "exactMatch", "base": 0.1, "tuned": 0.4,
                                                                   "delta": 0.3}]})
    finally:
        recipe.cleanup()
    return recipe, json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())


def test_a_training_run_is_logged_to_mlflow(mlflow_server, assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=6, logEverySteps=2, evalEverySteps=3)
    plan["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experiment": "kubetune-tests",
                                   "runName": "tiny-lora"}, "required": False}
    recipe, metrics = _run(tmp_path, monkeypatch, plan)
    tracking = metrics["tracking"]
    assert tracking["runId"] and not tracking["warning"] and tracking["url"].startswith(mlflow_server)
    run = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=tracking["runId"])["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tiny-lora"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.learningRate"] == "0.01" and params["method"] == "lora"
    assert params["training.maxSteps"] == "6"
    history = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=tracking["runId"],
                   metric_key="train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2, 3, 4, 5, 6]  # every step, sent in batches
    losses = {m["step"]: m["value"] for m in history}
    assert losses == pytest.approx({h["step"]: h["loss"] for h in metrics["history"]}, rel=1e-5)
    evals = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=tracking["runId"],
                 metric_key="eval_loss")["metrics"]
    assert sorted(m["step"] for m in evals) == [3, 6]
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert latest["evaluation.exactMatch.tuned"] == pytest.approx(0.4) and latest["evaluation.passed"] == 1.0
    assert latest["final_train_loss"] == pytest.approx(metrics["trainLoss"], rel=1e-5)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["kubetune.artifact.adapter"] == metrics["artifacts"]["adapter"]
    assert tags["kubetune.job"] == "default/test"
    files = _get(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=tracking["runId"])["files"]
    assert [f["path"] for f in files] == ["plan.json"]
    assert not recipe.result.warnings


def test_an_unreachable_server_is_a_warning(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["tracking"] = {"mlflow": {"trackingUri": f"http://127.0.0.1:{free_port()}", "experiment": "x"}}
    recipe, metrics = _run(tmp_path, monkeypatch, plan)
    assert metrics["step"] == 2 and metrics["tracking"]["runId"] == ""
    assert "MLflow tracking at" in metrics["tracking"]["warning"] and "training continues" in recipe.result.warnings[0]


def test_an_unreachable_required_server_fails_the_attempt(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["tracking"] = {"mlflow": {"trackingUri": f"http://127.0.0.1:{free_port()}", "experiment": "x"},
                        "required": True}
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    code = cli.run_worker()
    summary = read_summary(tmp_path)
    assert code not in (0, 3), summary  # retried like any failure, not a permanent InvalidPlan
    assert summary["status"] == "Failed" and "tracking.required is true" in summary["message"]
