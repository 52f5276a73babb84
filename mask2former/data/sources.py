"""Where a job's data lives: dataset roots -> per-action data-source overrides.

A job names one training dataset root and optionally one evaluation dataset root (``s3://bucket/prefix``,
``file:///path`` or a plain path) plus a format (``coco``, ``coco_panoptic`` or ``ade``).
:func:`plan_data_sources` turns them into the flat dotted overrides of the spec (``dataset.train.img_dir``
etc.) that the action needs; the Airflow side's storage hook later makes every URI local (staging).

No torch import here: the Airflow layer imports this module at DAG-parse time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = [
    "ACTIONS",
    "DATASET_FORMATS",
    "S3Location",
    "join_uri",
    "local_path_of",
    "parse_s3_uri",
    "plan_data_sources",
    "local_source_exists",
    "uri_scheme",
]

#: Actions that read a dataset.
DATA_ACTIONS = ("train", "evaluate", "inference", "quantize")
#: Actions that take no dataset.
NO_DATA_ACTIONS = ("export", "gen_trt_engine")
ACTIONS = DATA_ACTIONS + NO_DATA_ACTIONS
DATASET_FORMATS = ("coco", "coco_panoptic", "ade")

IMAGES_ARCHIVE = "images.tar.gz"
INSTANCE_JSON = "annotations.json"
PANOPTIC_JSON = "annotations_panoptic.json"
PANOPTIC_ARCHIVE = "images_panoptic.tar.gz"
ADE_JSONL = "annotations.jsonl"
ADE_ROOT_ARCHIVE = "root.tar.gz"
LABEL_MAP_BY_FORMAT = {"coco": "label_map.json", "coco_panoptic": "label_map_panoptic.json", "ade": "label_map.json"}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class S3Location:
    """An ``s3://bucket/key`` URI split into its parts."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def uri_scheme(value: str) -> str:
    """``"s3"``, ``"file"`` or ``""`` (a plain path). Any other scheme raises :class:`ValueError`."""
    match = _SCHEME.match(value)
    if match is None:
        return ""
    scheme = match.group(1).lower()
    if scheme not in ("s3", "file"):
        raise ValueError(f"unsupported URI scheme {scheme!r} in {value!r}; expected s3://, file:// or a local path")
    return scheme


def parse_s3_uri(uri: str) -> S3Location:
    """Split ``s3://bucket/key``; the key may be empty (a bucket root)."""
    if uri_scheme(uri) != "s3":
        raise ValueError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; expected s3://bucket/key")
    return S3Location(bucket=bucket, key=key)


def local_path_of(uri: str) -> str:
    """The local path of a ``file://`` URI or of a plain path (returned unchanged)."""
    scheme = uri_scheme(uri)
    if scheme == "":
        return uri
    if scheme != "file":
        raise ValueError(f"{uri!r} is not a local path or file:// URI")
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri!r} names host {parts.netloc!r}; file:// URIs must be local (file:///abs/path)")
    path = unquote(parts.path)
    if not path:
        raise ValueError(f"{uri!r} names no path; expected file:///abs/path")
    return path


def join_uri(root: str, name: str) -> str:
    """``root`` + ``/`` + ``name`` for s3:// and file:// roots, ``os.path.join`` for plain paths."""
    scheme = uri_scheme(root)
    if scheme == "s3":
        parse_s3_uri(root)  # validates the bucket
        return f"{root.rstrip('/')}/{name}"
    if scheme == "file":
        local_path_of(root)  # validates host and path
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def local_source_exists(uri: str) -> bool:
    """Whether a local (plain path or ``file://``) source exists; an ``s3://`` source needs a storage client,
    so callers that plan S3 roots pass their own ``exists`` (the Airflow side: its storage hook)."""
    if uri_scheme(uri) == "s3":
        raise ValueError(f"{uri}: planning S3 sources needs an exists() that can ask S3")
    return os.path.exists(local_path_of(uri))


