"""Experiment tracking against a real MLflow tracking server started on 127.0.0.1 by the test: the train
operator, given an Airflow connection to it, logs the spec as params, per-epoch metrics and the checkpoint;
the export operator adds the ONNX model to that same run (its tracking URI from the spec, which wins over a
connection); the run id comes back in the XCom and the job page links the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers import fake_context, make_dataset, tiny_overrides
from s3_server import free_port

pytestmark = pytest.mark.slow
#: One decoder layer and a fixed batch of one: the export (its graph simplification) is most of this test's time.
SMALLEST = {"model.mask_former.dec_layers": 1, "export.batch_size": 1}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
               str(home / "artifacts"), "--workers", "1"]
    log = open(home / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_training_is_tracked_in_mlflow_through_an_airflow_connection(mlflow_server, tmp_path, monkeypatch):
    from operators import Mask2FormerTrainOperator

    host, port = mlflow_server.rsplit(":", 1)
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_TRACKING", json.dumps(
        {"conn_type": "http", "host": host.split("://")[1], "port": int(port), "schema": "http"}))
    data = make_dataset(tmp_path / "data", images=2, val_images=2, size=64)
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(data / "train"),
                                  eval_dataset=str(data / "val"), dataset_format="coco_panoptic",
                                  results_root=str(tmp_path / "results"), mlflow_conn_id="mlflow_tracking",
                                  spec_overrides=tiny_overrides(**SMALLEST, **{"train.num_epochs": 1}))
    outcome = op.execute(fake_context(task_id="train"))
    run_id = outcome["mlflow"]["run_id"]
    assert outcome["mlflow"]["tracking_uri"] == mlflow_server
    run = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30).json()["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.num_epochs"] == "1" and "encryption_key" not in params
    history = requests.get(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": run_id, "metric_key": "val/mIoU"}, timeout=30).json()["metrics"]
    assert len(history) == 1  # one value per epoch
    artifacts = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
                             params={"run_id": run_id, "path": "checkpoints"}, timeout=30).json()
    assert any(f["path"].endswith(".pth") for f in artifacts.get("files", []))
    # the job page links the run and names the TensorBoard logs
    import mask2former_plugin as plugin
    from fastapi.testclient import TestClient

    monkeypatch.setenv("MASK2FORMER_RESULTS_ROOT", str(tmp_path / "results"))
    app = plugin.build_app()
    app.dependency_overrides[plugin.require_user] = lambda: object()
    app.dependency_overrides[plugin.current_access] = lambda: plugin.Access(dag_ids=None, recorded_roots={},
                                                                             run_order={})
    page = TestClient(app).get(f"/jobs/{outcome['job_id']}").text
    assert f"/runs/{run_id}" in page and "tensorboard --logdir" in page

    # export: the spec's mlflow.tracking_uri wins over the connection (which names a port nobody listens on)
    from mlflow.tracking import MlflowClient
    from operators import Mask2FormerExportOperator

    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_ELSEWHERE", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": free_port(), "schema": "http"}))
    export = Mask2FormerExportOperator(
        task_id="export", parent=outcome, results_root=str(tmp_path / "results"), mlflow_conn_id="mlflow_elsewhere",
        spec_overrides=tiny_overrides(**SMALLEST, **{"mlflow.tracking_uri": mlflow_server}))
    exported = export.execute(fake_context(task_id="export"))
    assert exported["mlflow"]["run_id"] == run_id  # the training run holds the checkpoint and the ONNX model
    client = MlflowClient(tracking_uri=mlflow_server)
    assert [a.path for a in client.list_artifacts(run_id, "onnx")] == ["onnx/model.onnx"]
    assert any(a.path.endswith(".pth") for a in client.list_artifacts(run_id, "checkpoints"))


def test_an_export_of_a_checkpoint_without_a_training_run_starts_a_run_in_the_specs_experiment(
        mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mask2former.config import load_spec
    from mask2former.training.tracking import log_exported_model

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # the spec's URI wins over it
    checkpoint, model = tmp_path / "downloaded" / "model.pth", tmp_path / "export" / "model.onnx"
    for path in (checkpoint, model):
        path.parent.mkdir()
        path.write_bytes(b"model")
    config = load_spec("export", overrides={"export.checkpoint": str(checkpoint), "mlflow.experiment_name": "exports",
                                            "mlflow.tracking_uri": mlflow_server})
    record = log_exported_model(config.mlflow, model_file=model, checkpoint=checkpoint, results_dir=model.parent,
                                log=logging.getLogger("test"))
    assert json.loads((model.parent / "mlflow_run.json").read_text()) == record
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(record["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "exports" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "onnx")] == ["onnx/model.onnx"]
