"""The AutoML training stage of a pipeline as a task group, and its trigger-form params (a DAG helper, not a DAG)::

      training.policy ─► training.automl_plan ─► training.automl_trials[0..W-1] ─► training.automl_select ─┐
            └────────► training.direct_train ──────────────────────────────────────────────────────┴─► train

``policy`` branches on the AutoML policy (``automl_policy`` of specs/skill_info.yaml, overridden per run by
the DAG param; off, or schemas not generated: direct training, with the reason in the log and the XCom).
The plan, trials and select roles are the operators of ``operators/operators/automl.py``; the trials are
mapped over worker slots in a pool that caps the GPUs. The join task (``train``) returns the TRAIN XCom
shape plus an ``automl`` block, so evaluate/export downstream take the chosen model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from airflow.sdk import Asset, Param, TaskGroup

from mask2former.automl import policy as policy_lib
from operators.operators.actions import Mask2FormerTrainOperator
from operators.utils.gpu import gpu_routing
from operators.utils.outcome import MODEL_ASSET_NAME
from operators.operators.automl import (ALGORITHMS, Mask2FormerAutoMLPlanOperator, Mask2FormerAutoMLPolicyOperator,
                                        Mask2FormerAutoMLResultOperator, Mask2FormerAutoMLSelectOperator,
                                        Mask2FormerAutoMLTrialsOperator)

DEFAULT_POOL = "mask2former_gpu"
#: Updated by the pipeline's training stage and the retrain's promotion (event extra: model_event_extra).
MODEL_ASSET = Asset(name=MODEL_ASSET_NAME)
_KEY_SOURCES = ("encryption_key_conn_id", "encryption_key_variable")


@dataclass
class AutoMLTraining:
    """The tasks :func:`automl_training` created; ``output`` is the training stage's XCom (TRAIN shape)."""

    group: TaskGroup
    policy: Mask2FormerAutoMLPolicyOperator
    direct_train: Mask2FormerTrainOperator
    plan: Mask2FormerAutoMLPlanOperator
    trials: Any
    select: Mask2FormerAutoMLSelectOperator
    result: Mask2FormerAutoMLResultOperator

    @property
    def output(self) -> Any:
        return self.result.output


def automl_training(*, group_id: str = "training", result_task_id: str = "train", worker_slots: int = 2,
                    pool: Optional[str] = DEFAULT_POOL, automl: Optional[Dict[str, Any]] = None,
                    aws_conn_id: str = "aws_default", outlets: Optional[list] = None,
                    **job_kwargs: Any) -> AutoMLTraining:
    """The training stage: AutoML search or direct training, chosen per run (see the module docstring).

    ``automl`` holds the plan operator's AutoML settings (automl_policy, algorithm, max_recommendations, ...);
    ``job_kwargs`` the arguments every Mask2Former operator takes (spec_overrides, train_datasets, ...).
    ``outlets`` (e.g. ``[MODEL_ASSET]``) get an Asset event from the result task with the model in its extra.
    ``worker_slots`` trials run in parallel, as mapped tasks in ``pool`` (create it with as many slots as
    GPUs: ``airflow pools set mask2former_gpu 2 "GPUs for training"``; a pool that does not exist runs nothing).
    On a deployment with GPU workers the trials, like every GPU stage, take the GPU queue and pool
    (:func:`operators.utils.gpu.gpu_routing`).
    """
    if worker_slots < 1:
        raise ValueError(f"worker_slots must be >= 1, got {worker_slots}")
    automl = dict(automl or {})
    with TaskGroup(group_id=group_id, tooltip="AutoML search or direct training") as group:
        direct = Mask2FormerTrainOperator(task_id="direct_train", aws_conn_id=aws_conn_id, **job_kwargs)
        plan = Mask2FormerAutoMLPlanOperator(task_id="automl_plan", worker_slots=worker_slots, aws_conn_id=aws_conn_id,
                                             **automl, **job_kwargs)
        policy = Mask2FormerAutoMLPolicyOperator(task_id="policy", automl_policy=automl.get("automl_policy"),
                                                 schemas_root=automl.get("schemas_root"),
                                                 automl_task_id=plan.task_id, direct_task_id=direct.task_id)
        trials = Mask2FormerAutoMLTrialsOperator.partial(
            task_id="automl_trials", plan=plan.output, aws_conn_id=aws_conn_id,
            **{k: job_kwargs[k] for k in _KEY_SOURCES if k in job_kwargs},
            **{**({"pool": pool} if pool else {}), **gpu_routing().task_arguments()},
        ).expand(slot=list(range(worker_slots)))
        select = Mask2FormerAutoMLSelectOperator(task_id="automl_select", plan=plan.output, aws_conn_id=aws_conn_id)
        policy >> [plan, direct]
        trials >> select
    result = Mask2FormerAutoMLResultOperator(task_id=result_task_id, policy_task_id=policy.task_id,
                                             select_task_id=select.task_id, direct_task_id=direct.task_id,
                                             outlets=list(outlets or []))
    [select, direct] >> result
    return AutoMLTraining(group=group, policy=policy, direct_train=direct, plan=plan, trials=trials, select=select,
                          result=result)


