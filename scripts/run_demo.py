"""The main job: run the ``mask2former_pipeline`` DAG end to end on this machine, in a few minutes.

Embedded default deployment: AIRFLOW_HOME is ./airflow_home (SQLite metadata, LocalExecutor, this
repository's dags/ and plugins/), a small synthetic COCO-panoptic dataset is generated under
./demo/data, and the DAG runs once with ``dag.test()`` on a tiny model (scripts/tiny_model.json) with
the trigger form's params. gen_trt_engine is skipped, with its reason, without a CUDA GPU. Prints each
task's state and where the results and metrics are (./demo/results/<dag>/<run>/<task>).

    python scripts/run_demo.py [--epochs 8] [--images 16] [--size 64] [--lr 1e-3] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "scripts" / "tiny_model.json"
DAG_ID = "mask2former_pipeline"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "demo"), help="Data and results (default ./demo).")
    parser.add_argument("--airflow-home", default=str(REPO / "airflow_home"), help="AIRFLOW_HOME (./airflow_home).")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs (default 8).")
    parser.add_argument("--images", type=int, default=16, help="Synthetic training images (default 16).")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Learning rate (default 1e-3: the tiny model trains from scratch, without the "
                             "pretrained backbone TAO's 2e-4 assumes).")
    parser.add_argument("--val-images", type=int, default=4, help="Synthetic validation images (default 4).")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels (default 64).")
    parser.add_argument("--fresh", action="store_true", help="Delete earlier demo data, results and metadata first.")
    return parser.parse_args(argv)


def configure_environment(args) -> dict:
    """The embedded default: SQLite metadata, LocalExecutor, this repo's DAGs and plugins, local results."""
    home = Path(args.airflow_home).absolute()
    work = Path(args.workdir).absolute()
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "MASK2FORMER_RESULTS_ROOT": str(work / "results"),
        "MASK2FORMER_CACHE_DIR": str(work / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dags"), str(REPO / "plugins"),
                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    os.environ.update(env)
    for extra in (str(REPO), str(REPO / "dags"), str(REPO / "plugins")):
        if extra not in sys.path:
            sys.path.insert(0, extra)
    return env


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def generate_data(args, data: Path) -> None:
    if (data / "train" / "images.tar.gz").is_file() and (data / "val" / "images.tar.gz").is_file():
        print(f"synthetic dataset already at {data}")
        return
    subprocess.run([sys.executable, "-m", "mask2former.data.synthetic", str(data), "--format", "coco_panoptic",
                    "--images", str(args.images), "--val-images", str(args.val_images), "--size", str(args.size),
                    "--seed", "0"], check=True)


def migrate() -> None:
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    print(f"metadata database ready in {time.monotonic() - began:.1f} s ({os.environ['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']})")


def run_conf(args, data: Path, params) -> dict:
    conf = {
        "train_datasets": str(data / "train"),
        "eval_dataset": str(data / "val"),
        "dataset_format": "coco_panoptic",
        "model.mode": "panoptic",
        "model.backbone.swin.type": "tiny",
        "model.sem_seg_head.num_classes": 13,  # synthetic raw ids go up to 12 (contiguous_id false: index = raw id)
        "train.num_epochs": args.epochs,
        "train.optim.lr": args.lr,
        "spec_overrides": json.loads(TINY_MODEL.read_text()),
    }
    if "automl_policy" in params:
        conf["automl_policy"] = "off"  # one plain training run; the AutoML search is its own demo
    return conf


def summarise(dag_run) -> int:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=DAG_ID, run_id=dag_run.run_id).all()
        rows = [(ti.task_id, str(ti.state), ti.xcom_pull(task_ids=ti.task_id, session=session) if ti.state == "success"
                 else None) for ti in tis]
    step(f"run {dag_run.run_id}: {dag_run.state}")
    failed = 0
    for task_id, state, xcom in sorted(rows):
        print(f"  {task_id:20s} {state}")
        if isinstance(xcom, dict) and "results_dir" in xcom:
            print(f"      results: {xcom['results_dir']}")
            metrics = {k: v for k, v in (xcom.get("metrics") or {}).items()
                       if k in ("mIoU", "PQ", "AP", "epochs", "pixel_accuracy")}
            if metrics:
                print(f"      metrics: {json.dumps(metrics)}")
        if task_id == "gen_trt_engine" and "skipped" in state.lower():
            from operators.utils.gpu import cuda_gpu_missing_reason

            reason = cuda_gpu_missing_reason()
            if reason:
                print(f"      skipped: building a TensorRT engine needs a CUDA GPU, and this machine has none: {reason}.")
        failed += state not in ("success", "skipped", "TaskInstanceState.SUCCESS", "TaskInstanceState.SKIPPED")
    return failed


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = configure_environment(args)
    work = Path(args.workdir).absolute()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(env["AIRFLOW_HOME"], ignore_errors=True)
    data = work / "data"
    began = time.monotonic()
    step(f"synthetic dataset ({args.images} + {args.val_images} images of {args.size} px) in {data}")
    generate_data(args, data)
    step(f"Airflow metadata (SQLite) in {env['AIRFLOW_HOME']}")
    migrate()
    step(f"running {DAG_ID} with dag.test(): train -> evaluate -> export -> gen_trt_engine, quantize -> evaluate")
    from mask2former_pipeline import dag

    dag_run = dag.test(run_conf=run_conf(args, data, dag.params))
    failed = summarise(dag_run)
    from operators.utils.jobs import sanitize

    folder = Path(env["MASK2FORMER_RESULTS_ROOT"]) / DAG_ID / sanitize(dag_run.run_id)
    step(f"done in {time.monotonic() - began:.0f} s. Results: {folder}/<task>/ (metrics.json, status.json, "
         "checkpoints, model.onnx); browse them on the Airflow UI's 'Mask2Former jobs' page.")
    return 1 if failed or str(dag_run.state) not in ("success", "DagRunState.SUCCESS") else 0


if __name__ == "__main__":
    sys.exit(main())
