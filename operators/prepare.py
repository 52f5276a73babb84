"""The steps around a job that every launcher shares: stage its data and write its spec; publish it.

No Airflow import: the Kubernetes pod entry point (:mod:`operators.pod_job`) runs these too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from mask2former import results
from mask2former.config import resolve_spec_dict
from mask2former.data.staging import FINISHED_MARKER, StagingResult, stage_sources, sync_results

SPEC_FILE = "spec.yaml"
#: Values the engine fetches itself (pretrained weights by URL); staging handles s3:// and file:// only.
ENGINE_FETCHED_SCHEMES = ("http://", "https://")

Log = Callable[[str], None]


def stage_and_write_spec(*, action: str, overrides: Mapping[str, Any], local_dir: Path, cache_dir: Path,
                         s3_client_factory: Optional[Callable[[], Any]], log: Log) -> StagingResult:
    """Make every data source and parent model local, then write ``spec.yaml`` into the job folder.

    The spec file is the action's full resolved spec (defaults, then the staged overrides) with
    ``results_dir`` set to the job folder; the CLI resolves it again and writes experiment.yaml.
    """
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / FINISHED_MARKER).unlink(missing_ok=True)
    by_url = {k: v for k, v in overrides.items() if isinstance(v, str) and v.lower().startswith(ENGINE_FETCHED_SCHEMES)}
    staged = stage_sources({k: v for k, v in overrides.items() if k not in by_url}, cache_dir,
                           s3_client_factory=s3_client_factory, progress=log)
    tree = resolve_spec_dict(action, overrides={**staged.local_overrides, **by_url})
    tree["results_dir"] = str(local_dir)
    results.atomic_write_text(local_dir / SPEC_FILE, yaml.safe_dump(tree, sort_keys=False))
    return staged


def publish(*, local_dir: Path, publish_uri: str, s3_client_factory: Optional[Callable[[], Any]], log: Log) -> None:
    """Publish the job folder to its results location, ``_FINISHED`` last."""
    outcome = sync_results(local_dir, publish_uri, s3_client_factory=s3_client_factory)
    log(f"published {local_dir} to {outcome.destination}: {outcome.uploaded_files} file(s) copied, "
        f"{outcome.skipped_files} unchanged, marker {outcome.marker}")


def cli_command(python: str, action: str, local_dir: Path) -> list:
    """The engine's command line for a job folder prepared by :func:`stage_and_write_spec`."""
    return [python, "-m", "mask2former", action, "-e", str(local_dir / SPEC_FILE), "--results-dir", str(local_dir)]
