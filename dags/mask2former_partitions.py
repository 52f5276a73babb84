"""Dated data partitions ``<data_root>/<YYYY-MM-DD>``: the one of a run, or the newest one (a helper of
mask2former_retrain, read through the storage hook).

A scheduled or backfilled run trains on the partition of its logical date; a run without a logical
date (asset-triggered or manual in Airflow 3) falls back to the newest partition present.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, List, Optional, Tuple

from mask2former.data.sources import join_uri

_PARTITION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def list_partitions(data_root: str, storage: Any) -> List[str]:
    """Names of the dated partitions under ``data_root``, oldest first (``storage``: the storage hook)."""
    return sorted(n for n in storage.list_folders(data_root) if _PARTITION.match(n))


def select_partition(data_root: str, logical_date: Optional[dt.datetime], storage: Any) -> Tuple[str, str]:
    """(partition URI, why this one). Raises FileNotFoundError naming the root when there is none."""
    available = list_partitions(data_root, storage)
    if logical_date is not None:
        name = logical_date.strftime("%Y-%m-%d")
        if name not in available:
            raise FileNotFoundError(f"no data partition {name} under {data_root} for the run's logical date; "
                                    f"present: {', '.join(available) or 'none'}")
        return join_uri(data_root, name), f"the run's logical date {name}"
    if not available:
        raise FileNotFoundError(f"no dated partition (YYYY-MM-DD) under {data_root}")
    return join_uri(data_root, available[-1]), f"the newest partition {available[-1]} (the run has no logical date)"
