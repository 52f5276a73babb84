"""Trigger-form Params of the Mask2Former DAGs, generated from the engine's action schemas.

Each spec field of the form takes its type, default, bounds, enum and description from
:func:`mask2former.config.schema.action_schema` (the same source that writes schemas/*.schema.json),
so the form can never drift from the spec. ``spec_overrides`` takes any other key (flat dotted keys,
validated by the first task before any data is staged). Not a DAG file (see .airflowignore).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from airflow.sdk import Param

from mask2former.config.schema import action_schema, iter_leaves
from mask2former.data.sources import DATASET_FORMATS

#: JSON Schema keywords copied from a spec leaf into its Param.
_SCHEMA_KEYWORDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "multipleOf", "minItems",
                    "maxItems", "items")

#: Form field -> (action whose schema holds the key, dotted spec key, form section, title).
SPEC_PARAMS: Dict[str, tuple] = {
    "mode": ("train", "model.mode", "Model", "Segmentation mode"),
    "backbone_type": ("train", "model.backbone.type", "Model", "Backbone family"),
    "backbone": ("train", "model.backbone.swin.type", "Model", "Swin variant (backbone family swin)"),
    "efficientvit_name": ("train", "model.backbone.efficientvit.name", "Model",
                          "EfficientViT variant (backbone family efficientvit)"),
    "num_classes": ("train", "model.sem_seg_head.num_classes", "Model", "Number of classes"),
    "num_epochs": ("train", "train.num_epochs", "Training", "Epochs"),
    "learning_rate": ("train", "train.optim.lr", "Training", "Learning rate"),
}


def _leaf(action: str, key: str) -> Dict[str, Any]:
    leaves = dict(iter_leaves(action_schema(action)))
    if key not in leaves:
        raise KeyError(f"spec key {key!r} is not in the {action} schema")
    return leaves[key]


def spec_param(action: str, key: str, *, section: str, title: str) -> Param:
    """A Param mirroring one spec leaf (default, type, bounds, enum, description)."""
    leaf = _leaf(action, key)
    schema = {k: leaf[k] for k in _SCHEMA_KEYWORDS if k in leaf}
    description = f"{leaf.get('description', '')} (spec key {key})".strip()
    return Param(leaf.get("default"), title=title, description=description, section=section, **schema)


def dataset_params(*, train_default: Any = None, eval_default: Any = None) -> Dict[str, Param]:
    fmt = _leaf("train", "dataset.train.type")
    roots = "images.tar.gz, annotations.json / annotations_panoptic.json + images_panoptic.tar.gz, label_map*.json"
    return {
        "train_datasets": Param(train_default, type="string", minLength=1, title="Training dataset root",
                                description=f"s3://bucket/prefix, file:///path or a path holding {roots}.",
                                section="Data"),
        "eval_dataset": Param(eval_default, type=["null", "string"], title="Evaluation dataset root",
                              description="Root of the validation split (same layout); empty: no validation.",
                              section="Data"),
        "dataset_format": Param(fmt["default"], type="string", enum=list(DATASET_FORMATS), title="Dataset format",
                                description=fmt.get("description", ""), section="Data"),
    }


def common_params() -> Dict[str, Param]:
    params = {name: spec_param(action, key, section=section, title=title)
              for name, (action, key, section, title) in SPEC_PARAMS.items()}
    params["spec_overrides"] = Param(
        {}, type="object", title="Other spec keys",
        description="Any other spec key as a flat dotted mapping, e.g. {\"model.mask_former.num_object_queries\": "
                    "50, \"export.opset_version\": 17}; checked against the schemas before any data is staged.",
        section="Advanced")
    params["results_root"] = Param(
        None, type=["null", "string"], title="Results root",
        description="Where job folders are published (path or s3://); empty: the deployment default "
                    "(Variable mask2former_results_root or env MASK2FORMER_RESULTS_ROOT).", section="Advanced")
    return params


def pipeline_params() -> Dict[str, Param]:
    return {**dataset_params(), **common_params()}


def retrain_params(*, data_root_default: str, eval_default: Any) -> Dict[str, Param]:
    params = {
        "data_root": Param(data_root_default, type="string", minLength=1, title="Data root",
                           description="Root of the dated training partitions (<data_root>/<YYYY-MM-DD>/...). A run "
                                       "with a logical date trains on its partition; a run without one (asset "
                                       "event, manual) on the newest.", section="Data"),
    }
    data = dataset_params(eval_default=eval_default)
    params["eval_dataset"] = data["eval_dataset"]
    params["dataset_format"] = data["dataset_format"]
    return {**params, **common_params()}


def spec_overrides_from_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The dotted overrides of a run: the form's spec fields, then ``spec_overrides`` (which wins)."""
    overrides = {key: params[name] for name, (_, key, _, _) in SPEC_PARAMS.items()
                 if name in params and params[name] is not None}
    extra = params.get("spec_overrides") or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"params.spec_overrides must be a mapping of dotted keys, got {extra!r}")
    overrides.update(extra)
    return overrides


#: Macros the DAGs register (user_defined_macros).
MACROS = {"mask2former_overrides": spec_overrides_from_params}
