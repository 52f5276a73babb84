"""The pipeline on the distributed shape: PostgreSQL metadata, CeleryExecutor with a Redis broker and a
Celery worker process consuming the ``default`` and ``gpu`` queues (all on 127.0.0.1).

Needs a PostgreSQL server accepting ``postgres`` with trust authentication and a Redis server on 6379;
the test skips, saying which is missing, elsewhere. A fresh database is created and dropped; Redis
database 14 is used.
"""

from __future__ import annotations

import pytest

from airflow_stack import AirflowStack, fresh_postgres_database, reachable
from helpers import make_dataset, tiny_overrides

pytestmark = pytest.mark.slow

PIPELINE = "mask2former_pipeline"
REDIS_DB = 14


@pytest.fixture(scope="module")
def database():
    if not reachable(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"]):
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    with fresh_postgres_database("m2f_airflow") as url:
        if url is None:
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres")
        yield url


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, database):
    home = tmp_path_factory.mktemp("airflow-celery")
    stack = AirflowStack(home, sql_alchemy_conn=database, executor="CeleryExecutor", celery_queues="default,gpu",
                         extra_env={
                             "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
                             "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database}",
                             "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                             # a deployment with a GPU worker: the GPU stages go to its queue and pool
                             "MASK2FORMER_GPU_WORKERS": "true",
                             "MASK2FORMER_RESULTS_ROOT": str(home / "results"),
                             "MASK2FORMER_CACHE_DIR": str(home / "cache"),
                         })
    try:
        stack.start(timeout=240)
        stack.wait_dag(PIPELINE)
        stack.unpause(PIPELINE)
        yield stack
    finally:
        stack.stop()


def test_pipeline_runs_on_celery_with_postgres(celery_stack, tmp_path):
    data = make_dataset(tmp_path / "data", images=4, val_images=2, size=64)
    conf = {"train_datasets": str(data / "train"), "eval_dataset": str(data / "val"), "dataset_format": "coco_panoptic",
            "model.sem_seg_head.num_classes": 13, "train.num_epochs": 1, "spec_overrides": tiny_overrides(), "automl_policy": "off"}
    run_id = celery_stack.trigger(PIPELINE, conf)
    state = celery_stack.wait_run(PIPELINE, run_id, timeout=900)
    states = celery_stack.task_states(PIPELINE, run_id)
    assert state == "success", (states, celery_stack.tail_logs())
    assert states["gen_trt_engine"] == "skipped"  # ran on the worker's gpu queue, which has no GPU here
    instances = celery_stack.task_instances(PIPELINE, run_id)
    assert all(ti["executor"] in (None, "CeleryExecutor") for ti in instances.values())
    assert instances["gen_trt_engine"]["queue"] == "gpu"
    evaluate = celery_stack.xcom(PIPELINE, run_id, "evaluate")
    assert evaluate["status"] == "SUCCESS" and "mIoU" in evaluate["metrics"]
    assert (celery_stack.home / "results" / PIPELINE).is_dir()
    assert celery_stack.xcom(PIPELINE, run_id, "export")["artifacts"]["onnx"].endswith("/model.onnx")
