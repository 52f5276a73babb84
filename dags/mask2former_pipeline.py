"""mask2former_pipeline: train -> evaluate -> export -> gen_trt_engine, and quantize -> evaluate (quantized).

Triggered by hand or through the REST API with the form's params (generated from the spec schemas).
Every task runs one engine action as a subprocess of its worker. The stages that want a GPU (training,
AutoML trials, evaluate, quantize, gen_trt_engine) go to the GPU queue and pool when the deployment has GPU
workers (``MASK2FORMER_GPU_WORKERS=true``; operators/utils/gpu.py), to the default queue otherwise;
gen_trt_engine is skipped, with its reason, on a worker without a CUDA GPU.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from mask2former_automl import AUTOML_PARAM_ARGS, DEFAULT_POOL, MODEL_ASSET, automl_params, automl_training
from mask2former_params import MACROS, pipeline_params
from operators import (Mask2FormerEvaluateOperator, Mask2FormerExportOperator, Mask2FormerGenTrtEngineOperator,
                       Mask2FormerQuantizeOperator)

COMMON = {
    "spec_overrides": "{{ mask2former_overrides(params) }}",
    "train_datasets": "{{ params.train_datasets }}",
    "eval_dataset": "{{ params.eval_dataset }}",
    "dataset_format": "{{ params.dataset_format }}",
    "results_root": "{{ params.results_root }}",
}

with DAG(
    dag_id="mask2former_pipeline",
    description="Train, evaluate, export, build a TensorRT engine and quantize a Mask2Former model.",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    params={**pipeline_params(), **automl_params()},
    user_defined_macros=MACROS,
    render_template_as_native_obj=True,
    max_active_runs=4,
    # A retried task (killed worker, lost node) reuses its job folder: train resumes from its last checkpoint.
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=10)},
    tags=["mask2former"],
    doc_md=__doc__,
) as dag:
    # AutoML (mask2former_automl.py): when params.automl_policy is auto, training goes through a hyper-parameter
    # search whose trials run as mapped tasks in the mask2former_gpu pool; the `train` task returns the chosen
    # model (or the direct training's) in the train XCom shape, so the tasks below take it unchanged.
    train = automl_training(group_id="training", result_task_id="train", worker_slots=2, pool=DEFAULT_POOL,
                            automl=AUTOML_PARAM_ARGS, outlets=[MODEL_ASSET], **COMMON)
    evaluate = Mask2FormerEvaluateOperator(task_id="evaluate", parent=train.output, **COMMON)
    export = Mask2FormerExportOperator(task_id="export", parent=train.output, **COMMON)
    gen_trt_engine = Mask2FormerGenTrtEngineOperator(task_id="gen_trt_engine", parent=export.output, **COMMON)
    quantize = Mask2FormerQuantizeOperator(task_id="quantize", parent=train.output, **COMMON)
    evaluate_quantized = Mask2FormerEvaluateOperator(task_id="evaluate_quantized", parent=quantize.output,
                                                     **COMMON)

    evaluate >> export
