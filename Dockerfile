# Mask2Former on Apache Airflow: one image for every Airflow component and for the engine's jobs.
#
#   CPU (default):  docker build -t mask2former-airflow:latest .
#   GPU workers:    docker build -t mask2former-airflow:gpu \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                     --build-arg REQUIREMENTS=requirements-gpu.txt .
#
# The GPU build takes the CUDA build of torch from PyTorch's index and adds requirements-gpu.txt
# (TensorRT, ModelOpt; TensorRT's wheels come from NVIDIA's index, see the README).
FROM python:3.11-slim

ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
ARG AIRFLOW_CONSTRAINTS_URL=https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG REQUIREMENTS=requirements.txt
ARG AIRFLOW_UID=50000

ENV AIRFLOW_HOME=/opt/airflow \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MASK2FORMER_CACHE_DIR=/opt/airflow/mask2former/cache \
    MASK2FORMER_WORK_DIR=/opt/airflow/mask2former/work

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini curl libgomp1 libpq5 procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow

WORKDIR /opt/mask2former
COPY requirements.txt requirements-gpu.txt ./
# Airflow and its providers first, with Airflow's constraints file (the versions Airflow was released and
# tested with); then torch from the index of the wanted build (CPU or CUDA); then the rest, keeping Airflow's
# version pinned.
RUN pip install "apache-airflow[celery,amazon,cncf.kubernetes,postgres,fab,openlineage]==${AIRFLOW_VERSION}" \
        --constraint "${AIRFLOW_CONSTRAINTS_URL}" \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install -r "${REQUIREMENTS}" "apache-airflow==${AIRFLOW_VERSION}"

COPY pyproject.toml ./
COPY mask2former ./mask2former
COPY operators ./operators
COPY schemas ./schemas
COPY specs ./specs
RUN pip install --no-deps . && python -m mask2former schemas --check --root /opt/mask2former

COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
RUN mkdir -p /opt/airflow/logs /opt/airflow/config /opt/airflow/mask2former && chown -R airflow:0 /opt/airflow && chmod -R g+rwX /opt/airflow

USER airflow
WORKDIR /opt/airflow
ENTRYPOINT ["/usr/bin/tini", "--", "airflow"]
CMD ["version"]
