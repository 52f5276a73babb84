"""Trigger-form Params of the Mask2Former DAGs, generated from the engine's action schemas.

:func:`spec_leaves` reads every action's schema (:func:`mask2former.config.schema.action_schema`, the same
source that writes schemas/*.schema.json); nothing here lists spec keys by hand:

* every key a schema marks ``popular`` becomes a typed Param named by its dotted spec key (type, enum,
  bounds, default and description from the schema; ``section``: its spec section), except the keys the
  DAG fills itself (the job's results folder, the label map of the dataset root, the parent model);
* ``spec_overrides`` takes any other key as a flat dotted mapping; its JSON schema lists every valid key
  with its type and refuses others, so the form and the REST API refuse a misspelt key or a wrong type
  when the run is triggered, before it exists.

Not a DAG file (see .airflowignore).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Mapping

from airflow.sdk import Param

from mask2former.config.schema import action_schema, iter_leaves
from mask2former.data.sources import ACTIONS, DATASET_FORMATS
from operators.utils.parents import TARGET_KEY

#: JSON Schema keywords copied from a spec leaf into a Param or the overrides schema.
_SCHEMA_KEYWORDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "multipleOf", "minItems",
                    "maxItems", "items")
#: Spec keys the DAGs fill themselves: never a form field, never an override.
DERIVED_KEYS = frozenset({"results_dir", "dataset.label_map", *TARGET_KEY.values()})
#: Form section of each spec section.
_SECTION_TITLES = {"model": "Model", "dataset": "Dataset", "train": "Training"}


@lru_cache(maxsize=1)
def spec_leaves() -> Dict[str, Dict[str, Any]]:
    """Every spec key of every action (dotted key -> its leaf schema), in schema order."""
    leaves: Dict[str, Dict[str, Any]] = {}
    for action in ACTIONS:
        for key, leaf in iter_leaves(action_schema(action)):
            leaves.setdefault(key, leaf)
    return leaves


def _typed(leaf: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: leaf[k] for k in _SCHEMA_KEYWORDS if k in leaf}


def form_keys() -> List[str]:
    """The spec keys with a field of their own in the trigger form: the popular ones."""
    return [key for key, leaf in spec_leaves().items()
            if leaf.get("popular") and key not in DERIVED_KEYS and not leaf.get("writeOnly")]


def section_of(key: str) -> str:
    head = key.split(".", 1)[0]
    return _SECTION_TITLES.get(head, head.replace("_", " ").capitalize())


def spec_param(key: str) -> Param:
    """A Param mirroring one spec leaf (default, type, bounds, enum, description, section)."""
    leaf = spec_leaves()[key]
    title = key.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    description = f"{leaf.get('description', '')} (spec key {key})".strip()
    return Param(leaf.get("default"), title=title, description=description, section=section_of(key), **_typed(leaf))


def overrides_schema() -> Dict[str, Any]:
    """The JSON schema of ``spec_overrides``: every valid dotted key with its type, nothing else."""
    properties = {key: {**_typed(leaf), "description": leaf.get("description", "")}
                  for key, leaf in spec_leaves().items()
                  if key not in DERIVED_KEYS and not leaf.get("writeOnly")}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def dataset_params(*, train_default: Any = None, eval_default: Any = None) -> Dict[str, Param]:
    fmt = spec_leaves()["dataset.train.type"]
    roots = "images.tar.gz, annotations.json / annotations_panoptic.json + images_panoptic.tar.gz, label_map*.json"
    section = section_of("dataset")
    return {
        "train_datasets": Param(train_default, type="string", minLength=1, title="Training dataset root",
                                description=f"s3://bucket/prefix, file:///path or a path holding {roots}.",
                                section=section),
        "eval_dataset": Param(eval_default, type=["null", "string"], title="Evaluation dataset root",
                              description="Root of the validation split (same layout); empty: no validation.",
                              section=section),
        "dataset_format": Param(fmt["default"], type="string", enum=list(DATASET_FORMATS), title="Dataset format",
                                description=fmt.get("description", ""), section=section),
    }


def common_params() -> Dict[str, Param]:
    params = {key: spec_param(key) for key in form_keys()}
    params["spec_overrides"] = Param(
        {}, title="Other spec keys",
        description="Any other spec key as a flat dotted mapping, e.g. {\"model.mask_former.dec_layers\": 6, "
                    "\"export.opset_version\": 17}; a key that is not in the schemas, or a value of the wrong "
                    "type, is refused when the run is triggered. Wins over the fields above.",
        section="Advanced", **overrides_schema())
    params["results_root"] = Param(
        None, type=["null", "string"], title="Results root",
        description="Where job folders are published (path or s3://); empty: the deployment default "
                    "(Variable mask2former_results_root or env MASK2FORMER_RESULTS_ROOT).", section="Advanced")
    return params


def pipeline_params() -> Dict[str, Param]:
    return {**dataset_params(), **common_params()}


def retrain_params(*, data_root_default: str, eval_default: Any) -> Dict[str, Param]:
    section = section_of("dataset")
    params = {
        "data_root": Param(data_root_default, type="string", minLength=1, title="Data root",
                           description="Root of the dated training partitions (<data_root>/<YYYY-MM-DD>/...). "
                                       "Scheduled and backfill runs train on their logical date's partition; "
                                       "manual and asset-triggered runs on the one named below (or by the asset "
                                       "event), else the newest.", section=section),
        "partition": Param(None, type=["null", "string"], pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                           title="Partition",
                           description="YYYY-MM-DD partition for a manual run; empty: the newest one.",
                           section=section),
    }
    data = dataset_params(eval_default=eval_default)
    params["eval_dataset"] = data["eval_dataset"]
    params["dataset_format"] = data["dataset_format"]
    return {**params, **common_params()}


def spec_overrides_from_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The dotted overrides of a run: the form's spec fields set to other than the spec's default, then
    ``spec_overrides`` (which wins)."""
    leaves = spec_leaves()
    overrides = {key: params[key] for key in form_keys()
                 if params.get(key) is not None and params[key] != leaves[key].get("default")}
    extra = params.get("spec_overrides") or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"params.spec_overrides must be a mapping of dotted keys, got {extra!r}")
    overrides.update(extra)
    return overrides


#: Macros the DAGs register (user_defined_macros).
MACROS = {"mask2former_overrides": spec_overrides_from_params}
