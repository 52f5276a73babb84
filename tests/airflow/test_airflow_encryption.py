"""The model encryption key in Airflow: read from a connection or Variable at execute time, handed to the engine
only through MASK2FORMER_ENCRYPTION_KEY, masked in task logs, absent from XCom, spec files and logs; refused in
spec_overrides; a Kubernetes Secret reference for pods.

The end-to-end case runs a DAG with ``dag.test()`` on the migrated SQLite database: an evaluate task whose
parent checkpoint is encrypted, the key in the connection ``AIRFLOW_CONN_M2F_MODEL_KEY``. The DAG file lives in
a temporary folder registered as an extra DAG bundle (``dag.test`` looks DAGs up in the configured bundles).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from helpers import fake_context, make_dataset, tiny_overrides
from mask2former import crypto
from mask2former.config import SpecError
from operators import KubernetesPodLauncher, Mask2FormerStorageHook
from operators.launchers import job_process_env
from operators.operators.actions import Mask2FormerEvaluateOperator, Mask2FormerExportOperator
from operators.pod_job import JobProcess
from operators.utils import jobs, overrides
from operators.utils.encryption import KEY_ENV, EncryptionKeySource

KEY = "af-Key:3kd8-Qx!ridge-lantern-71"
WORKER_KEY = "worker-env-key-never-used-0042"  # a key already in the worker's environment must not reach a job
CONN_ID = "m2f_model_key"
DAG_ID = "m2f_encryption_test"


def _pieces(secret: str):
    return {secret[i:i + 8] for i in range(len(secret) - 7)}


def _leaks(text: str, secret: str = KEY):
    return [piece for piece in _pieces(secret) if piece in text]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), images=2, val_images=2)


@pytest.fixture(scope="module")
def encrypted_checkpoint(tmp_path_factory) -> Path:
    """A tiny model (random weights, 13 classes) saved encrypted with KEY."""
    from evaluation_support import save_random_checkpoint

    path = save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")
    crypto.encrypt_file(path, path, KEY)
    return path


@pytest.fixture
def key_connection(monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "generic", "password": KEY}))
    monkeypatch.setenv(KEY_ENV, WORKER_KEY)


def _xcom(dag_run, task_id: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id,
                                                 key="return_value").one()
        value = row.value
    return value if isinstance(value, str) else json.dumps(value)


DAG_FILE = '''
import json

from airflow.sdk import DAG

from operators import Mask2FormerEvaluateOperator

with DAG({dag_id!r}, schedule=None, catchup=False):
    Mask2FormerEvaluateOperator(task_id="evaluate", spec_overrides=json.loads({overrides!r}),
                                eval_dataset={eval_dataset!r}, dataset_format="coco_panoptic",
                                results_root={results_root!r}, encryption_key_conn_id={conn_id!r})
'''


def test_key_from_a_connection_reaches_the_engine_only_through_its_environment(
        airflow_db, tmp_path, dataset, encrypted_checkpoint, key_connection, monkeypatch, capfd):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk._shared.secrets_masker import redact

    dags, results_root = tmp_path / "dags", tmp_path / "results"
    dags.mkdir()
    spec_overrides = {**tiny_overrides(), "evaluate.checkpoint": str(encrypted_checkpoint)}
    (dags / "encryption_dag.py").write_text(DAG_FILE.format(
        dag_id=DAG_ID, overrides=json.dumps(spec_overrides), eval_dataset=str(dataset / "val"),
        results_root=str(results_root), conn_id=CONN_ID))
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([
        {"name": "m2f-encryption-test", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(dags)}},
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}}]))
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}

    dag_run = bag.dags[DAG_ID].test()

    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert dag_run.state == "success", log[-3000:]
    xcom = _xcom(dag_run, "evaluate")
    outcome = json.loads(xcom)
    assert outcome["status"] == "SUCCESS" and "mIoU" in outcome["metrics"]  # the engine opened the checkpoint
    assert f"encrypted models are opened and written with the password of the Airflow connection '{CONN_ID}'" in log
    assert "launched `python -m mask2former evaluate" in log
    for secret in (KEY, WORKER_KEY):
        assert not _leaks(xcom, secret) and not _leaks(log, secret)
    folder = Path(outcome["results_dir"])
    files = [p for p in results_root.rglob("*") if p.is_file()]
    assert folder / "spec.yaml" in files and folder / "experiment.yaml" in files
    for path in files:
        assert not _leaks(path.read_bytes().decode(errors="replace")), path
    assert redact(f"model key {KEY} here") == "model key *** here"  # any log line that would show it is masked


def test_the_engine_gets_the_key_in_its_environment_and_nowhere_else(tmp_path, encrypted_checkpoint, monkeypatch):
    """A stand-in interpreter (a shell script, not Python) records what the job process hands the engine."""
    record = tmp_path / "record"
    record.mkdir()
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\nprintf "%s" "$MASK2FORMER_ENCRYPTION_KEY" > "$M2F_RECORD/key"\n'
                        'printf "%s\\n" "$@" > "$M2F_RECORD/argv"\nenv > "$M2F_RECORD/env"\n')
    stand_in.chmod(0o755)
    monkeypatch.setenv("M2F_RECORD", str(record))
    monkeypatch.setenv(KEY_ENV, KEY)  # as the launcher hands it to the job process
    folder = tmp_path / "results" / "d/r/evaluate"
    job = jobs.JobDescription(action="evaluate", job_id="d/r/evaluate", publish_uri=str(folder), local_dir=str(folder),
                              cache_dir=str(tmp_path / "cache"),
                              overrides={"evaluate.checkpoint": str(encrypted_checkpoint)})
    logged = []
    JobProcess(job, Mask2FormerStorageHook(aws_conn_id=None), logged.append, python=str(stand_in)).run()

    assert (record / "key").read_text() == KEY
    assert (record / "env").read_text().count(KEY_ENV) == 1
    assert not _leaks((record / "argv").read_text()) and "evaluate" in (record / "argv").read_text()
    assert not _leaks((folder / "spec.yaml").read_text()) and not _leaks(job.to_json())
    assert not _leaks("\n".join(logged))


def test_a_job_process_gets_the_jobs_key_never_the_workers(monkeypatch):
    monkeypatch.setenv(KEY_ENV, WORKER_KEY)
    monkeypatch.setenv("AIRFLOW_CONN_X", "secret")
    assert KEY_ENV not in job_process_env({})
    env = job_process_env({KEY_ENV: KEY})
    assert env[KEY_ENV] == KEY and "AIRFLOW_CONN_X" not in env
    local = Mask2FormerExportOperator(task_id="export", encryption_key_conn_id=CONN_ID)
    assert local.job_env("/results/d/r/export", {}, KEY) == {KEY_ENV: KEY}
    pod = Mask2FormerExportOperator(task_id="export_pod", launcher=KubernetesPodLauncher(image="i"))
    assert pod.job_env("s3://b/results/d/r/export", {}, None) == {}


def test_a_variable_is_read_at_execute_time_and_masked(monkeypatch):
    from airflow.sdk._shared.secrets_masker import redact

    secret = "variable-held-key-5512-Zq"
    monkeypatch.setenv("AIRFLOW_VAR_M2F_MODEL_PASS", secret)
    assert redact(f"x {secret} y") == f"x {secret} y"  # Airflow does not mask a Variable of this name by itself
    assert EncryptionKeySource(variable="m2f_model_pass").resolve() == secret
    assert redact(f"x {secret} y") == "x *** y"
    monkeypatch.setenv("AIRFLOW_VAR_M2F_EMPTY", "")
    with pytest.raises(AirflowFailException, match="the Airflow Variable 'm2f_empty', which is empty"):
        EncryptionKeySource(variable="m2f_empty").resolve()
    with pytest.raises(AirflowFailException, match="encryption_key_variable 'm2f_absent': no such Airflow Variable"):
        EncryptionKeySource(variable="m2f_absent").resolve()
    assert EncryptionKeySource().resolve() is None


# ----------------------------------------------------------------------------------- refusals


def test_a_key_in_spec_overrides_is_refused_without_repeating_it(tmp_path):
    for value in (KEY, "{{ var.value.m2f_model_pass }}"):  # literal or templated: refused at DAG parse
        with pytest.raises(SpecError, match="Override 'encryption_key' is a secret and is refused") as refused:
            Mask2FormerEvaluateOperator(task_id="evaluate", spec_overrides={"encryption_key": value})
        assert not _leaks(str(refused.value))
    with pytest.raises(SpecError, match="encryption_key_conn_id"):
        overrides.job_overrides("train", {"train.num_epochs": 1, "encryption_key": KEY}, {})

    # a rendered template (here set after construction, as rendering does) is refused at execute, before staging
    op = Mask2FormerExportOperator(task_id="export", spec_overrides="{{ params.overrides }}",
                                   results_root=str(tmp_path / "results"))
    op.spec_overrides = json.dumps({"export.checkpoint": "model.pth", "encryption_key": KEY})
    with pytest.raises(AirflowFailException, match="is a secret.*Nothing was staged or run") as refused:
        op.execute(fake_context())
    assert not _leaks(str(refused.value))
    assert not (tmp_path / "results").exists()


def test_the_key_source_is_checked_at_parse_time_but_read_only_at_execute(tmp_path):
    op = Mask2FormerExportOperator(task_id="export", encryption_key_conn_id="m2f_absent_connection",
                                   spec_overrides={"export.checkpoint": "model.pth"},
                                   results_root=str(tmp_path / "results"))  # no lookup while the DAG is parsed
    with pytest.raises(AirflowFailException, match="encryption_key_conn_id 'm2f_absent_connection': no such"):
        op.execute(fake_context())
    assert not (tmp_path / "results").exists()
    with pytest.raises(SpecError, match="not both"):
        Mask2FormerExportOperator(task_id="e2", encryption_key_conn_id=CONN_ID, encryption_key_variable="v")


def test_pods_take_the_key_from_a_kubernetes_secret_reference(tmp_path):
    launcher = KubernetesPodLauncher(image="registry.example/mask2former-airflow:gpu", gpus=1,
                                     encryption_key_secret_name="mask2former-model-key",
                                     encryption_key_secret_key="key")
    paths = jobs.JobPaths.resolve(job="d/r/evaluate", results_root="s3://bucket/results")
    job = launcher.describe(action="evaluate", paths=paths, check_interval=10,
                            overrides={"evaluate.checkpoint": "s3://bucket/train/model.pth"})
    pod = launcher.pod(job, name="mask2former-evaluate-x")
    entry = next(e for e in pod.spec.containers[0].env if e.name == KEY_ENV)
    assert entry.value is None  # a reference to the Secret, never the key itself
    reference = entry.value_from.secret_key_ref
    assert (reference.name, reference.key) == ("mask2former-model-key", "key")
    without = KubernetesPodLauncher(image="i").pod(job, name="p")
    assert KEY_ENV not in {e.name for e in without.spec.containers[0].env}

    with pytest.raises(SpecError, match="KubernetesPodLauncher takes the encryption key from a Kubernetes Secret"):
        Mask2FormerEvaluateOperator(task_id="evaluate", encryption_key_conn_id=CONN_ID, launcher=launcher)
    with pytest.raises(ValueError, match="never from the worker"):
        launcher.start(job, {KEY_ENV: KEY}, print)
