"""Operator overhead and staging cost on the tiny model, against a local moto S3 server.

For train, evaluate and export (tiny config, 64 px synthetic COCO-panoptic data):

* ``bare_cli_s``: the engine's job alone, ``python -m mask2former ACTION -e spec.yaml``, data already local;
* ``operator_s``: the operator's ``execute`` (spec building and validation, data planning on S3, the job
  process: staging through the connection's S3 credentials, the same CLI job, status following, publishing
  the results folder to S3; then reading the outcome);
* ``overhead_s = operator_s - bare_cli_s`` (includes the run-to-run noise of the job itself);
* ``engine_s``: the engine's own process inside the job (``python -m mask2former ...``, as the job process logs it);
* ``overhead_own_s = operator_s - the job process's time`` (what the task does around its job process: spec
  building and validation, data planning, reading the outcome), ``job_process_own_s`` = the job process's time
  less the engine's (interpreter start, staging, heartbeats, publishing), and ``overhead_total_s = operator_s -
  engine_s``, the operator's whole cost per task.

Staging: the training sources staged twice into a fresh cache (bytes downloaded the first time, 0 the second).

    python bench/bench_operators.py [--out bench/results/operators.json]

Writes the JSON and prints a table. Needs moto's server (requirements-dev.txt); no network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dags")]
TINY = json.loads((REPO / "scripts" / "tiny_model.json").read_text())
NUM_CLASSES = 13
ACTIONS = ("train", "evaluate", "export")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload(client, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def timed_launcher():
    from operators import LocalProcessLauncher

    class TimedLauncher(LocalProcessLauncher):
        """The operator's launcher, timing its job process (for the operator's own overhead)."""

        process_s = 0.0
        engine_s = 0.0

        def run(self, job, env, log):
            from operators.pod_job import ENGINE_ENDED

            def read(line):
                if line.startswith(ENGINE_ENDED):
                    self.engine_s = float(line.rsplit(" after ", 1)[1].split()[0])
                log(line)

            began = time.monotonic()
            try:
                return super().run(job, env, read)
            finally:
                self.process_s = time.monotonic() - began

    return TimedLauncher()


def bare_cli(action: str, overrides: dict, folder: Path) -> float:
    from mask2former.config import resolve_spec_dict
    import yaml

    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(resolve_spec_dict(action, overrides=overrides)))
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "mask2former", action, "-e", str(folder / "spec.yaml"), "--results-dir",
                    str(folder)], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.monotonic() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "operators.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tmp-bench-operators-", dir=REPO / "bench" / "results"))
    os.environ.update({"AIRFLOW_HOME": str(work / "airflow_home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                       "MASK2FORMER_CACHE_DIR": str(work / "cache"), "MASK2FORMER_WORK_DIR": str(work / "work")})
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        return run(args, work, f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def quiet_logs() -> None:
    import logging

    for name in ("werkzeug", "airflow", "mask2former", "botocore", "boto3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)


def warm_up() -> None:
    """Load torch and Lightning once so that neither the bare job nor the operator pays a cold disk cache."""
    subprocess.run([sys.executable, "-c", "import torch, pytorch_lightning, onnxruntime"], check=True,
                   capture_output=True)


def run(args, work: Path, endpoint: str) -> int:
    import boto3

    quiet_logs()
    warm_up()

    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps({
        "conn_type": "aws", "login": "bench", "password": "bench",
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
    client.create_bucket(Bucket="bench")
    data = work / "data"
    subprocess.run([sys.executable, "-m", "mask2former.data.synthetic", str(data), "--format", "coco_panoptic",
                    "--images", "4", "--val-images", "2", "--size", "64", "--seed", "0"], check=True,
                   capture_output=True)
    upload(client, data, "bench", "data")

    from mask2former.config import ACTION_SECTIONS
    from mask2former.data.sources import plan_data_sources
    from operators import (Mask2FormerEvaluateOperator, Mask2FormerExportOperator, Mask2FormerStorageHook,
                           Mask2FormerTrainOperator)

    def overrides_for_action(action, keys):
        return {k: v for k, v in keys.items() if k.split(".", 1)[0] in ACTION_SECTIONS[action]}

    storage = Mask2FormerStorageHook(aws_conn_id="aws_default")
    overrides = {**TINY, "model.sem_seg_head.num_classes": NUM_CLASSES, "train.num_epochs": 1}

    # Staging: first into an empty cache, then again.
    planned = plan_data_sources("train", "s3://bench/data/train", "s3://bench/data/val", "coco_panoptic",
                                exists=lambda uri: True)
    staging = []
    for attempt in ("first", "second"):
        staged = storage.stage(planned, work / "staging-cache", log=lambda line: None)
        staging.append({"run": attempt, "seconds": round(staged.seconds, 3), "downloaded_bytes": staged.downloaded_bytes,
                        "downloaded_files": staged.downloaded_files, "cache_hits": staged.cache_hits})
    local_sources = staged.local_overrides

    classes = {"train": Mask2FormerTrainOperator, "evaluate": Mask2FormerEvaluateOperator,
               "export": Mask2FormerExportOperator}
    rows, parent = [], None
    for action in ACTIONS:
        launcher = timed_launcher()
        op = classes[action](task_id=action, train_datasets="s3://bench/data/train",
                             eval_dataset="s3://bench/data/val", dataset_format="coco_panoptic",
                             results_root="s3://bench/results", spec_overrides=overrides, parent=parent,
                             launcher=launcher)
        context = {"ti": SimpleNamespace(dag_id="bench", run_id="bench_run", task_id=action, map_index=-1)}
        began = time.monotonic()
        outcome = op.execute(context)
        operator_s = time.monotonic() - began
        # The bare job: same action and spec keys, data and parent model already local.
        bare_overrides = {**{k: v for k, v in local_sources.items() if action == "train" or not k.startswith(
            ("dataset.train.img_dir", "dataset.train.panoptic", "dataset.train.instance"))},
            **overrides_for_action(action, overrides)}
        if action == "evaluate":
            bare_overrides["evaluate.checkpoint"] = str(work / "bare" / "train" / "model_latest.pth")
        if action == "export":
            bare_overrides = {**overrides_for_action("export", overrides),
                              "export.checkpoint": str(work / "bare" / "train" / "model_latest.pth")}
        bare_s = bare_cli(action, bare_overrides, work / "bare" / action)
        rows.append({"action": action, "bare_cli_s": round(bare_s, 2), "operator_s": round(operator_s, 2),
                     "operator_subprocess_s": round(launcher.process_s, 2), "engine_s": round(launcher.engine_s, 2),
                     "overhead_s": round(operator_s - bare_s, 2),
                     "overhead_own_s": round(operator_s - launcher.process_s, 2),
                     "job_process_own_s": round(launcher.process_s - launcher.engine_s, 2),
                     "overhead_total_s": round(operator_s - launcher.engine_s, 2), "status": outcome["status"]})
        if action == "train":
            parent = outcome

    result = {"machine": f"{os.cpu_count()} CPU cores", "model": "tiny Swin (embed 32, depths [1,1,1,1]), 64 px, "
              "1 epoch, 4 train + 2 val images", "storage": "moto S3 on 127.0.0.1 (data and results)",
              "actions": rows, "staging": staging}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| action | bare CLI s | operator s | engine s | in the task s | in the job process s | "
          "operator - engine s |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['action']} | {row['bare_cli_s']:.2f} | {row['operator_s']:.2f} | {row['engine_s']:.2f} | "
              f"{row['overhead_own_s']:.2f} | {row['job_process_own_s']:.2f} | {row['overhead_total_s']:.2f} |")
    for entry in staging:
        print(f"staging ({entry['run']}): {entry['downloaded_bytes']} bytes in {entry['downloaded_files']} file(s), "
              f"{entry['cache_hits']} cache hit(s), {entry['seconds']:.3f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
