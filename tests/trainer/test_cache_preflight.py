"""The shared cache through the real commands: two jobs' `kubetune-train preflight` on one s3:// model download its
files once into the cache, and a trainer pod (`kubetune-train launch`, cache read-only) trains from the cache without
downloading anything. Counted on the local S3 endpoint the storage tests use."""

from __future__ import annotations

import json

import pytest

from ._support import build_model, make_plan, read_summary, run_trainer, trainer_env, write_dataset, write_plan
from .test_storage import LocalS3


@pytest.mark.trainer
def test_two_preflights_download_a_model_once_and_the_trainer_reads_the_cache(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("minio")
    model = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=40)
    s3 = LocalS3()
    try:
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            s3.put("models", f"tiny/{path.relative_to(model).as_posix()}", path.read_bytes())
        s3.put("data", "train.jsonl", data.read_bytes())
        files = sorted(k for b, k in s3.objects if b == "models")
        assert any(k.endswith(".safetensors") for k in files)
        cache_dir = tmp_path / "cache"
        s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}", "AWS_ACCESS_KEY_ID": "test",
                  "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1",
                  "KUBETUNE_CACHE_DIR": str(cache_dir)}
        reports = {}
        for job in ("a", "b"):  # two FineTuneJobs on the same model: each pod has its own work dir
            plan = make_plan(model, data, tmp_path / job / "out", maxSteps=2)
            plan["model"]["uri"] = "s3://models/tiny"
            plan["dataset"]["uri"] = "s3://data/train.jsonl"
            plan["job"] = {"name": job, "namespace": "ns", "uid": f"uid-{job}"}
            (tmp_path / job).mkdir()
            plan_path = write_plan(tmp_path / job / "plan.json", plan)
            env = trainer_env(tmp_path / job, plan_path, **s3_env, KUBETUNE_CACHE_FILL="true",
                              KUBETUNE_CACHE_VOLUME="model-cache", KUBETUNE_CACHE_LEASE=f"uid-{job}")
            pre = run_trainer(["preflight"], env)
            assert pre.returncode == 0, pre.stderr[-3000:]
            reports[job] = json.loads((tmp_path / job / "termination-log").read_text())["preflight"]["cache"]
        for key in files:  # every file of the model (weights included) once, for both jobs
            assert sum(1 for r in s3.requests if r == f"GET /models/{key}") == 1, s3.requests
        a, b = reports["a"], reports["b"]
        assert a["volume"] == "model-cache" and a["filled"] == [a["model"], a["dataset"]] and a["hits"] == []
        assert b["filled"] == [] and b["hits"] == [a["model"], a["dataset"]]
        assert (cache_dir / a["model"] / "config.json").is_file()

        # job b's trainer pod: the cache read-only (no KUBETUNE_CACHE_FILL), found through b's lease
        before = len(s3.requests)
        (tmp_path / "b" / "termination-log").unlink()
        env = trainer_env(tmp_path / "b", tmp_path / "b" / "plan.json", **s3_env, KUBETUNE_CACHE_LEASE="uid-b")
        run = run_trainer(["launch"], env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert read_summary(tmp_path / "b")["status"] == "Succeeded"
        assert s3.requests[before:] == []  # neither the model nor the data was downloaded again
        assert "s3://models/tiny from the cache" in run.stderr
    finally:
        s3.close()
