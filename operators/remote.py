"""Published results folders on S3: read their index, restore a job folder, read and write small files.

A published folder is read through a local *index*: a temporary folder holding the small JSON files
(status, metrics, best epoch) for real and an empty placeholder for every other object, so the
engine's own resolver (:func:`mask2former.results.resolve_parent_model`) and the artifact listing work
unchanged on S3 results; the names it returns map back to URIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mask2former import results
from mask2former.data.sources import S3Location, local_path_of, parse_s3_uri, uri_scheme
from mask2former.data.staging import FINISHED_MARKER, head_s3_object

S3ClientFactory = Callable[[], Any]

#: Small files copied for real into an index (everything else is a placeholder).
INDEX_FILES = (results.STATUS_FILE, results.METRICS_FILE, results.BEST_FILE, FINISHED_MARKER)


def _prefix(location: S3Location) -> str:
    return f"{location.key.rstrip('/')}/" if location.key.strip("/") else ""


def list_published(uri: str, s3_client_factory: S3ClientFactory) -> List[str]:
    """Relative names of every object under a published S3 folder."""
    location = parse_s3_uri(uri)
    prefix = _prefix(location)
    client = s3_client_factory()
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        names.extend(item["Key"][len(prefix):] for item in page.get("Contents", []))
    return sorted(n for n in names if n)


def build_index(uri: str, dest: Path, s3_client_factory: S3ClientFactory) -> Path:
    """Mirror a published folder's names into ``dest``: small index files for real, placeholders for the rest.

    A local (or ``file://``) folder is returned as it is.
    """
    if uri_scheme(uri) != "s3":
        return Path(local_path_of(uri))
    location = parse_s3_uri(uri)
    prefix = _prefix(location)
    client = s3_client_factory()
    dest.mkdir(parents=True, exist_ok=True)
    for name in list_published(uri, s3_client_factory):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in INDEX_FILES:
            client.download_file(location.bucket, prefix + name, str(target))
        else:
            target.touch()
    return dest


def restore_job_folder(uri: str, local_dir: Path, s3_client_factory: S3ClientFactory,
                       log: Callable[[str], None]) -> int:
    """Download an earlier attempt's checkpoints, best-epoch record and status into an empty job folder.

    Used when a retried train runs on another worker than its earlier attempt (results on S3): the
    engine then resumes from the newest checkpoint. Returns the number of files restored.
    """
    if uri_scheme(uri) != "s3" or results.list_checkpoints(local_dir):
        return 0
    location = parse_s3_uri(uri)
    prefix = _prefix(location)
    wanted = [n for n in list_published(uri, s3_client_factory)
              if "/" not in n and (n.endswith(".pth") or n in (results.BEST_FILE, results.STATUS_FILE))]
    if not wanted:
        return 0
    client = s3_client_factory()
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        client.download_file(location.bucket, prefix + name, str(local_dir / name))
    log(f"restored {len(wanted)} file(s) of the earlier attempt from {uri}: {', '.join(wanted)}")
    return len(wanted)


def read_json(uri: str, s3_client_factory: Optional[S3ClientFactory]) -> Optional[Dict[str, Any]]:
    """A small JSON document at a URI (S3 or local), or None when it does not exist."""
    if uri_scheme(uri) != "s3":
        path = Path(local_path_of(uri))
        return json.loads(path.read_text()) if path.is_file() else None
    location = parse_s3_uri(uri)
    client = s3_client_factory()
    if head_s3_object(client, location) is None:
        return None
    body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    return json.loads(body)


def write_json(uri: str, data: Dict[str, Any], s3_client_factory: Optional[S3ClientFactory]) -> None:
    """Write a small JSON document atomically (local: temp file and rename; S3: one PUT)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if uri_scheme(uri) != "s3":
        results.atomic_write_text(local_path_of(uri), text)
        return
    location = parse_s3_uri(uri)
    s3_client_factory().put_object(Bucket=location.bucket, Key=location.key, Body=text.encode(),
                                   ContentType="application/json")


__all__ = ["INDEX_FILES", "build_index", "list_published", "read_json", "restore_job_folder",
           "write_json"]