def automl_params(*, schemas_root: Optional[str] = None) -> Dict[str, Param]:
    """Trigger-form params of the AutoML training stage (section "AutoML").

    ``automl_policy`` defaults to the model's policy (specs/skill_info.yaml); choosing another value
    changes this run only.
    """
    try:
        info = policy_lib.read_skill_info(schemas_root) or {}
        default_policy = policy_lib.check_policy(info.get("automl_policy", policy_lib.DEFAULT_POLICY),
                                                 where=policy_lib.SKILL_INFO_FILE)
    except policy_lib.AutoMLConfigError:
        default_policy = policy_lib.DEFAULT_POLICY  # the first task reports the broken file
    section = "AutoML"
    return {
        "automl_policy": Param(default_policy, type="string", enum=list(policy_lib.POLICIES), section=section,
                               title="AutoML policy",
                               description="auto: train through a hyper-parameter search (when the schemas are "
                                           "generated); off: train once with the given spec. This run only."),
        "automl_algorithm": Param("bayesian", type="string", enum=list(ALGORITHMS), section=section,
                                  title="Search algorithm",
                                  description="bayesian (TPE), hyperband (TPE + early stopping on epochs) or random."),
        "automl_max_recommendations": Param(8, type="integer", minimum=1, maximum=500, section=section,
                                            title="Trials", description="Number of trials of the search."),
        "automl_max_epochs": Param(10, type="integer", minimum=1, section=section, title="Epochs per trial",
                                   description="Training epochs of each trial (replaces train.num_epochs)."),
        "automl_reduction_factor": Param(3, type="integer", minimum=2, section=section,
                                         title="Hyperband reduction factor",
                                         description="Hyperband keeps 1/reduction_factor of the trials per rung."),
        "automl_remove_parameters": Param([], type="array", items={"type": "string"}, section=section,
                                          title="Parameters left out",
                                          description="Default search keys to keep at the spec's value."),
        "automl_cleanup_non_best": Param(False, type="boolean", section=section, title="Remove other trials' "
                                                                                     "checkpoints",
                                         description="Delete the checkpoints of every trial but the chosen one."),
        "automl_custom_ranges": Param({}, type="object", section=section, title="Custom ranges",
                                      description="Dotted train key -> {valid_min, valid_max} or {valid_options, "
                                                  "option_weights}, optional math_cond ('/ 8', '^ 2') and log_scale; "
                                                  "a key not searched by default is added."),
    }


#: The plan operator's AutoML settings wired to :func:`automl_params` (render_template_as_native_obj DAGs).
AUTOML_PARAM_ARGS = {
    "automl_policy": "{{ params.automl_policy }}",
    "algorithm": "{{ params.automl_algorithm }}",
    "max_recommendations": "{{ params.automl_max_recommendations }}",
    "max_epochs": "{{ params.automl_max_epochs }}",
    "reduction_factor": "{{ params.automl_reduction_factor }}",
    "remove_parameters": "{{ params.automl_remove_parameters }}",
    "custom_ranges": "{{ params.automl_custom_ranges }}",
    "cleanup_non_best": "{{ params.automl_cleanup_non_best }}",
}
