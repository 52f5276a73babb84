"""Deployment files: docker-compose.yml validates with Compose and has the intended shape; the Dockerfile
builds from python:3.11-slim with a torch build argument; the main-job script is valid bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

COMPOSE = REPO / "docker-compose.yml"


def compose_command():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_validates_with_compose():
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    for profile in ([], ["--profile", "gpu"], ["--profile", "flower"], ["--profile", "debug"]):
        done = subprocess.run(command + ["-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True,
                              cwd=REPO)
        assert done.returncode == 0, done.stderr


def test_compose_services_share_one_jwt_secret_and_reach_the_api_server(compose):
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"} <= set(services)
    airflow = {name: s for name, s in services.items() if name.startswith("airflow-")}
    secrets = {s["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for s in airflow.values()}
    assert len(secrets) == 1
    for service in airflow.values():
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert '"endpoint_url": "http://minio:9000"' in env["AIRFLOW_CONN_AWS_DEFAULT"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    api = services["airflow-apiserver"]
    assert api["ports"] == ["8080:8080"] and "/api/v2/monitor/health" in " ".join(api["healthcheck"]["test"])
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])


def test_compose_routes_gpu_stages_to_a_gpu_worker_and_a_pool_sized_to_its_gpus(compose):
    """The DAGs read MASK2FORMER_GPU_* when parsed (operators/utils/gpu.py); the GPU worker listens on that queue
    with one task per GPU slot, the CPU worker on the default queue, and airflow-init sizes that pool."""
    from operators.utils.gpu import ROUTING_SETTINGS

    services = compose["services"]
    env = services["airflow-scheduler"]["environment"]
    for variable, _, default in ROUTING_SETTINGS.values():
        assert env[variable] == f"${{{variable}:-{default}}}"
    assert services["airflow-worker"]["command"] == "celery worker --queues default"
    assert services["airflow-worker-gpu"]["command"] == \
        "celery worker --queues ${MASK2FORMER_GPU_QUEUE:-gpu} --concurrency ${MASK2FORMER_GPU_SLOTS:-1}"
    init = services["airflow-init"]
    assert 'airflow pools set "$${MASK2FORMER_GPU_POOL}" "$${MASK2FORMER_GPU_SLOTS}"' in " ".join(init["command"])
    assert init["environment"]["MASK2FORMER_GPU_SLOTS"] == "${MASK2FORMER_GPU_SLOTS:-1}"
    assert services["flower"]["profiles"] == ["flower"] and services["flower"]["command"] == "celery flower"
    assert services["flower"]["ports"] == ["5555:5555"]
    assert services["airflow-cli"]["profiles"] == ["debug"]


def test_dockerfile_installs_airflow_with_its_constraints_file():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG AIRFLOW_CONSTRAINTS_URL=https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/" \
           "constraints-${PYTHON_VERSION}.txt" in text
    assert '--constraint "${AIRFLOW_CONSTRAINTS_URL}"' in text
    version = next(line for line in (REPO / "requirements.txt").read_text().splitlines()
                   if line.startswith("apache-airflow=="))
    assert f"ARG AIRFLOW_VERSION={version.split('==')[1]}" in text


def test_dockerfile_builds_from_python_slim_with_a_torch_build_argument():
    text = (REPO / "Dockerfile").read_text()
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("FROM")][0]] == \
        "FROM python:3.11-slim"
    assert "ARG TORCH_INDEX_URL=" in text and '--index-url "${TORCH_INDEX_URL}"' in text
    assert 'pip install -r "${REQUIREMENTS}"' in text and "pip install --no-deps ." in text


def test_main_job_script_is_valid():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "run_demo.sh")]).returncode == 0
    helper = subprocess.run([sys.executable, str(REPO / "scripts" / "run_demo.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helper.returncode == 0 and "--epochs" in helper.stdout
