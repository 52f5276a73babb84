"""Entry point of a Kubernetes pod job: ``python -m operators.pod_job`` (see KubernetesPodLauncher).

Reads the job from ``MASK2FORMER_POD_JOB`` (action, overrides with S3 URIs, publish URI), restores an
earlier attempt's checkpoints, stages the data with the pod's own S3 credentials (environment or
service account), runs the engine's CLI and publishes the job folder to S3, ``_FINISHED`` last. Exits
with the CLI's status. Imports no Airflow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from mask2former import cli
from mask2former.data.staging import default_s3_client_factory

from .prepare import SPEC_FILE, publish, stage_and_write_spec
from .remote import restore_job_folder

POD_JOB_ENV = "MASK2FORMER_POD_JOB"
POD_WORKSPACE_ENV = "MASK2FORMER_POD_WORKSPACE"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("mask2former.pod_job").info
    raw = os.environ.get(POD_JOB_ENV)
    if not raw:
        print(f"error: {POD_JOB_ENV} is not set (the launcher passes the job in it)", file=sys.stderr)
        return 2
    job = json.loads(raw)
    workspace = Path(os.environ.get(POD_WORKSPACE_ENV, "/workspace"))
    local_dir = workspace / "job"
    if job["action"] == "train":
        restore_job_folder(job["publish_uri"], local_dir, default_s3_client_factory, log)
    stage_and_write_spec(action=job["action"], overrides=job["overrides"], local_dir=local_dir,
                         cache_dir=workspace / "cache", s3_client_factory=default_s3_client_factory, log=log)
    code = cli.main([job["action"], "-e", str(local_dir / SPEC_FILE), "--results-dir", str(local_dir)])
    publish(local_dir=local_dir, publish_uri=job["publish_uri"], s3_client_factory=default_s3_client_factory, log=log)
    return code


if __name__ == "__main__":
    sys.exit(main())
