"""GPU stages as Kubernetes pods, from the README's example: the pod it renders (GPU, node selector, tolerations,
image, Secrets; checked with the cncf.kubernetes provider's pod serializer), and the deferral of a pod task.

No Kubernetes cluster is reachable here: where the pod would be created or deleted, a stand-in for the
provider's ``KubernetesHook.core_v1_client`` (a recorder named as such below) takes the call. Everything else is
real: the operator, its check of the spec, its S3 calls (moto's server through the ``aws_default`` connection)
and the trigger it defers to. The deferral round trip under a real scheduler and triggerer, with a detached
local process standing in for the pod, is tests/airflow/test_deferrable.py.
"""

from __future__ import annotations

import json
import re

import pytest
from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
from airflow.sdk import DAG
from airflow.sdk.exceptions import TaskDeferred

from helpers import REPO, fake_context, make_dataset, tiny_overrides, upload_tree
from mask2former.config import SpecError
from operators import (KubernetesPodLauncher, LocalProcessLauncher, Mask2FormerStorageHook,
                       Mask2FormerTrainOperator)
from operators.triggers.job import Mask2FormerJobTrigger
from s3_server import moto_endpoint, moto_server, s3_client  # noqa: F401 - pytest fixtures
from test_airflow_operators import fake_train_folder


def readme_example(after: str) -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


class StandInCoreV1:
    """Stands in for the Kubernetes API (no cluster here): records the pods created and deleted."""

    def __init__(self):
        self.created, self.deleted = [], []

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))

    def delete_namespaced_pod(self, name, namespace):
        self.deleted.append((namespace, name))


@pytest.fixture
def cluster(monkeypatch):
    stand_in = StandInCoreV1()
    monkeypatch.setattr(KubernetesHook, "core_v1_client", property(lambda hook: stand_in))
    return stand_in


