"""mask2former_retrain: retrain weekly and whenever new training data lands; promote only a better model.

Schedule: every Monday 03:00 UTC (CronTriggerTimetable) OR an update of the asset
``mask2former_training_data`` (set ``outlets=[TRAINING_DATA]`` on the task that lands new data).
Which partition a run trains on follows how it was made (mask2former_partitions): a scheduled or backfill
run the one of its logical date, and is skipped ("no new data for 2026-11-30") when it does not exist; a
manual run (UI form or REST API) the ``partition`` param, else the newest; an asset-triggered run the one
its partition key or triggering asset event names (``partition`` in the event's extra), else the newest.
The choice and its reason are logged and pushed as the XCom ``partition_choice``. Job folders are keyed by run_id, so backfills
(``airflow backfill create --dag-id mask2former_retrain --from-date A --to-date B``) retrain each
partition into its own folders.

Champion/challenger: the new model is evaluated on ``eval_dataset``; the champion (``champion.json`` in
the results root) is re-evaluated on that set when it was scored on another one. Only a strictly
higher mIoU promotes the challenger: export, TensorRT engine (GPU queue with GPU workers;
skipped without a GPU)
and a new champion.json. The decision, with both numbers, is logged and returned by ``decide``.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule, get_current_context, task

from mask2former_automl import MODEL_ASSET
from mask2former_params import MACROS, retrain_params
from operators import (Mask2FormerEvaluateOperator, Mask2FormerExportOperator, Mask2FormerGenTrtEngineOperator,
                       Mask2FormerTrainOperator)

DATA_ROOT = os.environ.get("MASK2FORMER_DATA_ROOT", "s3://mask2former/retrain")
EVAL_DATASET = os.environ.get("MASK2FORMER_EVAL_DATASET", f"{DATA_ROOT.rstrip('/')}/eval")
TRAINING_DATA = Asset(name="mask2former_training_data", uri=f"{DATA_ROOT.rstrip('/')}/")
AWS_CONN_ID = "aws_default"

COMMON = {
    "spec_overrides": "{{ mask2former_overrides(params) }}",
    "eval_dataset": "{{ params.eval_dataset }}",
    "dataset_format": "{{ params.dataset_format }}",
    "results_root": "{{ params.results_root }}",
    "aws_conn_id": AWS_CONN_ID,
}


def _storage():
    from operators import Mask2FormerStorageHook

    return Mask2FormerStorageHook(aws_conn_id=AWS_CONN_ID)


def _results_root(params) -> str:
    from operators.utils.jobs import default_results_root

    return params.get("results_root") or default_results_root()


with DAG(
    dag_id="mask2former_retrain",
    description="Weekly and data-triggered Mask2Former retraining with champion/challenger promotion.",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=[TRAINING_DATA]),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=retrain_params(data_root_default=DATA_ROOT, eval_default=EVAL_DATASET),
    user_defined_macros=MACROS,
    render_template_as_native_obj=True,
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["mask2former"],
    doc_md=__doc__,
) as dag:

    @task
    def select_partition() -> str:
        """The training partition of this run, chosen by its run type (see mask2former_partitions); the choice
        and its reason go to the log and to the XCom ``partition_choice``. A scheduled or backfill run whose
        partition does not exist is skipped: no new data."""
        from airflow.sdk.exceptions import AirflowSkipException

        from mask2former_partitions import NoNewData, choose_partition

        context = get_current_context()
        dag_run = context["dag_run"]
        try:
            choice = choose_partition(
                context["params"]["data_root"], _storage(), run_type=dag_run.run_type,
                logical_date=context.get("logical_date"), requested=context["params"].get("partition"),
                partition_key=context.get("partition_key"),
                asset_events=[event for events in context["triggering_asset_events"].values() for event in events])
        except NoNewData as exc:
            print(f"skipped: {exc}")
            raise AirflowSkipException(str(exc)) from None
        print(f"training on {choice.uri}: {choice.reason}")
        context["ti"].xcom_push(key="partition_choice", value=choice.as_dict())
        return choice.uri

    @task
    def read_champion():
        """The current champion's record, or None."""
        from mask2former_champion import read_champion as read

        record = read(_results_root(get_current_context()["params"]), _storage())
        print("champion: " + (f"{record['metric']} {record['value']} on {record['eval_dataset']} (run {record['run_id']})"
                              if record else "none yet"))
        return record

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def champion_needs_evaluation(champion) -> bool:
        """True when the champion was scored on another evaluation set than this run's."""
        from mask2former_champion import needs_evaluation

        return needs_evaluation(champion, get_current_context()["params"]["eval_dataset"])

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def decide(challenger, champion) -> dict:
        """Compare the challenger's mIoU with the champion's on the same evaluation set."""
        from airflow.sdk.exceptions import AirflowSkipException

        from mask2former_champion import decide as compare, metric_of

        if challenger is None:  # select_partition skipped the run (no new data): nothing to compare
            raise AirflowSkipException("no challenger was trained in this run (see select_partition)")
        context = get_current_context()
        rescored = context["ti"].xcom_pull(task_ids="evaluate_champion")
        champion_value = metric_of(rescored) if rescored else (champion or {}).get("value")
        decision = compare(challenger=metric_of(challenger), champion=champion_value,
                           eval_dataset=context["params"]["eval_dataset"])
        print(f"decision: {decision['decision']} ({decision['reason']}); challenger {decision['challenger']}, "
              f"champion {decision['champion']}")
        return decision

    @task.short_circuit
    def should_promote(decision) -> bool:
        return decision["decision"] == "promote"

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, outlets=[MODEL_ASSET])
    def write_champion(partition, trained, evaluation, decision, exported) -> str:
        """Record the promoted model as the champion (after its export and engine); the ``mask2former_model``
        Asset event carries the promoted model (engine, else ONNX), its metrics and this run."""
        from mask2former_champion import champion_record, write_champion as write
        from operators.utils.outcome import model_event_extra

        context = get_current_context()
        record = champion_record(dag_id=context["dag"].dag_id, run_id=context["run_id"], partition=partition,
                                 eval_dataset=decision["eval_dataset"], value=decision["challenger"],
                                 train=trained, evaluation=evaluation, export=exported,
                                 engine=context["ti"].xcom_pull(task_ids="gen_trt_engine"))
        uri = write(_results_root(context["params"]), record, _storage())
        print(f"new champion written to {uri}: mIoU {record['value']}")
        engine = record["engine"] or {}
        model = {**trained, "artifacts": {**trained.get("artifacts", {}), **(exported or {}).get("artifacts", {}),
                                          **engine.get("artifacts", {})},
                 "metrics": {**(evaluation.get("metrics") or {})}}
        context["outlet_events"][MODEL_ASSET].extra = {
            **model_event_extra(model, dag_id=context["dag"].dag_id, run_id=context["run_id"],
                                task_id="write_champion", reason=decision["reason"]),
            "champion": uri, "data_partition": partition}
        return uri

    partition = select_partition()
    train = Mask2FormerTrainOperator(task_id="train", train_datasets=partition, **COMMON)
    evaluate = Mask2FormerEvaluateOperator(task_id="evaluate", train_datasets=partition, parent=train.output,
                                           **COMMON)
    champion = read_champion()
    evaluate_champion = Mask2FormerEvaluateOperator(
        task_id="evaluate_champion", train_datasets=partition,
        parent="{{ ti.xcom_pull(task_ids='read_champion')['train'] }}", **COMMON)
    decision = decide(evaluate.output, champion)
    export = Mask2FormerExportOperator(task_id="export", parent=train.output, **COMMON)
    gen_trt_engine = Mask2FormerGenTrtEngineOperator(task_id="gen_trt_engine", parent=export.output, **COMMON)
    recorded = write_champion(partition, train.output, evaluate.output, decision, export.output)

    champion >> champion_needs_evaluation(champion) >> evaluate_champion >> decision
    decision >> should_promote(decision) >> export >> gen_trt_engine >> recorded
