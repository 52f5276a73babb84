"""Dated data partitions ``<data_root>/<YYYY-MM-DD>`` and which one a retrain run trains on (a helper of
mask2former_retrain, read through the storage hook).

The choice follows how the run was made:

* scheduled and backfill runs: the partition of the run's logical date; when it does not exist the run
  has no new data and is skipped with that reason (:class:`NoNewData`), never failed;
* asset-triggered runs: the partition the run's partition key or the triggering asset event names
  (its ``partition_key``, or ``partition`` in its extra), else the newest partition;
* manual runs (the UI form fills the logical date with "now"; the REST API may send none) and any
  other run type: the ``partition`` param when given, else the newest partition.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional

from mask2former.data.sources import join_uri

_PARTITION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Run types whose logical date is the data interval they stand for.
DATED_RUN_TYPES = ("scheduled", "backfill")


class NoNewData(Exception):
    """A dated run's partition does not exist: nothing new to train on (the task is skipped)."""


@dataclass(frozen=True)
class PartitionChoice:
    partition: str
    uri: str
    reason: str
    run_type: str

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)


def list_partitions(data_root: str, storage: Any) -> List[str]:
    """Names of the dated partitions under ``data_root``, oldest first (``storage``: the storage hook)."""
    return sorted(n for n in storage.list_folders(data_root) if _PARTITION.match(n))


def _named_by_events(partition_key: Optional[str], events: Iterable[Any]) -> Optional[tuple]:
    """(partition, where it was named) from the run's partition key or its triggering asset events."""
    if partition_key:
        return partition_key, "the run's partition key"
    for event in events:
        key = getattr(event, "partition_key", None)
        if key:
            return key, f"the partition key of the triggering event of asset {_asset_name(event)}"
        extra = getattr(event, "extra", None) or {}
        if extra.get("partition"):
            return str(extra["partition"]), f"the extra of the triggering event of asset {_asset_name(event)}"
    return None


def _asset_name(event: Any) -> str:
    asset = getattr(event, "asset", None)
    return str(getattr(asset, "name", None) or getattr(asset, "uri", None) or "?")


def choose_partition(data_root: str, storage: Any, *, run_type: str, logical_date: Optional[dt.datetime] = None,
                     requested: Optional[str] = None, partition_key: Optional[str] = None,
                     asset_events: Iterable[Any] = ()) -> PartitionChoice:
    """The partition this run trains on and why.

    Raises :class:`NoNewData` when a scheduled or backfill run's partition is absent, and FileNotFoundError
    when a partition asked for by name (param, partition key, asset event) is absent or there is none at all.
    """
    run_type = str(getattr(run_type, "value", run_type) or "manual")
    available = list_partitions(data_root, storage)
    present = ", ".join(available) or "none"

    def chosen(name: str, reason: str) -> PartitionChoice:
        return PartitionChoice(partition=name, uri=join_uri(data_root, name), reason=reason, run_type=run_type)

    if run_type in DATED_RUN_TYPES and logical_date is not None:
        name = logical_date.strftime("%Y-%m-%d")
        if name not in available:
            raise NoNewData(f"no new data for {name}: {data_root} has no partition {name} for this {run_type} "
                            f"run's logical date (present: {present})")
        return chosen(name, f"the {run_type} run's logical date {name}")
    named = None
    if requested:
        named = (str(requested), "the run's partition param")
    elif run_type.startswith("asset"):
        named = _named_by_events(partition_key, asset_events)
    if named is not None:
        name, where = named
        if name not in available:
            raise FileNotFoundError(f"partition {name} (named by {where}) is not under {data_root}; "
                                    f"present: {present}")
        return chosen(name, f"named by {where}")
    if not available:
        raise FileNotFoundError(f"no dated partition (YYYY-MM-DD) under {data_root}")
    return chosen(available[-1], f"the newest partition (a {run_type} run without a named partition)")
