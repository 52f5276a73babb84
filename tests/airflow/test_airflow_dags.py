"""The DAG files: they import without errors, parse without torch or TensorRT, have the intended shape,
and their trigger forms are generated from the spec schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO

DAGS = REPO / "dags"


def dag_bag(folder: Path):
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(folder), bundle_path=folder)


@pytest.fixture(scope="module")
def bag():
    return dag_bag(DAGS)


def test_dagbag_imports_both_dags_without_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"mask2former_pipeline", "mask2former_retrain"}


def test_parsing_imports_neither_torch_nor_tensorrt():
    """A fresh interpreter parses the DAG folder; torch and tensorrt stay out of sys.modules."""
    probe = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from airflow.dag_processing.dagbag import BundleDagBag
        bag = BundleDagBag(dag_folder={str(DAGS)!r}, bundle_path=Path({str(DAGS)!r}))
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt', 'pytorch_lightning',
                                                                       'lightning', 'onnxruntime'))
        print(json.dumps({{"dags": sorted(bag.dag_ids), "errors": bag.import_errors, "heavy": heavy}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert report["dags"] == ["mask2former_pipeline", "mask2former_retrain"]
    assert report["heavy"] == []


def test_pipeline_shape(bag):
    """train (the training stage's result) -> evaluate -> export -> gen_trt_engine; train -> quantize -> evaluate."""
    dag = bag.dags["mask2former_pipeline"]
    up = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert up["evaluate"] == ["train"] and up["export"] == ["evaluate", "train"]
    assert up["gen_trt_engine"] == ["export"]
    assert up["quantize"] == ["train"] and up["evaluate_quantized"] == ["quantize"]
    assert dag.get_task("gen_trt_engine").queue == "gpu"
    assert dag.schedule is None


def test_retrain_schedule_is_weekly_or_new_data(bag):
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    dag = bag.dags["mask2former_retrain"]
    schedule = dag.schedule
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert isinstance(schedule.timetable, CronTriggerTimetable)
    assert schedule.timetable.expression == "0 3 * * 1"
    assert "mask2former_training_data" in repr(schedule.asset_condition)
    assert dag.max_active_runs == 1
    promote_chain = dag.get_task("should_promote").downstream_task_ids
    assert promote_chain == {"export"}
    assert dag.get_task("gen_trt_engine").queue == "gpu"
    assert str(dag.get_task("write_champion").trigger_rule) in ("none_failed", "TriggerRule.NONE_FAILED")


def test_trigger_form_mirrors_the_schemas(bag):
    schema = json.loads((REPO / "schemas" / "train.schema.json").read_text())

    def leaf(dotted):
        node = schema
        for part in dotted.split("."):
            node = node["properties"][part]
        return node

    params = bag.dags["mask2former_pipeline"].params
    expected = {"mode": "model.mode", "backbone": "model.backbone.swin.type",
                "backbone_type": "model.backbone.type", "efficientvit_name": "model.backbone.efficientvit.name",
                "num_classes": "model.sem_seg_head.num_classes", "num_epochs": "train.num_epochs",
                "learning_rate": "train.optim.lr"}
    for name, key in expected.items():
        spec, param = leaf(key), params.get_param(name)
        assert param.value == spec["default"], name
        for keyword in ("type", "enum", "minimum", "maximum", "exclusiveMinimum"):
            assert param.schema.get(keyword) == spec.get(keyword), (name, keyword)
    assert params.get_param("dataset_format").schema["enum"] == ["coco", "coco_panoptic"]
    assert params.get_param("spec_overrides").schema["type"] == "object"
    with pytest.raises(Exception, match="num_epochs|minimum|0"):
        params.get_param("num_epochs").resolve(0)


def test_spec_overrides_macro_merges_form_fields_and_free_keys():
    from mask2former_params import spec_overrides_from_params

    merged = spec_overrides_from_params({"mode": "semantic", "num_epochs": 3, "learning_rate": None,
                                         "spec_overrides": {"train.num_epochs": 5, "export.opset_version": 18}})
    assert merged == {"model.mode": "semantic", "train.num_epochs": 5, "export.opset_version": 18}


def test_bad_literal_override_is_an_import_error_naming_the_key(tmp_path):
    (tmp_path / "bad_dag.py").write_text(textwrap.dedent("""
        import pendulum
        from airflow.sdk import DAG
        from operators import Mask2FormerTrainOperator

        with DAG(dag_id="bad_override", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")):
            Mask2FormerTrainOperator(task_id="train", spec_overrides={"train.optim.lrr": 0.1})
    """))
    bag = dag_bag(tmp_path)
    assert "bad_override" not in bag.dag_ids
    (error,) = bag.import_errors.values()
    assert "train.optim.lrr" in error and "train.optim.lr" in error


def test_retrain_scores_the_champion_from_its_recorded_training_job(bag):
    """evaluate_champion's parent renders (natively) to the champion record's train XCom dict."""
    from types import SimpleNamespace

    dag = bag.dags["mask2former_retrain"]
    task = dag.get_task("evaluate_champion")
    record = {"train": {"action": "train", "results_dir": "/results/d/r/train", "artifacts": {}}, "value": 1.0}
    ti = SimpleNamespace(xcom_pull=lambda task_ids: record if task_ids == "read_champion" else None)
    rendered = task.render_template(task.parent, {"ti": ti}, jinja_env=dag.get_template_env(force_sandboxed=False))
    assert rendered == record["train"]
    assert str(dag.get_task("decide").trigger_rule) in ("none_failed", "TriggerRule.NONE_FAILED")
    assert dag.get_task("champion_needs_evaluation").downstream_task_ids == {"evaluate_champion"}
