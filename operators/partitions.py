"""Dated data partitions ``<data_root>/<YYYY-MM-DD>``: the one of a run, or the newest one.

A scheduled or backfilled run trains on the partition of its logical date; a run without a logical
date (asset-triggered or manual in Airflow 3) falls back to the newest partition present.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any, Callable, List, Optional, Tuple

from mask2former.data.sources import join_uri, local_path_of, parse_s3_uri, uri_scheme

_PARTITION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def list_partitions(data_root: str, s3_client_factory: Callable[[], Any]) -> List[str]:
    """Names of the dated partitions under ``data_root``, oldest first."""
    if uri_scheme(data_root) == "s3":
        location = parse_s3_uri(data_root)
        prefix = f"{location.key.rstrip('/')}/" if location.key.strip("/") else ""
        names = []
        paginator = s3_client_factory().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/"):
            names.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
    else:
        root = local_path_of(data_root)
        names = os.listdir(root) if os.path.isdir(root) else []
        names = [n for n in names if os.path.isdir(os.path.join(root, n))]
    return sorted(n for n in names if _PARTITION.match(n))


def select_partition(data_root: str, logical_date: Optional[dt.datetime],
                     s3_client_factory: Callable[[], Any]) -> Tuple[str, str]:
    """(partition URI, why this one). Raises FileNotFoundError naming the root when there is none."""
    available = list_partitions(data_root, s3_client_factory)
    if logical_date is not None:
        name = logical_date.strftime("%Y-%m-%d")
        if name not in available:
            raise FileNotFoundError(f"no data partition {name} under {data_root} for the run's logical date; "
                                    f"present: {', '.join(available) or 'none'}")
        return join_uri(data_root, name), f"the run's logical date {name}"
    if not available:
        raise FileNotFoundError(f"no dated partition (YYYY-MM-DD) under {data_root}")
    return join_uri(data_root, available[-1]), f"the newest partition {available[-1]} (the run has no logical date)"
