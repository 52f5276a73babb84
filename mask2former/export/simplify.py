"""Graph simplification of an exported model with onnxslim (constant folding, dead-node removal, fusions).

Simplification is an optimisation, never a requirement: when onnxslim fails, or its graph does not
pass the ONNX checker, the unsimplified graph is kept and the result says why.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import onnx

log = logging.getLogger(__name__)


@dataclass
class SimplifyResult:
    """``applied`` false: ``destination`` holds the unsimplified graph and ``message`` says why."""

    applied: bool
    message: str
    nodes_before: int
    nodes_after: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def simplify_onnx(source: Union[str, Path], destination: Union[str, Path], *,
                  simplifier: Optional[Callable[[onnx.ModelProto], onnx.ModelProto]] = None) -> SimplifyResult:
    """Simplify ``source`` into ``destination`` (they may be the same file).

    ``simplifier`` maps a ModelProto to its simplified copy (default: onnxslim); metadata_props are
    carried over because simplifiers may drop them.
    """
    source, destination = Path(source), Path(destination)
    model = onnx.load(str(source))
    before = len(model.graph.node)
    started = time.perf_counter()
    try:
        simplified = (simplifier or _onnxslim)(model)
        if simplified is None:
            raise ValueError("the simplifier returned no model")
        _copy_metadata(source_model=model, target=simplified)
        onnx.checker.check_model(simplified)
    except Exception as exc:  # noqa: BLE001 - any simplifier failure means: keep the exported graph
        seconds = time.perf_counter() - started
        if source != destination:
            shutil.copyfile(source, destination)
        message = f"simplification failed, the unsimplified graph is kept: {type(exc).__name__}: {exc}"
        log.warning(message)
        return SimplifyResult(applied=False, message=message, nodes_before=before, nodes_after=before,
                              seconds=round(seconds, 3))
    onnx.save(simplified, str(destination))
    seconds = time.perf_counter() - started
    after = len(simplified.graph.node)
    return SimplifyResult(applied=True, message=f"onnxslim: {before} -> {after} nodes", nodes_before=before,
                          nodes_after=after, seconds=round(seconds, 3))


def _copy_metadata(*, source_model: onnx.ModelProto, target: onnx.ModelProto) -> None:
    present = {p.key for p in target.metadata_props}
    for prop in source_model.metadata_props:
        if prop.key not in present:
            entry = target.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
