"""AutoML in the real mask2former_pipeline DAG (dag.test on a migrated SQLite metadata DB).

dag.test runs the mapped trial tasks one after the other in this process (no executor), so the two worker
slots share the study sequentially here; tests/test_automl_search.py runs workers truly in parallel on one
study (SQLite and PostgreSQL). Downstream tasks that are not about training (export, gen_trt_engine,
quantize, evaluate_quantized) are marked success instead of run, to keep the test short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import fake_context, make_dataset, tiny_overrides

pytestmark = pytest.mark.slow

DAG_ID = "mask2former_pipeline"
NOT_ABOUT_TRAINING = r"^(export|gen_trt_engine|quantize|evaluate_quantized)$"
#: A search space the tiny model can afford: sizes stay at the 64 px of the data, widths small.
SMALL_SPACE = {
    "model.mask_former.hidden_dim": {"valid_min": 16, "valid_max": 48},
    "model.mask_former.num_object_queries": {"valid_min": 6, "valid_max": 12},
    "model.mask_former.dec_layers": {"valid_min": 2, "valid_max": 3},
    "train.optim.lr": {"valid_min": 1e-4, "valid_max": 3e-3},
}
FIXED_SIZES = ["dataset.augmentation.train_max_size", "dataset.augmentation.test_min_size",
               "dataset.augmentation.test_max_size"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("automl-data"), images=6, val_images=4)


@pytest.fixture(scope="module")
def pipeline(airflow_db):
    from airflow.dag_processing.dagbag import BundleDagBag

    from helpers import REPO

    bag = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags")
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def run_conf(dataset: Path, results: Path, **extra):
    conf = {"train_datasets": str(dataset / "train"), "eval_dataset": str(dataset / "val"),
            "dataset_format": "coco_panoptic", "results_root": str(results), "model.sem_seg_head.num_classes": 13,
            "spec_overrides": tiny_overrides(**{"dataset.val.batch_size": 2}), "train.num_epochs": 1}
    conf.update(extra)
    return conf


def task_states(dag_run):
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def xcom(dag_run, task_id, key="return_value", map_index=-1):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id,
                                                 key=key, map_index=map_index).one()
        value = row.value
    return json.loads(value) if isinstance(value, str) else value


def test_auto_policy_searches_over_two_mapped_slots_and_evaluate_takes_the_best(pipeline, dataset, tmp_path):
    results = tmp_path / "results"
    conf = run_conf(dataset, results, automl_policy="auto", automl_algorithm="random",
                    automl_max_recommendations=4, automl_max_epochs=1, automl_remove_parameters=FIXED_SIZES,
                    automl_custom_ranges=SMALL_SPACE, automl_cleanup_non_best=True)
    dag_run = pipeline.test(run_conf=conf, mark_success_pattern=NOT_ABOUT_TRAINING)
    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert states[("training.direct_train", -1)] == "skipped"
    assert states[("training.automl_trials", 0)] == states[("training.automl_trials", 1)] == "success"

    plan = xcom(dag_run, "training.automl_plan")
    search_dir = Path(plan["publish_uri"])
    table = json.loads((search_dir / "trials.json").read_text())
    assert len(table) == 4
    assert sorted(r["slot"] for r in table) == [0, 0, 1, 1]  # the budget split over both mapped slots
    assert (search_dir / "trials.csv").is_file() and (search_dir / "metric_per_trial.png").stat().st_size > 0
    for slot in (0, 1):
        assert len(xcom(dag_run, "training.automl_trials", map_index=slot)["trials"]) == 2
    for row in table:  # every sampled value honours the custom ranges and the size parameters stayed fixed
        assert 16 <= row["param.model.mask_former.hidden_dim"] <= 48
        assert row["param.model.mask_former.hidden_dim"] % 8 == 0
        assert 1e-4 <= row["param.train.optim.lr"] <= 3e-3
        assert not any(k.startswith("param.dataset.augmentation") for k in row)

    complete = [r for r in table if r["state"] == "COMPLETE"]
    assert complete, table
    best = max(complete, key=lambda r: r["value"])
    train = xcom(dag_run, "train")
    assert set(train) >= {"action", "job_id", "results_dir", "status", "metrics", "artifacts", "automl"}
    assert train["action"] == "train" and train["status"] == "SUCCESS"
    assert Path(train["results_dir"]) == Path(best["results_dir"])
    assert train["automl"]["used"] is True and train["automl"]["best_trial"] == best["number"]
    assert train["automl"]["best_value"] == pytest.approx(best["value"])
    best_checkpoint = train["artifacts"]["best_checkpoint"]
    assert Path(best_checkpoint).parent == Path(best["results_dir"]) and Path(best_checkpoint).is_file()

    for row in table:  # automl_cleanup_non_best: only the chosen trial keeps checkpoints
        assert bool(list(Path(row["results_dir"]).glob("*.pth"))) is (row["number"] == best["number"])

    evaluate = xcom(dag_run, "evaluate")
    assert evaluate["status"] == "SUCCESS"
    spec = yaml.safe_load((Path(evaluate["results_dir"]) / "experiment.yaml").read_text())
    assert Path(spec["evaluate"]["checkpoint"]) == Path(best_checkpoint)


def test_policy_off_trains_directly(pipeline, dataset, tmp_path):
    results = tmp_path / "results"
    skill_info = (Path(__file__).resolve().parents[2] / "specs" / "skill_info.yaml").read_bytes()
    dag_run = pipeline.test(run_conf=run_conf(dataset, results, automl_policy="off"),
                            mark_success_pattern=NOT_ABOUT_TRAINING + r"|^evaluate$")
    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert states[("training.direct_train", -1)] == "success"
    assert states[("training.automl_plan", -1)] == "skipped"
    assert states[("training.automl_select", -1)] == "skipped"
    train = xcom(dag_run, "train")
    assert train["automl"] == {"policy": "off", "policy_source": "run", "used": False, "runnable": True,
                               "reason": "AutoML is off (this run's override): training directly."}
    assert "training.direct_train" in train["job_id"] and train["status"] == "SUCCESS"
    assert Path(train["artifacts"]["checkpoint"]).is_file()
    # the per-run override never touches the model's metadata file
    assert (Path(__file__).resolve().parents[2] / "specs" / "skill_info.yaml").read_bytes() == skill_info


def recording_launcher():
    """Stands in for the train job process (real direct training is covered by test_policy_off_trains_directly):
    records the job it is handed and leaves a finished train folder."""
    from operators import LocalProcessLauncher

    class RecordingLauncher(LocalProcessLauncher):
        requests = []

        def run(self, job, env, log):
            self.requests.append(job)
            folder = Path(job.local_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model_latest.pth").write_bytes(b"weights")
            (folder / "status.json").write_text(json.dumps({"status": "SUCCESS", "message": "trained"}) + "\n")
            return 0

    return RecordingLauncher()


def test_missing_train_schema_trains_directly_and_reports_why(airflow_db, dataset, tmp_path):
    """The one-task AutoML operator with a schemas root that has skill_info but no train schema/template."""
    from operators import Mask2FormerAutoMLOperator

    root = tmp_path / "generated"
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "skill_info.yaml").write_text("automl_enabled: true\nautoml_policy: auto\n")
    launcher = recording_launcher()
    op = Mask2FormerAutoMLOperator(task_id="automl_train", schemas_root=str(root), max_recommendations=4,
                                   train_datasets=str(dataset / "train"), eval_dataset=str(dataset / "val"),
                                   dataset_format="coco_panoptic", results_root=str(tmp_path / "results"),
                                   launcher=launcher, spec_overrides=tiny_overrides(**{"train.num_epochs": 1}))
    outcome = op.execute(fake_context(task_id="automl_train"))
    automl = outcome["automl"]
    assert automl["policy"] == "auto" and automl["used"] is False and automl["runnable"] is False
    assert "not runnable until the schemas are generated" in automl["reason"]
    assert "python -m mask2former schemas" in automl["reason"]
    assert "schemas/train.schema.json" in automl["reason"] and "specs/spec_template_train.yaml" in automl["reason"]
    [request] = launcher.requests  # one plain train job with the user's spec, no search
    assert request.action == "train" and request.overrides["train.num_epochs"] == 1
    assert outcome["action"] == "train" and outcome["status"] == "SUCCESS"
    folder = Path(outcome["results_dir"])
    assert not (folder / "automl_plan.json").exists() and not (folder / "trials").exists()
    assert Path(outcome["artifacts"]["checkpoint"]).is_file()


def test_one_task_operator_searches_with_parallel_local_workers(airflow_db, dataset, tmp_path):
    """Mask2FormerAutoMLOperator: the whole search in one task, two trials at once, the best in the train shape."""
    from operators import Mask2FormerAutoMLOperator

    op = Mask2FormerAutoMLOperator(task_id="automl_train", max_recommendations=2, max_epochs=1, parallel_trials=2,
                                   algorithm="random", remove_parameters=FIXED_SIZES, custom_ranges=SMALL_SPACE,
                                   cleanup_non_best=True, train_datasets=str(dataset / "train"),
                                   eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                   results_root=str(tmp_path / "results"),
                                   spec_overrides=tiny_overrides(**{"model.sem_seg_head.num_classes": 13}))
    outcome = op.execute(fake_context(task_id="automl_train"))
    search = Path(outcome["automl"]["search_dir"])
    table = json.loads((search / "trials.json").read_text())
    assert sorted(r["slot"] for r in table) == [0, 1] and all(r["state"] == "COMPLETE" for r in table)
    best = max(table, key=lambda r: r["value"])
    assert outcome["automl"]["used"] is True and outcome["automl"]["best_trial"] == best["number"]
    assert Path(outcome["results_dir"]) == search / "trials" / f"trial_{best['number']:03d}"
    assert outcome["job_id"].endswith(f"automl_train/trials/trial_{best['number']:03d}")
    assert Path(outcome["artifacts"]["best_checkpoint"]).is_file()
    assert (search / "_FINISHED").is_file()
    other = next(r for r in table if r["number"] != best["number"])
    assert not list(Path(other["results_dir"]).glob("*.pth"))  # cleanup_non_best