@pytest.fixture
def example(moto_endpoint, monkeypatch, tmp_path):  # noqa: F811
    """The README's Kubernetes example, run in a DAG, with its S3 buckets (data and results) on moto."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIAPODTEST", "password": "pod-test-secret",
        "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}))
    client = s3_client(moto_endpoint)
    for bucket in ("data", "results"):
        client.create_bucket(Bucket=bucket)
    data = make_dataset(tmp_path / "data")
    upload_tree(client, data / "train", "data", "coco/train")
    upload_tree(client, data / "val", "data", "coco/val")
    namespace = {}
    with DAG("mask2former_pods", schedule=None):
        exec(readme_example("### Kubernetes"), namespace)  # noqa: S102 - the README's own example
    yield namespace
    for bucket in ("data", "results"):
        for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)


def test_the_readme_pod_asks_for_its_gpu_node_and_takes_secrets_by_reference(example):
    launcher, train = example["gpu_pod"], example["train"]
    assert train.launcher is launcher and train.deferrable
    job = launcher.describe(action="train", paths=train.job_paths(fake_context(task_id="train")),
                            overrides={"train.num_epochs": 50}, check_interval=10)
    pod = PodGenerator.serialize_pod(launcher.pod(job, name="mask2former-train-x"))
    assert PodGenerator.serialize_pod(PodGenerator.deserialize_model_dict(pod)) == pod  # a valid V1Pod
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["image"] == "registry.example.com/mask2former-airflow:gpu"
    assert container["command"] == ["python", "-m", "operators.pod_job"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1", "memory": "32Gi"},
                                      "requests": {"cpu": "8", "memory": "32Gi"}}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["restartPolicy"] == "Never" and pod["metadata"]["namespace"] == "ml"
    env = {e["name"]: e for e in container["env"]}
    assert env["MASK2FORMER_ENCRYPTION_KEY"] == {"name": "MASK2FORMER_ENCRYPTION_KEY", "valueFrom": {
        "secretKeyRef": {"name": "mask2former-model-key", "key": "MASK2FORMER_ENCRYPTION_KEY"}}}
    assert container["envFrom"] == [{"secretRef": {"name": "mask2former-s3"}}]
    assert not any(name.startswith("AWS_") for name in env)  # S3 credentials only through the Secret
    described = json.loads(env["MASK2FORMER_JOB"]["value"])
    assert described["publish_uri"] == job.publish_uri and described["local_dir"] == "/workspace/job"
    assert container["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]


def test_a_deferrable_pod_task_creates_its_pod_and_defers_to_the_job_trigger(example, cluster, tmp_path):
    train = example["train"]
    train.spec_overrides = tiny_overrides(**{"train.num_epochs": 2})
    context = fake_context(dag_id="mask2former_pods", task_id="train")
    with pytest.raises(TaskDeferred) as deferred:
        train.execute(context)
    [(namespace, pod)] = cluster.created
    assert namespace == "ml" and pod.metadata.name.startswith("mask2former-train-")
    trigger = deferred.value.trigger
    assert isinstance(trigger, Mask2FormerJobTrigger) and deferred.value.method_name == "execute_complete"
    paths = train.job_paths(context)
    assert trigger.job_uri == paths.publish_uri and paths.publish_uri.startswith("s3://results/mask2former/")
    assert trigger.pod == {"name": pod.metadata.name, "namespace": "ml", "kubernetes_conn_id": "kubernetes_default"}
    assert trigger.startup_timeout == 600
    job = json.loads(next(e.value for e in pod.spec.containers[0].env if e.name == "MASK2FORMER_JOB"))
    assert job["overrides"]["dataset.train.img_dir"] == "s3://data/coco/train/images.tar.gz"  # staged in the pod
    # every override travels (keys of other actions are accepted by the job and reported as unused there)
    assert job["overrides"]["train.num_epochs"] == 2

    # The pod's job published its folder (done here by hand) and the trigger fired: the task resumes.
    storage = Mask2FormerStorageHook()
    storage.publish(fake_train_folder(tmp_path / "trained"), paths.publish_uri)
    storage.beat(paths.publish_uri, host=pod.metadata.name, pid=7, exit_code=0)
    outcome = train.execute_complete(context, {"status": "success", "job_uri": paths.publish_uri},
                                     **deferred.value.kwargs)
    assert outcome["status"] == "SUCCESS" and outcome["results_dir"] == paths.publish_uri
    assert outcome["artifacts"]["best_checkpoint"] == f"{paths.publish_uri}/model_epoch_001_step_000002.pth"
    assert cluster.deleted == [("ml", pod.metadata.name)]  # a pod that succeeded is deleted


def test_a_retried_pod_task_follows_its_live_pod_instead_of_starting_another(example, cluster):
    train = example["train"]
    train.spec_overrides = tiny_overrides()
    context = fake_context(dag_id="mask2former_pods", run_id="retried", task_id="train")
    paths = train.job_paths(context)
    Mask2FormerStorageHook().beat(paths.publish_uri, host="mask2former-train-alive", pid=7)
    with pytest.raises(TaskDeferred) as deferred:
        train.execute(context)
    assert cluster.created == []
    assert deferred.value.trigger.pod["name"] == "mask2former-train-alive"


def test_a_pod_gets_the_mlflow_connection_as_its_environment_and_a_localhost_server_is_refused(
        example, cluster, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from structlog.testing import capture_logs

    train = example["train"]
    train.spec_overrides, train.mlflow_conn_id = tiny_overrides(), "mlflow_k8s"
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_K8S", json.dumps({
        "conn_type": "http", "host": "mlflow.ml.svc", "port": 5000, "extra": {"experiment_name": "segmentation"}}))
    with capture_logs() as task_log, pytest.raises(TaskDeferred):
        train.execute(fake_context(dag_id="mask2former_pods", run_id="tracked", task_id="train"))
    assert {"event": "train: MLflow tracking at http://mlflow.ml.svc:5000 (from connection 'mlflow_k8s')",
            "log_level": "info"} in task_log
    [(_, pod)] = cluster.created
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"
    assert env["MLFLOW_EXPERIMENT_NAME"] == "segmentation"

    for uri, refusal in (("http://127.0.0.1:5000", r"MLflow tracking URI http://127.0.0.1:5000 .*names localhost"),
                         ("https://ml:hunter2@mlflow.example.com",
                          r"MLflow tracking URI https://mlflow.example.com .*carries credentials")):
        monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_K8S", json.dumps({"conn_type": "http", "extra": {"tracking_uri": uri}}))
        with pytest.raises(AirflowFailException, match=refusal) as refused:
            train.execute(fake_context(dag_id="mask2former_pods", run_id="refused", task_id="train"))
        assert "hunter2" not in str(refused.value)
    assert len(cluster.created) == 1  # no pod for a refused task


def test_an_export_pod_is_told_the_mlflow_run_of_its_parent_training_job(example, cluster, monkeypatch, tmp_path):
    from operators import Mask2FormerExportOperator

    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_K8S", json.dumps({"conn_type": "http", "host": "mlflow.ml.svc",
                                                              "port": 5000}))
    trained = "s3://results/mask2former/mask2former_pods/earlier/train"
    Mask2FormerStorageHook().publish(fake_train_folder(tmp_path / "trained"), trained)
    parent = {"action": "train", "job_id": "train", "results_dir": trained, "status": "SUCCESS",
              "mlflow": {"run_id": "0123abcd", "experiment_id": "3", "tracking_uri": "http://mlflow.ml.svc:5000"}}
    export = Mask2FormerExportOperator(task_id="export", parent=parent, launcher=example["gpu_pod"],
                                       results_root="s3://results/mask2former", mlflow_conn_id="mlflow_k8s",
                                       deferrable=True)
    with pytest.raises(TaskDeferred):
        export.execute(fake_context(dag_id="mask2former_pods", task_id="export"))
    [(_, pod)] = cluster.created
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    # the checkpoint is staged from S3 without its run file: the pod's export adds its ONNX model to this run
    assert env["MLFLOW_RUN_ID"] == "0123abcd" and env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"


def test_every_launcher_value_in_the_readme_works_or_is_refused_when_the_dag_is_parsed():
    values = set(re.findall(r'launcher=("[^"]*"|[A-Za-z_]+\(?)', (REPO / "README.md").read_text()))
    assert values == {"LocalProcessLauncher(", "KubernetesPodLauncher(", '"kubernetes"', "gpu_pod"}  # gpu_pod: above
    assert isinstance(Mask2FormerTrainOperator(task_id="local", launcher=LocalProcessLauncher()).launcher,
                      LocalProcessLauncher)
    assert Mask2FormerTrainOperator(task_id="pod", launcher=KubernetesPodLauncher(image="i")).launcher.image == "i"
    with pytest.raises(SpecError) as refused:
        Mask2FormerTrainOperator(task_id="t", launcher="kubernetes")
    message = str(refused.value)
    assert "launcher='kubernetes' is not a launcher: give LocalProcessLauncher()" in message
    assert ". " not in message.rstrip(".")  # one sentence
