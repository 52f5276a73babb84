"""OpenLineage facets of the Mask2Former operators (when apache-airflow-providers-openlineage is installed).

The provider's convention: datasets are (namespace, name) pairs from their URIs (``s3://bucket`` + key,
``file`` + absolute path). A job's inputs are its dataset roots and the parent model it read; its outputs
are the models it wrote (checkpoint, ONNX, engine, quantized model) and its job folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Tuple

from mask2former.data.sources import local_path_of, parse_s3_uri, uri_scheme

#: XCom artifacts that are models (the outputs of a job).
MODEL_ARTIFACTS = ("checkpoint", "best_checkpoint", "onnx", "engine", "quantized")


def dataset_name(uri: str) -> Optional[Tuple[str, str]]:
    """(namespace, name) of a URI in OpenLineage's naming, or None when it is not a dataset location."""
    try:
        if uri_scheme(uri) == "s3":
            location = parse_s3_uri(uri)
            return f"s3://{location.bucket}", location.key.strip("/") or "/"
        return "file", str(Path(local_path_of(uri)).absolute())
    except ValueError:
        return None


def _datasets(uris: Iterable[Any]) -> List[Any]:
    from airflow.providers.common.compat.openlineage.facet import Dataset

    seen, out = set(), []
    for uri in uris:
        named = dataset_name(uri) if isinstance(uri, str) and uri else None
        if named and named not in seen:
            seen.add(named)
            out.append(Dataset(namespace=named[0], name=named[1]))
    return out


def operator_lineage(*, inputs: Iterable[Any], outcome: Optional[Mapping[str, Any]]) -> Any:
    """The provider's ``OperatorLineage`` of one job: ``inputs`` (dataset roots, parent model URIs) in, the
    models of ``outcome`` (the task's XCom) and its job folder out."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    artifacts = (outcome or {}).get("artifacts") or {}
    outputs = [artifacts[kind] for kind in MODEL_ARTIFACTS if artifacts.get(kind)]
    if outcome and outcome.get("results_dir"):
        outputs.append(outcome["results_dir"])
    return OperatorLineage(inputs=_datasets(inputs), outputs=_datasets(outputs))
