"""spec.tracking for Weights & Biases, in offline mode (its service cannot be reached from a test): a CPU training run
(the real recipe, tiny model) leaves W&B run files under the output; read back from the run's transaction log
(tests/support/wandb_files.py) they hold the parameters, the resolved plan as plan.json, one history row per step, the
evaluation results and final metrics in the summary, and the output URIs. An online run whose server cannot be reached
is a warning unless tracking is required; MLflow and W&B run side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.mlflow_server import free_port
from tests.support.wandb_files import read_run

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("wandb")

from kubetune_trainer import cli  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402
from kubetune_trainer.recipe import FineTuneRecipe, RunEnv  # noqa: E402

from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan  # noqa: E402

EVALUATION = {"passed": True, "metrics": [{"metric": "exactMatch", "base": 0.1, "tuned": 0.4, "delta": 0.3}]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb-assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl", n=60)


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """W&B's own settings and caches under the test's directory; nothing from the caller's environment."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_INIT_TIMEOUT", "WANDB_SILENT"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))


def _run(tmp_path, monkeypatch, plan: dict) -> tuple[FineTuneRecipe, dict]:
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        recipe.train()
        arts = recipe.export()
        recipe.finish_tracking(arts, EVALUATION)
    finally:
        recipe.cleanup()
    return recipe, json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())


def test_an_offline_run_leaves_wandb_run_files_in_the_output(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=6, logEverySteps=2, evalEverySteps=3)
    plan["tracking"] = {"wandb": {"project": "kubetune-tests", "entity": "ml-team", "runName": "tiny-lora",
                                  "mode": "offline"}, "required": False}
    recipe, metrics = _run(tmp_path, monkeypatch, plan)
    report = metrics["tracking"]["wandb"]
    assert report["runId"] and not report["warning"] and report["mode"] == "offline" and report["url"] == ""
    run_dir = Path(report["runDir"])
    assert run_dir.parent == tmp_path / "out" / "wandb" and run_dir.name.startswith("offline-run-")
    assert run_dir.name.endswith(report["runId"]) and (run_dir / f"run-{report['runId']}.wandb").is_file()

    run = read_run(run_dir)
    assert (run.run_id, run.project, run.entity, run.name) == (report["runId"], "kubetune-tests", "ml-team",
                                                                "tiny-lora")
    assert run.group == "default/test" and run.job_type == "fine-tune"
    assert run.config["training"]["learningRate"] == 0.01 and run.config["training"]["maxSteps"] == 6
    assert run.config["method"] == "lora" and run.config["lora"]["r"] == 8
    assert run.config["kubetune"] == {"job": "default/test", "uid": "0", "resumedFromStep": "0"}
    losses = run.series("train_loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # every step, not only the logged ones
    assert losses == pytest.approx({h["step"]: h["loss"] for h in metrics["history"]}, rel=1e-6)
    assert sorted(run.series("learning_rate")) == [1, 2, 3, 4, 5, 6]
    assert sorted(run.series("eval_loss")) == [3, 6]
    assert run.series("eval_loss") == pytest.approx({e["step"]: e["loss"] for e in metrics["evalHistory"]}, rel=1e-6)
    assert run.summary["evaluation.exactMatch.tuned"] == pytest.approx(0.4)
    assert run.summary["evaluation.passed"] == 1.0
    assert run.summary["final_train_loss"] == pytest.approx(metrics["trainLoss"], rel=1e-5)
    assert run.summary["kubetune.artifact.adapter"] == metrics["artifacts"]["adapter"]
    assert run.exit_code == 0
    assert "plan.json" in run.files
    assert json.loads((run_dir / "files" / "plan.json").read_text()) == parse_plan(plan).to_json_dict()
    assert not recipe.result.warnings


def test_mlflow_and_an_unreachable_wandb_server(assets, tmp_path, monkeypatch):
    """Both trackers in one plan: the W&B server cannot be reached (a warning, the run goes on) while the other
    tracker's report is unaffected; the message names W&B."""
    model_dir, data = assets
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["tracking"] = {"wandb": {"project": "p", "mode": "online"},
                        "mlflow": {"trackingUri": f"http://127.0.0.1:{free_port()}", "experiment": "x"}}
    recipe, metrics = _run(tmp_path, monkeypatch, plan)
    assert metrics["step"] == 2 and metrics["tracking"]["wandb"]["runId"] == ""
    warnings = recipe.result.warnings
    assert len(warnings) == 2 and warnings[0].startswith("MLflow tracking at")
    assert warnings[1].startswith("W&B tracking (online, project p) failed while creating the run")
    assert all("training continues without tracking" in w for w in warnings)
    assert metrics["tracking"]["warning"] == "; ".join(warnings)


def test_an_unreachable_required_wandb_server_fails_the_attempt(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["tracking"] = {"wandb": {"project": "p"}, "required": True}
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    code = cli.run_worker()
    summary = read_summary(tmp_path)
    assert code not in (0, 3), summary  # retried like any failure, not a permanent InvalidPlan
    assert summary["status"] == "Failed" and "tracking.required is true" in summary["message"]
    assert "W&B tracking (online, project p) failed" in summary["message"]
