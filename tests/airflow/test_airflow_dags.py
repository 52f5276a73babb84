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


#: The stages that want a GPU, per DAG.
GPU_TASKS = {
    "mask2former_pipeline": {"training.direct_train", "training.automl_trials", "evaluate", "quantize",
                             "evaluate_quantized", "gen_trt_engine"},
    "mask2former_retrain": {"train", "evaluate", "evaluate_champion", "gen_trt_engine"},
}


def test_parsing_imports_neither_torch_nor_tensorrt_and_routes_gpu_stages_to_gpu_workers():
    """A fresh interpreter parses the DAG folder as the dag-processor of a deployment with GPU workers would
    (MASK2FORMER_GPU_WORKERS=true, the queue's name from an Airflow Variable); torch and tensorrt stay out of
    sys.modules; every GPU stage, and only those, is on the GPU queue and pool."""
    probe = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from airflow.dag_processing.dagbag import BundleDagBag
        bag = BundleDagBag(dag_folder={str(DAGS)!r}, bundle_path=Path({str(DAGS)!r}))
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt', 'pytorch_lightning',
                                                                       'lightning', 'onnxruntime'))
        routes = {{d: {{t.task_id: [t.queue, t.pool] for t in dag.tasks}} for d, dag in bag.dags.items()}}
        print(json.dumps({{"dags": sorted(bag.dag_ids), "errors": bag.import_errors, "heavy": heavy,
                          "routes": routes}}))
    """)
    env = {**os.environ, "MASK2FORMER_GPU_WORKERS": "true", "AIRFLOW_VAR_MASK2FORMER_GPU_QUEUE": "cuda"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert report["dags"] == ["mask2former_pipeline", "mask2former_retrain"]
    assert report["heavy"] == []
    for dag_id, wanted in GPU_TASKS.items():
        on_gpu = {task for task, route in report["routes"][dag_id].items() if route == ["cuda", "mask2former_gpu"]}
        assert on_gpu == wanted


def test_without_gpu_workers_every_stage_runs_on_the_default_queue(bag):
    for dag_id in GPU_TASKS:
        dag = bag.dags[dag_id]
        assert {t.queue for t in dag.tasks} == {"default"}
        # AutoML trials keep their pool, which caps the trials running at once
        assert {t.pool for t in dag.tasks if t.task_id != "training.automl_trials"} == {"default_pool"}
    assert bag.dags["mask2former_pipeline"].get_task("training.automl_trials").pool == "mask2former_gpu"


def test_pipeline_shape(bag):
    """train (the training stage's result) -> evaluate -> export -> gen_trt_engine; train -> quantize -> evaluate."""
    dag = bag.dags["mask2former_pipeline"]
    up = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert up["evaluate"] == ["train"] and up["export"] == ["evaluate", "train"]
    assert up["gen_trt_engine"] == ["export"]
    assert up["quantize"] == ["train"] and up["evaluate_quantized"] == ["quantize"]
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
    assert str(dag.get_task("write_champion").trigger_rule).lower().endswith("none_failed_min_one_success")


def test_trigger_form_mirrors_the_schemas(bag):
    """Every popular key of the schema files is a typed Param with its section; the overrides' schema lists
    every other valid key and refuses misspelt keys and wrong types."""
    import jsonschema

    from airflow.sdk.exceptions import ParamValidationError

    schemas = [json.loads(p.read_text()) for p in sorted((REPO / "schemas").glob("*.schema.json"))]

    def leaves(node, prefix=""):
        for name, sub in node.get("properties", {}).items():
            if sub.get("type") == "object" and "properties" in sub:  # a section, not a free-form mapping
                yield from leaves(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", sub

    every = {key: leaf for schema in schemas for key, leaf in leaves(schema)}
    # filled by the DAG from the upstream task's model and the dataset root
    parent_keys = {f"{action}.{key}" for action in ("evaluate", "inference") for key in
                   ("checkpoint", "onnx_file", "trt_engine")}
    parent_keys |= {"export.checkpoint", "quantize.model_path", "gen_trt_engine.onnx_file", "dataset.label_map"}
    popular = {key for key, leaf in every.items() if leaf.get("popular")} - parent_keys
    assert {"train.num_epochs", "train.optim.lr", "model.mode", "dataset.train.batch_size"} <= popular
    for dag_id in ("mask2former_pipeline", "mask2former_retrain"):
        params = bag.dags[dag_id].params
        for key in popular:
            param, spec = params.get_param(key), every[key]
            assert param.value == spec["default"], key
            for keyword in ("type", "enum", "minimum", "maximum", "exclusiveMinimum"):
                assert param.schema.get(keyword) == spec.get(keyword), (key, keyword)
            assert param.schema["section"] == {"model": "Model", "dataset": "Dataset", "train": "Training"}[
                key.split(".")[0]]
        overrides = params.get_param("spec_overrides")
        assert set(overrides.schema["properties"]) == set(every) - parent_keys - {"results_dir", "encryption_key"}
        overrides.resolve({"model.mask_former.dec_layers": 3, "export.opset_version": 17})
        for bad in ({"model.mask_former.num_object_querys": 5}, {"train.num_epochs": "3"}, {"encryption_key": "k"}):
            with pytest.raises(ParamValidationError):
                overrides.resolve(bad)
        jsonschema.Draft202012Validator.check_schema({k: v for k, v in overrides.schema.items()
                                                     if k not in ("section", "title", "description")})
    params = bag.dags["mask2former_pipeline"].params
    assert params.get_param("dataset_format").schema["enum"] == ["coco", "coco_panoptic", "ade"]
    assert params.get_param("automl_policy").schema["section"] == "AutoML"
    with pytest.raises(ParamValidationError, match="train.num_epochs|minimum|0"):
        params.get_param("train.num_epochs").resolve(0)


def test_spec_overrides_macro_merges_form_fields_and_free_keys():
    from mask2former_params import spec_overrides_from_params

    merged = spec_overrides_from_params({"model.mode": "semantic", "train.num_epochs": 3, "train.optim.lr": None,
                                         "model.sem_seg_head.num_classes": 200,  # the default: left to the spec
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