def _single_train_root(train_datasets: str | Sequence[str] | None, *, action: str) -> str:
    if isinstance(train_datasets, str):
        roots = [train_datasets]
    elif train_datasets is None:
        roots = []
    else:
        roots = list(train_datasets)
    if len(roots) != 1 or not isinstance(roots[0], str) or not roots[0]:
        raise ValueError(
            f"train_datasets for action {action!r} must be one dataset root (a string or a one-element list), "
            f"got {train_datasets!r}"
        )
    return roots[0]


def _split_files(prefix: str, root: str, dataset_format: str) -> dict[str, str]:
    if dataset_format == "ade":  # the JSONL names images and label PNGs inside root.tar.gz
        return {f"dataset.{prefix}.annot_file": join_uri(root, ADE_JSONL),
                f"dataset.{prefix}.root_dir": join_uri(root, ADE_ROOT_ARCHIVE)}
    return {
        f"dataset.{prefix}.img_dir": join_uri(root, IMAGES_ARCHIVE),
        f"dataset.{prefix}.instance_json": join_uri(root, INSTANCE_JSON),
        f"dataset.{prefix}.panoptic_json": join_uri(root, PANOPTIC_JSON),
        f"dataset.{prefix}.panoptic_dir": join_uri(root, PANOPTIC_ARCHIVE),
    }


def plan_data_sources(
    action: str,
    train_datasets: str | Sequence[str] | None,
    eval_dataset: str | None,
    dataset_format: str | None,
    exists: Callable[[str], bool] | None = None,
) -> dict[str, str]:
    """The data-source overrides of ``action`` for the given dataset roots.

    train/evaluate/inference/quantize get ``dataset.train.*`` and ``dataset.label_map`` from the training
    root and, when ``eval_dataset`` is given, ``dataset.val.*`` and ``dataset.test.img_dir`` from it;
    quantize adds ``dataset.quant_calibration_dataset.images_dir``; export and gen_trt_engine get ``{}``.
    An ``ade`` root gives ``annot_file`` (``annotations.jsonl``) and ``root_dir`` (``root.tar.gz``, the images
    and label PNGs the JSONL names) instead of the COCO files; its ``images.tar.gz`` (the images alone) is
    still what inference and calibration read.
    A file for which ``exists`` returns False is left out (default: :func:`local_source_exists`); the
    action that needs it fails later, naming it.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; allowed: {list(ACTIONS)}")
    if action in NO_DATA_ACTIONS and dataset_format is None:
        return {}
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {dataset_format!r}; allowed: {list(DATASET_FORMATS)}")
    if action in NO_DATA_ACTIONS:
        return {}
    train_root = _single_train_root(train_datasets, action=action)
    if eval_dataset is not None and (not isinstance(eval_dataset, str) or not eval_dataset):
        raise ValueError(f"eval_dataset must be one dataset root (a non-empty string) or None, got {eval_dataset!r}")

    files = {
        "dataset.label_map": join_uri(train_root, LABEL_MAP_BY_FORMAT[dataset_format]),
        **_split_files("train", train_root, dataset_format),
    }
    if eval_dataset is not None:
        files.update(_split_files("val", eval_dataset, dataset_format))
        files["dataset.test.img_dir"] = join_uri(eval_dataset, IMAGES_ARCHIVE)
    if action == "quantize":
        files["dataset.quant_calibration_dataset.images_dir"] = join_uri(train_root, IMAGES_ARCHIVE)

    check = exists if exists is not None else local_source_exists
    answers: dict[str, bool] = {}
    overrides: dict[str, str] = {"dataset.train.type": dataset_format}
    if eval_dataset is not None:
        overrides["dataset.val.type"] = dataset_format
    for key, uri in files.items():
        if uri not in answers:
            answers[uri] = bool(check(uri))
        if answers[uri]:
            overrides[key] = uri
    return overrides
