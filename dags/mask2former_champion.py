"""Champion/challenger (a helper of mask2former_retrain): the current best model's record (``champion.json`` in
the results root, read and written through the storage hook) and the promotion decision, compared on the same
evaluation set by one metric (mIoU, higher is better)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Dict, Mapping, Optional

from mask2former.data.sources import join_uri
from operators.utils.outcome import find_metric

CHAMPION_FILE = "champion.json"
METRIC = "mIoU"


def champion_uri(results_root: str) -> str:
    return join_uri(results_root.rstrip("/") or results_root, CHAMPION_FILE)


def read_champion(results_root: str, storage: Any) -> Optional[Dict[str, Any]]:
    return storage.read_json(champion_uri(results_root))


def needs_evaluation(champion: Optional[Mapping[str, Any]], eval_dataset: str) -> bool:
    """Whether the champion must be scored on ``eval_dataset`` (it was scored on another set)."""
    return champion is not None and champion.get("eval_dataset") != eval_dataset


def metric_of(evaluation: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The metric from an evaluate task's XCom dict."""
    if not evaluation:
        return None
    return find_metric(evaluation.get("metrics") or {}, METRIC)


def decide(*, challenger: Optional[float], champion: Optional[float], eval_dataset: str) -> Dict[str, Any]:
    """Promote when there is no champion or the challenger's metric is strictly higher."""
    if challenger is None:
        raise ValueError(f"the challenger's evaluation has no {METRIC}; cannot compare it with the champion")
    if champion is None:
        decision, reason = "promote", "there is no champion yet"
    elif challenger > champion:
        decision, reason = "promote", f"{METRIC} {challenger:.4f} beats the champion's {champion:.4f}"
    else:
        decision, reason = "keep", f"{METRIC} {challenger:.4f} does not beat the champion's {champion:.4f}"
    return {"decision": decision, "metric": METRIC, "challenger": challenger, "champion": champion,
            "eval_dataset": eval_dataset, "reason": reason}


def champion_record(*, dag_id: str, run_id: str, partition: str, eval_dataset: str, value: float,
                    train: Mapping[str, Any], evaluation: Mapping[str, Any], export: Optional[Mapping[str, Any]],
                    engine: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    return {
        "metric": METRIC, "value": value, "eval_dataset": eval_dataset, "data_partition": partition,
        "dag_id": dag_id, "run_id": run_id,
        "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train": dict(train), "evaluate": dict(evaluation),
        "export": dict(export) if export else None, "engine": dict(engine) if engine else None,
    }


def write_champion(results_root: str, record: Mapping[str, Any], storage: Any) -> str:
    uri = champion_uri(results_root)
    storage.write_json(uri, dict(record))
    return uri
