"""The AutoML operators and task group without running a search: DAG shape (mapped trials in the GPU pool),
the policy branch, the result join, parse-time checks, the study storage from a connection, and the S3 side
(published trial folders: the chosen trial's XCom, checkpoint cleanup) on a moto server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO, upload_tree
from mask2former.automl import policy
from operators import Mask2FormerStorageHook
from operators.operators.automl import (DECISION_KEY, Mask2FormerAutoMLOperator, Mask2FormerAutoMLPlanOperator,
                                        Mask2FormerAutoMLPolicyOperator, Mask2FormerAutoMLResultOperator,
                                        resolve_storage)
from operators.utils.outcome import published_outcome
from s3_server import moto_endpoint, moto_server, new_bucket, s3_client, s3_env  # noqa: F401 - pytest fixtures


@pytest.fixture(scope="module")
def pipeline():
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags")
    assert bag.import_errors == {}
    return bag.dags["mask2former_pipeline"]


def test_training_stage_shape_in_the_pipeline(pipeline):
    up = {t.task_id: sorted(t.upstream_task_ids) for t in pipeline.tasks if t.task_id.startswith("training.")
          or t.task_id in ("train", "evaluate", "export", "quantize")}
    assert up == {
        "training.policy": [],
        "training.direct_train": ["training.policy"],
        "training.automl_plan": ["training.policy"],
        "training.automl_trials": ["training.automl_plan"],
        "training.automl_select": ["training.automl_plan", "training.automl_trials"],
        "train": ["training.automl_select", "training.direct_train"],
        "evaluate": ["train"], "export": ["evaluate", "train"], "quantize": ["train"],
    }
    trials = pipeline.get_task("training.automl_trials")
    assert type(trials).__name__ == "MappedOperator"
    assert trials.pool == "mask2former_gpu"
    assert trials.expand_input.value["slot"] == [0, 1]
    assert pipeline.get_task("training.automl_select").trigger_rule == "all_done_min_one_success"
    assert pipeline.get_task("train").trigger_rule == "none_failed_min_one_success"


def test_trigger_form_has_the_automl_params(pipeline):
    params = pipeline.params
    assert params["automl_policy"] == policy.read_skill_info()["automl_policy"]
    schema = params.get_param("automl_policy").schema
    assert schema["enum"] == ["auto", "off"]
    assert params.get_param("automl_algorithm").schema["enum"] == ["bayesian", "hyperband", "random"]
    assert params.get_param("automl_max_recommendations").schema["minimum"] == 1


class FakeTI(SimpleNamespace):
    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids, key="return_value"):
        return self.xcoms.get((task_ids, key))


def branch(schemas_root=None, override=None):
    return Mask2FormerAutoMLPolicyOperator(task_id="policy", automl_policy=override, schemas_root=schemas_root,
                                           automl_task_id="g.automl_plan", direct_task_id="g.direct_train")


def test_the_branch_follows_the_policy_and_pushes_its_decision(tmp_path):
    ti = FakeTI(pushed={})
    assert branch().choose_branch({"ti": ti}) == "g.automl_plan"
    assert ti.pushed[DECISION_KEY]["use_automl"] is True
    assert branch(override="off").choose_branch({"ti": ti}) == "g.direct_train"
    assert ti.pushed[DECISION_KEY]["source"] == "run"

    root = tmp_path / "root"
    (root / "specs").mkdir(parents=True)
    shutil.copy(REPO / policy.SKILL_INFO_FILE, root / policy.SKILL_INFO_FILE)
    assert branch(schemas_root=str(root)).choose_branch({"ti": ti}) == "g.direct_train"
    assert "not runnable until the schemas are generated" in ti.pushed[DECISION_KEY]["reason"]


def test_the_result_takes_the_branch_that_ran():
    op = Mask2FormerAutoMLResultOperator(task_id="train", policy_task_id="p", select_task_id="s",
                                         direct_task_id="d")
    chosen = {"action": "train", "results_dir": "/r/trials/trial_002", "automl": {"best_trial": 2}}
    direct = {"action": "train", "results_dir": "/r/direct"}
    decision = policy.decide("train").as_dict()
    ti = FakeTI(xcoms={("p", DECISION_KEY): decision, ("s", "return_value"): chosen, ("d", "return_value"): None})
    out = op.execute({"ti": ti})
    assert out["results_dir"] == "/r/trials/trial_002"
    assert out["automl"]["used"] is True and out["automl"]["best_trial"] == 2
    off = policy.decide("train", override="off").as_dict()
    ti = FakeTI(xcoms={("p", DECISION_KEY): off, ("s", "return_value"): None, ("d", "return_value"): direct})
    out = op.execute({"ti": ti})
    assert out["results_dir"] == "/r/direct" and out["automl"]["used"] is False
    assert out["automl"]["reason"] == off["reason"]


@pytest.mark.parametrize("kwargs, message", [
    ({"algorithm": "grid"}, "algorithm 'grid' is not one of bayesian, hyperband, random"),
    ({"automl_policy": "sometimes"}, "automl_policy 'sometimes' is not one of auto, off"),
])
def test_literal_settings_are_checked_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mask2FormerAutoMLPlanOperator(task_id="plan", worker_slots=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        Mask2FormerAutoMLOperator(task_id="automl", **kwargs)


def test_templated_settings_are_left_to_execute():
    op = Mask2FormerAutoMLPlanOperator(task_id="plan", worker_slots=2, algorithm="{{ params.automl_algorithm }}",
                                       automl_policy="{{ params.automl_policy }}")
    assert set(op.template_fields) >= {"algorithm", "automl_policy", "max_recommendations", "custom_ranges"}


def test_study_storage_comes_from_a_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AUTOML_STUDY", "postgres://automl:s3cretpw@db.example:5432/studies")
    assert resolve_storage(None, "automl_study") == \
        "postgresql+psycopg2://automl:s3cretpw@db.example:5432/studies"


def published_trial(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    for name in ("model_epoch_001_step_000002.pth", "model_latest.pth"):
        (folder / name).write_bytes(b"weights")
    (folder / "best_model.json").write_text(json.dumps({"epoch": 1, "step": 2, "metric": "mIoU", "value": value,
                                                        "checkpoint": "model_epoch_001_step_000002.pth"}))
    (folder / "status.json").write_text(json.dumps({"status": "SUCCESS", "message": "done"}) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"mIoU": value}))
    return folder


def test_published_trials_on_s3_give_the_train_xcom_and_lose_their_checkpoints_on_cleanup(tmp_path, s3_env):
    client = s3_client(s3_env)
    bucket = new_bucket(s3_env)
    search = f"s3://{bucket}/results/dag/run/training.automl_plan"
    for number, value in ((0, 12.5), (1, 30.0)):
        upload_tree(client, published_trial(tmp_path / f"trial_{number:03d}", value), bucket,
                    f"results/dag/run/training.automl_plan/trials/trial_{number:03d}")
    hook = Mask2FormerStorageHook(aws_conn_id=None)

    outcome = published_outcome(hook, action="train", job_id="dag/run/training.automl_plan/trials/trial_001",
                                publish_uri=f"{search}/trials/trial_001")
    assert outcome["action"] == "train" and outcome["status"] == "SUCCESS"
    assert outcome["job_id"] == "dag/run/training.automl_plan/trials/trial_001"
    assert outcome["results_dir"] == f"{search}/trials/trial_001"
    assert outcome["artifacts"]["best_checkpoint"] == f"{search}/trials/trial_001/model_epoch_001_step_000002.pth"
    assert outcome["metrics"] == {"mIoU": 30.0}

    assert hook.remove_checkpoints(f"{search}/trials/trial_000") == 2
    left = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="results/")["Contents"]]
    assert not any(k.startswith("results/dag/run/training.automl_plan/trials/trial_000/") and k.endswith(".pth")
                   for k in left)
    assert sum(1 for k in left if k.endswith(".pth")) == 2  # the chosen trial keeps its checkpoints
